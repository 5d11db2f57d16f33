"""One run = one frozen ``RunConfig`` -> one run directory (layout: CONTRACTS.md, written by agents.runwriter).

``RunConfig`` composes the configs that live beside their code (``ModelConfig``/LoRA: agents.policy, ``EnvConfig``:
envs.config, ``OptimConfig``: agents.optim, ``TrainConfig``: agents.trainer, ``PPOConfig``: agents.ppo,
``ProbeConfig``: probes); each owner's ``config_errors`` checks its section and ``validate`` adds how the sections fit
together, raising one ``ConfigError`` that lists every problem before any model loads.

``run(cfg)`` validates (building the env once, which it then uses), takes the run dir (one process at a time: an flock
on ``LOCK_FILE``, else ``RunDirBusy``), and then assembles policy -> regime -> trainer. A dir holding ``DONE`` is
skipped for the same config and is an error for another; otherwise the run resumes from the latest intact
checkpoint. Resuming with a changed LR, batch size, step count, cadence or probe config is allowed and recorded in
``config.json["resumed"]``; any other change is an error (use another ``name``, or ``overwrite=True`` /
``resume=False`` to start over). A run dir that this call created is removed again when the run cannot be set up
(model, device), so failures leave no orphans.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import random
import re
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

import envs
from agents.embedded import embedded_model_path
from agents.episodes import TurnProtocol
from agents.eos_lr import build_controller, controller_tag
from agents.optim import OptimConfig, build_optimizer, build_scheduler
from agents.optim import config_errors as optim_errors
from agents.policy import LMPolicy, ModelConfig, resolve_attention, resolve_device
from agents.policy import config_errors as model_errors
from agents.ppo import PPOConfig, PPORegime
from agents.ppo import config_errors as ppo_errors
from agents.replay import ReplayConfig, ReplayStream
from agents.replay import config_errors as replay_errors
from agents.retention import perplexity
from agents.runwriter import RunWriter, git_hash
from agents.sft import SFTRegime
from agents.trainer import TrainConfig, Trainer, latest_checkpoint
from agents.trainer import config_errors as train_errors
from envs.config import EnvConfig, env_kwarg_names, make_env, train_tasks  # noqa: F401 - re-exported
from envs.config import config_errors as env_errors
from envs.config import curriculum_levels
from envs.curriculum import Curriculum
from experiments.errors import ConfigError, RunDirBusy
from experiments.lineage import lineage_name, retention_source
from experiments.lineage import replay_texts
from experiments.lineage import retention_texts as _retention_texts
from probes import ProbeConfig, Prober
from probes.config import KNOBS as PROBE_KNOBS

REGIMES = ("sft", "rl")
# Fields that may differ when resuming a run dir (section.field); everything else defines the trajectory.
RESUMABLE_CHANGES = ("optim.lr", "train.steps", "train.micro_batch", "train.grad_accum", "train.eval_every",
                     "train.retention_every", "train.checkpoint_every", "train.divergence_loss",
                     "train.n_samples", "train.save_model", "probe.", "wandb")
# Fields that never change what a run dir holds: they locate it or say how to treat an existing one.
NOT_COMPARED = ("out_dir", "name", "overwrite")
# Fields that change how much memory a run takes, never what it computes (bit for bit: tests/test_probes_hvp.py)
PERFORMANCE_ONLY = ("probe.cache_mb",)
# Fields added after run dirs were written, each with the value that reproduces what those runs did: a config.json
# without the field reads as that value, so adding a field does not turn every finished run into "a different
# config". Only fields whose old behaviour is exactly this value belong here (probe.probe_set_size does not: before
# it, λ_max was the batch's, which is probe_set_size=0, not its default 64). model.attention: runs before it loaded
# eager attention, which "auto" is wherever no CUDA device runs the model (every run this lab made before it).
ADDED_FIELDS = {"probe.chunk_size": 0, "env.offset": 0, "probe.critical_chunks": 0, "probe.batch_lambda_max": True,
                "model.head_chunk": 0, "train.autocast": "", "probe.cache_mb": 0,
                "probe.cold_stop": "", "model.attention": "auto"}
LOCK_FILE = ".lock"  # in the run dir: flock-ed by the process that runs it


@dataclass(frozen=True)
class RunConfig:
    regime: str = "sft"
    """sft (behaviour cloning on demonstrations) or rl (PPO on verifier rewards); LoRA is model.lora_rank > 0."""
    model: ModelConfig = field(default_factory=ModelConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    """Pre-training text mixed into SFT batches against forgetting (SFT only; weight 0 = plain SFT)."""
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    out_dir: str = "runs"
    """Directory that holds the run dir."""
    name: str | None = None
    """Run dir name; default: derived from regime, env, optimizer, lr, batch, LoRA rank and seed."""
    wandb: bool = False
    """Also log to wandb, offline unless WANDB_MODE says otherwise."""
    overwrite: bool = False
    """Discard an existing run dir of this name (finished or not) and start over."""


def default_config(command: str) -> RunConfig:
    """The defaults of ``eoslab sft | lora | rl``: one source for the CLI, the benchmarks and the studies.

    Chosen by measurement on the embedded model and ArithRLVR-v0 (experiments/bench/learnability.py, README):

    * sft: AdamW 1e-3, batch 64 (16 x 4), 1000 steps, 50 warm-up steps then cosine decay. Constant AdamW 1e-3
      reached 0.51 / 0.78 / 0.79 held-out after 250 / 500 / 750 steps and this schedule 0.97 after 1000, but
      forgot: retention perplexity x3.98 of the base. Replay of the pre-training text at α = 0.2, 4 windows per
      step (agents/replay.py) keeps it: 0.25 / 0.80 / 0.91 / 0.94 held-out after 250 / 500 / 750 / 1000 steps at
      retention x1.27 / 1.16 / 1.07 / 1.05 (500 test problems; 8 windows: 0.96 at x1.00, ~20 % slower per step).
      Replay needs the base model's pre-training text: known for the embedded model, a file
      (``--replay.source``) for any other, or ``--replay.weight 0``. 1000 steps trained for 552 s on one thread
      (probes at their defaults added 319 s). The user's SGD (momentum 0.9, weight decay 1e-4, batch 16, replay;
      RunConfig's own optimizer defaults) for 3000 steps (534-581 s of training) reached 0.65 at η 0.01, 0.78 at
      0.03, 0.18 at 0.1 and diverged at 0.3 (one seed each). The EoS studies keep constant LRs of their own;
      this default is for a policy that learns.
    * lora: the same at 3e-3 (rank 8, 4 replay windows: 0.748 held-out at retention x1.06 after 358 s of
      training; 0.76 with 8 windows; 0.80 at x2.77 without replay).
    * rl: PPO from the "rl" pool, AdamW 1e-4 after 10 warm-up steps, gradient norm clipped at 1, rollouts of
      32 prompts x 8 samples at temperature 0.7. From a 150-step SFT warm start (0.208 held-out) this gained +0.210
      in 300 steps (0.418 [0.38, 0.46], KL 0.04); rerun on later code from its 0.226 warm start: +0.158 (seed 0)
      and +0.182 (seed 1). Samples per step set the gain (8 x 4: +0.02, 8 x 8:
      +0.06, 16 x 8: +0.11); a higher LR did not help (2e-4 behind 1e-4 at step 150; 3e-4 without warm-up
      collapsed the policy). Without clipping the 32 x 8 run reached +0.156 by step 100 and then collapsed: the k3
      KL term's gradient, exp(log π_ref − log π_θ) − 1 per token, explodes on a sampled token that π_θ has made
      far less likely than π_ref (‖g‖ = 121 against ≤ 0.5 before); clipping at 1 touches only such steps. At 1.0
      the samples of a partly trained policy are almost all wrong, so groups carry no signal.
    """
    sft = RunConfig(regime="sft",
                    optim=OptimConfig(name="adamw", lr=1e-3, weight_decay=0.0, schedule="cosine", warmup_steps=50),
                    train=TrainConfig(steps=1000, micro_batch=16, grad_accum=4, eval_every=250, retention_every=250),
                    replay=ReplayConfig(weight=0.2))
    if command == "sft":
        return sft
    if command == "lora":
        return dataclasses.replace(sft, model=ModelConfig(lora_rank=8),
                                   optim=dataclasses.replace(sft.optim, lr=3e-3))
    if command == "rl":
        return RunConfig(regime="rl", optim=OptimConfig(name="adamw", lr=1e-4, weight_decay=0.0, warmup_steps=10,
                                                        grad_clip=1.0),
                         ppo=PPOConfig(prompts_per_step=32, group_size=8, temperature=0.7),
                         train=TrainConfig(steps=300, micro_batch=8, grad_accum=1, eval_every=50, retention_every=100))
    raise ValueError(f"unknown command {command!r}; choose sft, lora or rl")


WARM_START_STEPS = 150


def warm_start_config(steps: int = WARM_START_STEPS) -> RunConfig:
    """RLVR's starting policy (named ``warm-start-sft``): the first ``steps`` SFT steps of ``eoslab sft`` at its
    defaults, a policy that has learnt part of the task, so rewards vary within PPO's groups (from the base model they
    are ~0). The LR is held at its peak after the warm-up: a cosine over so few steps would anneal early (the default's
    LR at step 150 is 0.97 x peak). No replay, so that any ``--model`` works without its pre-training text; a warm
    start this short forgets little. No probes. Callers set model, env, out_dir and the cadences of their budget; the
    +0.210 RL gain in ``default_config`` was measured from this policy (150 steps, 0.208 held-out)."""
    return replace(default_config("sft"), name="warm-start-sft", optim={"schedule": "constant"},
                   probe=ProbeConfig(every=0), replay={"weight": 0.0}, train={"steps": steps})


def run_name(cfg: RunConfig) -> str:
    """``name`` or e.g. ``sft-ArithRLVR-v0-sgd-lr0.01-b16-r0-s0`` (``gd`` = full batch; rl: prompts x group)."""
    if cfg.name:
        return cfg.name
    if cfg.regime == "rl":
        batch = f"p{cfg.ppo.prompts_per_step}x{cfg.ppo.group_size}"
    else:
        batch = "gd" if cfg.train.full_batch else f"b{cfg.train.micro_batch * cfg.train.grad_accum}"
    # a curvature-driven schedule is part of the name (lr is only its start); fixed schedules keep their old names
    sched = controller_tag(cfg.optim.schedule, cfg.optim.control)
    return (f"{cfg.regime}-{cfg.env.env_id}{_kwargs_tag(cfg.env.kwargs)}-{cfg.optim.name}{sched}-lr{cfg.optim.lr:g}"
            f"-{batch}-r{cfg.model.lora_rank}-s{cfg.train.seed}")


def _kwargs_tag(kwargs: dict) -> str:
    """"" without env kwargs, else "-k" + 8 hex of their sorted JSON (values may hold paths; config.json has them)."""
    if not kwargs:
        return ""
    return "-k" + hashlib.sha256(json.dumps(kwargs, sort_keys=True).encode()).hexdigest()[:8]


def _fit_errors(cfg: RunConfig) -> list[str]:
    """How the sections fit together: batch shape against regime and training-set size, run name, out_dir."""
    t, errors = cfg.train, []
    if cfg.regime not in REGIMES:
        errors.append(f"regime={cfg.regime!r} is unknown; choose one of {REGIMES} (LoRA: model.lora_rank > 0)")
    if t.full_batch:
        if cfg.regime == "rl":
            errors.append("train.full_batch=True is for SFT (full-batch GD over a fixed dataset); "
                          "RL batches are rollouts (set ppo.prompts_per_step instead)")
        elif cfg.env.n_train is None:
            errors.append("train.full_batch=True needs an explicit env.n_train (the dataset that every step "
                          "differentiates in full)")
        elif cfg.env.n_train >= 1 and t.micro_batch >= 1 and cfg.env.n_train % t.micro_batch:
            errors.append(f"train.full_batch=True needs env.n_train ({cfg.env.n_train}) divisible by "
                          f"train.micro_batch ({t.micro_batch}) so every chunk has the same size")
    elif cfg.regime == "sft" and cfg.env.n_train is not None and t.micro_batch * t.grad_accum > cfg.env.n_train >= 1:
        errors.append(f"effective batch micro_batch*grad_accum={t.micro_batch * t.grad_accum} exceeds "
                      f"env.n_train={cfg.env.n_train}")
    if cfg.name is not None and (not cfg.name or "/" in cfg.name or cfg.name in (".", "..")):
        errors.append(f"name={cfg.name!r} must be a plain directory name")
    if not isinstance(cfg.probe, ProbeConfig):
        errors.append("probe must be a probes.ProbeConfig")
    try:
        source = retention_source(cfg.model.name)
    except ConfigError as e:
        errors.append(str(e))
        source = None
    if cfg.replay.weight > 0:
        if cfg.regime != "sft":
            errors.append(f"replay.weight={cfg.replay.weight} applies to SFT only (regime={cfg.regime!r})")
        elif cfg.replay.source == "auto" and source is not None and source != "embedded":
            errors.append(f"replay.source='auto' knows pre-training text only for the embedded model; give "
                          f"--replay.source FILE (JSON list of texts, or text) for model.name={cfg.model.name!r}, "
                          f"or --replay.weight 0")
        elif cfg.replay.source != "auto" and not Path(cfg.replay.source).is_file():
            errors.append(f"replay.source={cfg.replay.source!r} is not a file")
    return errors + _out_dir_errors(cfg)


def _finite_errors(obj, prefix: str = "") -> list[str]:
    """``section.field=value must be finite`` for every NaN/inf float in a config (dataclasses, dicts, tuples)."""
    if dataclasses.is_dataclass(obj):
        return [e for f in dataclasses.fields(obj)
                for e in _finite_errors(getattr(obj, f.name), f"{prefix}.{f.name}" if prefix else f.name)]
    if isinstance(obj, dict):
        return [e for k, v in obj.items() for e in _finite_errors(v, f"{prefix}.{k}")]
    if isinstance(obj, (list, tuple)):
        bad = [v for v in obj if isinstance(v, float) and not math.isfinite(v)]
        return [f"{prefix}={obj!r} must hold finite numbers"] if bad else []
    if isinstance(obj, float) and not math.isfinite(obj):
        return [f"{prefix}={obj} must be a finite number"]
    return []


def _out_dir_errors(cfg: RunConfig) -> list[str]:
    """out_dir and the run dir must be (or become) directories: no file in the way."""
    out = Path(cfg.out_dir)
    for p in (out, *out.parents):
        if p.exists():
            if not p.is_dir():
                return [f"out_dir={cfg.out_dir!r}: {p} is a file, not a directory"]
            break
    run_dir = out / run_name(cfg)
    if run_dir.exists() and not run_dir.is_dir():
        return [f"the run dir {run_dir} is a file, not a directory"]
    return []


def _checked(cfg: RunConfig):
    """``cfg``'s env, built once; ConfigError listing every problem with ``cfg`` (loads no model)."""
    errors = model_errors(cfg.model)
    section_errors, env = env_errors(cfg.env, cfg.regime)
    errors += section_errors + optim_errors(cfg.optim) + train_errors(cfg.train)
    if cfg.regime == "rl":
        errors += ppo_errors(cfg.ppo)
    errors += replay_errors(cfg.replay)
    errors += _fit_errors(cfg)
    if cfg.regime == "rl" and cfg.ppo.curriculum_window > 0 and env is not None:
        if not hasattr(env, "at_difficulty"):
            errors.append(f"ppo.curriculum_window > 0 needs an env with difficulty levels; {cfg.env.env_id} has none")
        elif cfg.ppo.curriculum_start >= env.n_levels:
            errors.append(f"ppo.curriculum_start={cfg.ppo.curriculum_start} must be < {env.n_levels} "
                          f"(the levels of {cfg.env.env_id})")
    reported = {e.split("=")[0] for e in errors}
    errors += [e for e in _finite_errors(cfg) if e.split("=")[0] not in reported]
    if errors:
        raise ConfigError("invalid run config:\n  - " + "\n  - ".join(errors))
    return env


def validate(cfg: RunConfig) -> None:
    """Raise ConfigError listing every problem with ``cfg``; loads no model and trains nothing."""
    _checked(cfg)


# ---------------------------------------------------------------------------------------------------- run dir
def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def _flat_config(config: dict) -> dict:
    """{"section.field": JSON value} of a run config (``asdict`` or config.json's), with every ADDED_FIELDS entry
    it lacks (a run dir written before the field existed) at its listed value."""
    flat = _flatten(json.loads(json.dumps(config)))
    return {**{k: v for k, v in ADDED_FIELDS.items() if k.split(".")[0] in config}, **flat}


def _idle_probe_fields(flat: dict) -> set[str]:
    """The probe fields of ``flat`` that change nothing in its run: every one but probe.every when probes are off,
    and a kind's knobs (probes.config.KNOBS) when its cadence is 0."""
    if flat.get("probe.every") == 0:
        return {k for k in flat if k.startswith("probe.") and k != "probe.every"}
    return {f"probe.{knob}" for knob, cadences in PROBE_KNOBS.items()
            if all(flat.get(f"probe.{c}") == 0 for c in cadences)}


def comparable_config(config: dict) -> dict:
    """The flat config that says what a run does: ``_flat_config`` less its idle probe fields (probes off, or the
    knobs of a probe kind that never runs) and its PERFORMANCE_ONLY fields."""
    flat = _flat_config(config)
    idle = _idle_probe_fields(flat) | set(PERFORMANCE_ONLY)
    return {k: v for k, v in flat.items() if k not in idle}


def config_changes(old: dict, new: dict) -> dict[str, list]:
    """{"section.field": [old, new]} for every differing field of two run configs, less the probe fields idle in
    both (a knob of a probe kind that runs in neither, every probe field where probes are off in both) and the
    PERFORMANCE_ONLY fields."""
    a, b = _flat_config(old), _flat_config(new)
    idle = _idle_probe_fields(a) & _idle_probe_fields(b) | set(PERFORMANCE_ONLY)
    return {k: [a.get(k), b.get(k)] for k in sorted(set(a) | set(b)) if k not in idle and a.get(k) != b.get(k)}


def _compared(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in NOT_COMPARED}


def _saved_config(run_dir: Path) -> dict:
    """config.json's "config" section; ConfigError when it cannot be read."""
    try:
        return json.loads((run_dir / "config.json").read_text())["config"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ConfigError(f"run dir {run_dir} has no readable config.json ({type(e).__name__}); "
                          "use --name to run elsewhere, or --overwrite to start it over") from None


def _resumable(key: str) -> bool:
    """May field ``key`` ("section.field") differ when a run dir is resumed? (See RESUMABLE_CHANGES.)"""
    return any(key == r or (r.endswith(".") and key.startswith(r)) for r in RESUMABLE_CHANGES)


def _describe(changes: dict[str, list]) -> str:
    return ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items())


def check_run_dir(cfg: RunConfig, run_dir: Path) -> bool:
    """Before anything loads: may ``cfg`` continue in ``run_dir``? True = finished with this very config (skip).

    Raises ConfigError when the dir holds a finished run with another config, a checkpointed run with a change
    outside RESUMABLE_CHANGES, or a checkpoint beyond train.steps."""
    new = _compared(asdict(cfg))
    if (run_dir / "DONE").exists():
        changes = config_changes(_compared(_saved_config(run_dir)), new)
        if not changes:
            return True
        resumable = all(_resumable(k) for k in changes)
        raise ConfigError(f"run dir {run_dir} holds a finished run (DONE) with a different config: "
                          f"{_describe(changes)}; use --name to run this config under another name, or "
                          "--overwrite to discard the finished run"
                          + (f", or delete {run_dir / 'DONE'} to continue it with these changes" if resumable else ""))
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:  # without a checkpoint the run starts over, so any change is fine
        return False
    if (run_dir / "config.json").exists():
        changes = config_changes(_compared(_saved_config(run_dir)), new)
        bad = {k: v for k, v in changes.items() if not _resumable(k)}
        if bad:
            raise ConfigError(f"run dir {run_dir} holds a run with a different config ({', '.join(bad)}: "
                              f"{_describe(bad)}); use --name to run elsewhere, or --overwrite to start over")
    if ckpt[0] > cfg.train.steps:
        raise ConfigError(f"run dir {run_dir} has a checkpoint at step {ckpt[0]}, beyond train.steps="
                          f"{cfg.train.steps}; set train.steps >= {ckpt[0]} to resume it, or --overwrite to start "
                          "over")
    return False


def _record_config(cfg: RunConfig, writer: RunWriter) -> None:
    """Write config.json; on a resume append the changes (checked by ``check_run_dir``) to "resumed"."""
    new = asdict(cfg)
    resumed = []
    ckpt = latest_checkpoint(writer.run_dir)
    old = writer.saved_config() if ckpt is not None else None
    if old is not None:
        changes = config_changes(_compared(old["config"]), _compared(new))
        resumed = old.get("resumed", []) + [{"from_step": ckpt[0], "changes": changes, "argv": sys.argv,
                                             "git_hash": git_hash()}]
    writer.write_config(new, resumed)


@contextlib.contextmanager
def run_dir_lock(run_dir: Path):
    """Hold an exclusive flock on ``run_dir/LOCK_FILE`` for the block; RunDirBusy when another process holds it.

    The kernel releases an flock when its holder exits or is killed, so a crashed run never blocks the next."""
    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            raise RunDirBusy(f"run dir {run_dir} is in use by another process (pid {holder}); wait for it to end, "
                             "or stop it and rerun to resume") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)


def _clear(run_dir: Path) -> None:
    """Empty ``run_dir`` except its lock file (the lock must stay the one this process holds)."""
    for p in run_dir.iterdir():
        if p.name != LOCK_FILE:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def _wandb_logger(cfg: RunConfig, run_dir: Path, name: str):
    import wandb  # local: optional dependency, only with --wandb

    run = wandb.init(project="eoslab", name=name, id=re.sub(r"[^\w\-]", "_", name)[:64], dir=str(run_dir),
                     config=asdict(cfg), mode=os.environ.get("WANDB_MODE", "offline"), resume="allow")
    return run, lambda row: run.log({k: v for k, v in row.items() if k != "step" and v is not None},
                                    step=row["step"])


# ---------------------------------------------------------------------------------------------------- run
def run(cfg: RunConfig, resume: bool = True, progress: bool = True) -> Path:
    """Train per ``cfg`` into ``out_dir/name``; returns the run dir. Skips a run that has DONE with the same config;
    resumes otherwise. ``resume=False`` (like ``cfg.overwrite``) discards what the run dir holds."""
    env = _checked(cfg)
    name = run_name(cfg)
    run_dir = Path(cfg.out_dir) / name
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"out_dir={cfg.out_dir!r}: cannot create the run dir {run_dir} ({e.strerror or e})") from None
    with run_dir_lock(run_dir):
        try:
            if cfg.overwrite or not resume:
                _clear(run_dir)
            elif check_run_dir(cfg, run_dir):
                return run_dir
            wandb_run, log_fn = _wandb_logger(cfg, run_dir, name) if cfg.wandb else (None, None)
            trainer = _assemble(cfg, env, run_dir, log_fn, progress)
            _record_config(cfg, trainer.writer)
        except BaseException:
            if created:  # it failed before the run began: leave no orphan run dir
                shutil.rmtree(run_dir, ignore_errors=True)
            raise
        try:
            trainer.train(resume=True)
        finally:
            if wandb_run is not None:
                wandb_run.finish()
    return run_dir


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _policy(m: ModelConfig, progress: bool) -> LMPolicy:
    """The pre-trained policy of ``m`` (with LoRA adapters when lora_rank > 0) on its device."""
    path = embedded_model_path(progress=progress) if m.name == "embedded" else m.name
    device = resolve_device(m.device)
    try:
        return LMPolicy.from_pretrained(path, lora=m.lora, dtype=m.dtype, device=device, head_chunk=m.head_chunk,
                                        attn_implementation=resolve_attention(m.attention, device))
    except Exception as e:  # noqa: BLE001 - what validate's header checks cannot see (bad tensors, tokenizer)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ConfigError(f"model.name={m.name!r} cannot be loaded on {device}: {type(e).__name__}: {first}") from None


def _assemble(cfg: RunConfig, env, run_dir: Path, log_fn, progress: bool) -> Trainer:
    """policy -> regime (on ``env``'s tasks, scored by its verifier) -> optimizer -> Trainer."""
    _seed_everything(cfg.train.seed)
    policy = _policy(cfg.model, progress)
    max_length = min(cfg.train.max_length, policy.max_length or cfg.train.max_length)
    tasks = train_tasks(env, cfg.env, cfg.regime)

    def score_fn(completions, answers):
        return envs.score_batch(env, completions, answers)

    if cfg.regime == "sft":
        replay = None
        if cfg.replay.weight > 0:
            texts = replay_texts(cfg.replay.source if cfg.replay.source != "auto" else retention_source(cfg.model.name))
            replay = ReplayStream(texts, policy.tokenizer, max_length, cfg.replay.pool, cfg.train.seed)
        regime = SFTRegime(tasks, micro_batch=cfg.train.micro_batch, grad_accum=cfg.train.grad_accum,
                           full_batch=cfg.train.full_batch, seed=cfg.train.seed, max_length=max_length,
                           replay=replay, replay_weight=cfg.replay.weight, replay_windows=cfg.replay.windows,
                           segments=env.demonstration_segments)
    else:
        levels = curriculum = None
        if cfg.ppo.curriculum_window > 0:
            levels = curriculum_levels(env, cfg.env)
            curriculum = Curriculum(n_levels=len(levels), start=cfg.ppo.curriculum_start,
                                    window=cfg.ppo.curriculum_window)
        regime = PPORegime(policy, tasks, score_fn, cfg.ppo, micro_batch=cfg.train.micro_batch, seed=cfg.train.seed,
                           max_length=max_length, levels=levels, curriculum=curriculum,
                           protocol=TurnProtocol.of(env))
    groups = [{"params": list(policy.trainable_parameters().values())}]
    if regime.extra_parameters():
        groups.append({"params": list(regime.extra_parameters().values())})
    optimizer = build_optimizer(groups, cfg.optim)
    return Trainer(policy, regime, optimizer, cfg.train, run_dir,
                   scheduler=build_scheduler(optimizer, cfg.optim, cfg.train.steps),
                   prober=Prober(cfg.probe) if cfg.probe.every > 0 else None,
                   eval_tasks=env.tasks("test", cfg.env.n_eval) if cfg.env.n_eval else [], score_fn=score_fn,
                   retention_fn=_retention_fn(cfg), log_fn=log_fn, grad_clip=cfg.optim.grad_clip,
                   progress=progress, lineage=_lineage(cfg, run_dir),
                   controller=build_controller(optimizer, cfg.optim.schedule, cfg.optim.control, cfg.train.seed),
                   eval_protocol=TurnProtocol.of(env))


def _retention_fn(cfg: RunConfig):
    """policy -> {retention/perplexity, retention/loss} on the lineage's held-out text; None when switched off."""
    if cfg.train.retention_tokens <= 0:
        return None
    texts = list(_retention_texts(retention_source(cfg.model.name)))
    if not texts:
        return None

    def retention(pol) -> dict[str, float]:
        ppl = perplexity(pol.model, pol.tokenizer, texts, max_tokens=cfg.train.retention_tokens)
        return {"retention/perplexity": ppl, "retention/loss": math.log(ppl)}

    return retention


def _lineage(cfg: RunConfig, run_dir: Path) -> dict:
    """What the saved final policy records about where it came from (see experiments.lineage)."""
    return {"base_model": lineage_name(cfg.model.name),
            "retention_source": lineage_name(retention_source(cfg.model.name)),
            "run": str(run_dir.resolve()), "regime": cfg.regime, "lora_rank": cfg.model.lora_rank}


def replace(cfg: RunConfig, **sections) -> RunConfig:
    """``replace(cfg, optim={"lr": 0.1}, train={"steps": 10}, name="x")``: nested dataclasses.replace."""
    updates = {}
    for key, value in sections.items():
        current = getattr(cfg, key)
        updates[key] = dataclasses.replace(current, **value) if isinstance(value, dict) else value
    return dataclasses.replace(cfg, **updates)
