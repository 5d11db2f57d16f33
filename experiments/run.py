"""One run = one frozen ``RunConfig`` -> one run directory (see CONTRACTS.md for the layout).

``validate(cfg)`` checks everything that can be checked without loading a model and raises one ``ConfigError`` that
lists every problem. ``run(cfg)`` validates, writes ``config.json`` (resolved config, git hash, argv), builds the
policy (``model.name == "embedded"`` = the offline default of agents.embedded), the env's train / test tasks, the
regime (SFT or PPO; LoRA is ``model.lora_rank > 0`` with either), the optimizer and the prober, and hands them to
``agents.trainer.Trainer``. One process at a time owns a run dir (an flock on ``LOCK_FILE``; a second one gets
``RunDirBusy``). A run whose directory holds ``DONE`` is skipped when the config is the same and is an error when it
differs; otherwise it resumes from the latest intact checkpoint. Resuming with a changed LR, batch size, step count,
cadence or probe config is allowed and recorded in ``config.json["resumed"]``; any other change is an error (use
another ``name``, or ``overwrite=True`` / ``resume=False`` to discard the old run and start over). A run dir that this
call created is removed again when the run cannot be set up (model, device), so failures leave no orphans.

``env.kwargs`` go to every env of the run (``gym.make(env_id, **kwargs)``: train/eval tasks and the verifier that
scores PPO rollouts and eval); they are checked against the env class's keyword arguments before anything loads.
Forgetting (``retention/...``) is always measured on the held-out text of the *original* pre-trained model: the
saved final policy carries ``LINEAGE_FILE`` (base model, retention source), followed through warm-start chains.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

from agents.optim import OptimConfig
from agents.optim import config_errors as optim_errors
from agents.ppo import PPOConfig
from agents.ppo import config_errors as ppo_errors
from agents.trainer import FINAL_MODEL, LINEAGE_FILE, TrainConfig, write_json
from probes import ProbeConfig

REGIMES = ("sft", "rl")
# Fields that may differ when resuming a run dir (section.field); everything else defines the trajectory.
RESUMABLE_CHANGES = ("optim.lr", "train.steps", "train.micro_batch", "train.grad_accum", "train.eval_every",
                     "train.retention_every", "train.checkpoint_every", "train.divergence_loss",
                     "train.n_samples", "train.save_model", "probe.", "wandb")
# Fields that never change what a run dir holds: they locate it or say how to treat an existing one.
NOT_COMPARED = ("out_dir", "name", "overwrite")
LOCK_FILE = ".lock"  # in the run dir: flock-ed by the process that runs it


@dataclass(frozen=True)
class ModelConfig:
    name: str = "embedded"          # "embedded" = offline default from agents.embedded; else a local path or hub name
    lora_rank: int = 0              # 0 = full fine-tuning; >0 = peft LoRA adapters only
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ()   # empty = architecture default (GPT-NeoX: every attention/MLP linear)
    dtype: str = "float32"
    device: str = "auto"            # "auto" = cuda when available, else cpu; or any torch device string


@dataclass(frozen=True)
class EnvConfig:
    env_id: str = "ArithRLVR-v0"
    # training set: the first n_train tasks of the train split's pool (None = the whole pool); full-batch GD uses
    # all of it. Pools (envs.core.pool_of) are disjoint hash parts of the train split: "sft" (80 %) and "rl" (20 %),
    # so RL after SFT trains on problems the SFT data never held; "auto" = the regime's own pool, "all" = both.
    n_train: int | None = None
    pool: str = "auto"
    n_eval: int = 500               # held-out test-split tasks for eval/accuracy
    # keyword arguments of gym.make(env_id, ...) for every env of the run (train/eval tasks, rewards), e.g.
    # {"path": "alpaca.json"} for AlpacaSFT-v0, {"max_digits": 3, "ops": "+-*"} for ArithRLVR-v0;
    # CLI: --env.kwargs path alpaca.json max_digits 3. A dict, so EnvConfig/RunConfig are not hashable.
    kwargs: dict[str, int | float | bool | str] = field(default_factory=dict)


@dataclass(frozen=True)
class RunConfig:
    regime: str = "sft"             # "sft" | "rl"   (LoRA = model.lora_rank > 0, with either regime)
    model: ModelConfig = field(default_factory=ModelConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    out_dir: str = "runs"
    name: str | None = None         # default: derived from regime, env, optimizer, lr, batch, lora rank, seed
    wandb: bool = False             # offline wandb logging when True (WANDB_MODE overrides)
    overwrite: bool = False         # discard an existing run dir of this name (finished or not) and start over


def default_config(command: str) -> RunConfig:
    """The defaults of ``eoslab sft | lora | rl``: one source for the CLI, the benchmarks and the studies.

    Chosen by measurement on the embedded model and ArithRLVR-v0 (experiments/bench/learnability.py, README):

    * sft: AdamW 1e-3, batch 64 (16 x 4), 1000 steps, 50 warm-up steps then cosine decay. Constant AdamW 1e-3
      reached 0.51 / 0.78 / 0.79 held-out after 250 / 500 / 750 steps and this schedule 0.97 after 1000; the seed's
      SGD (momentum 0.9, weight decay 1e-4, batch 16) at 0.05 reached 0.21 after 3000 steps. The EoS studies keep
      constant LRs of their own; this default is for a policy that learns.
    * lora: the same at 3e-3 (rank 8: 0.80 held-out after 1000 steps).
    * rl: PPO from the "rl" pool, AdamW 1e-4, rollouts at temperature 0.7 (8 prompts x 4 samples): at 1.0 the
      samples of a partly trained policy are almost all wrong (reward 0.03 at greedy accuracy 0.25) and groups
      carry no signal; from that policy AdamW 1e-4 at 0.7 gained +0.065 held-out in 250 steps (KL 0.03), while 3e-4
      collapsed a 0.15 policy to 0.01 within 50 steps (KL 0.21).
    """
    sft = RunConfig(regime="sft",
                    optim=OptimConfig(name="adamw", lr=1e-3, weight_decay=0.0, schedule="cosine", warmup_steps=50),
                    train=TrainConfig(steps=1000, micro_batch=16, grad_accum=4, eval_every=250, retention_every=250))
    if command == "sft":
        return sft
    if command == "lora":
        return dataclasses.replace(sft, model=ModelConfig(lora_rank=8),
                                   optim=dataclasses.replace(sft.optim, lr=3e-3))
    if command == "rl":
        return RunConfig(regime="rl", optim=OptimConfig(name="adamw", lr=1e-4, weight_decay=0.0),
                         ppo=PPOConfig(temperature=0.7),
                         train=TrainConfig(steps=300, micro_batch=8, grad_accum=1, eval_every=50, retention_every=100))
    raise ValueError(f"unknown command {command!r}; choose sft, lora or rl")


class ConfigError(ValueError):
    """A RunConfig that cannot run; the message lists every problem found."""


class RunDirBusy(RuntimeError):
    """Another live process holds the run dir's lock."""


def run_name(cfg: RunConfig) -> str:
    """``name`` or e.g. ``sft-ArithRLVR-v0-sgd-lr0.01-b16-r0-s0`` (``gd`` = full batch; rl: prompts x group)."""
    if cfg.name:
        return cfg.name
    if cfg.regime == "rl":
        batch = f"p{cfg.ppo.prompts_per_step}x{cfg.ppo.group_size}"
    else:
        batch = "gd" if cfg.train.full_batch else f"b{cfg.train.micro_batch * cfg.train.grad_accum}"
    return (f"{cfg.regime}-{cfg.env.env_id}{_kwargs_tag(cfg.env.kwargs)}-{cfg.optim.name}-lr{cfg.optim.lr:g}-{batch}"
            f"-r{cfg.model.lora_rank}-s{cfg.train.seed}")


def _kwargs_tag(kwargs: dict) -> str:
    """"" without env kwargs, else "-k" + 8 hex of their sorted JSON (values may hold paths; config.json has them)."""
    if not kwargs:
        return ""
    return "-k" + hashlib.sha256(json.dumps(kwargs, sort_keys=True).encode()).hexdigest()[:8]


def _model_errors(m: ModelConfig) -> list[str]:
    import torch

    errors = []
    if m.lora_rank < 0:
        errors.append(f"model.lora_rank={m.lora_rank} must be >= 0 (0 = full fine-tuning)")
    if not m.lora_alpha > 0:
        errors.append(f"model.lora_alpha={m.lora_alpha} must be > 0")
    if m.lora_targets and m.lora_rank == 0:
        errors.append("model.lora_targets is set but model.lora_rank is 0 (LoRA off)")
    if not isinstance(getattr(torch, m.dtype, None), torch.dtype) or not getattr(torch, m.dtype).is_floating_point:
        errors.append(f"model.dtype={m.dtype!r} is not a torch floating dtype (e.g. 'float32', 'bfloat16')")
    if m.device != "auto":
        try:
            device = torch.device(m.device)
        except (RuntimeError, TypeError):
            errors.append(f"model.device={m.device!r} is not a torch device (e.g. 'auto', 'cpu', 'cuda:0')")
        else:
            errors += _device_errors(device, m.device)
    if m.name != "embedded" and Path(m.name).exists():
        errors += _model_dir_errors(Path(m.name))
    if m.name != "embedded" and not Path(m.name).exists():
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")
        if offline or not re.fullmatch(r"[\w.\-]+(/[\w.\-]+)?", m.name):
            errors.append(f"model.name={m.name!r} is neither 'embedded' nor an existing local directory"
                          + (" (HF_HUB_OFFLINE is set, so hub names cannot be fetched)" if offline else ""))
    return errors


def _device_errors(device, name: str) -> list[str]:
    """``device`` must exist on this machine (a missing accelerator fails here, before anything loads)."""
    import torch

    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            return [f"model.device={name!r} but CUDA is not available here (use 'auto' or 'cpu')"]
        if device.index is not None and device.index >= count:
            return [f"model.device={name!r} but only {count} CUDA device(s) exist"]
    if device.type == "mps" and not torch.backends.mps.is_available():
        return [f"model.device={name!r} but MPS is not available here (use 'auto' or 'cpu')"]
    return []


def _model_dir_errors(path: Path) -> list[str]:
    """A local model.name must be a save_pretrained directory: a readable config.json (adapter_config.json for a
    LoRA save) and weights whose safetensors headers parse. Reads headers only, no tensors."""
    label = f"model.name={str(path)!r}"
    if not path.is_dir():
        return [f"{label} is a file; expected a model directory (save_pretrained output)"]
    config = next((path / f for f in ("config.json", "adapter_config.json") if (path / f).is_file()), None)
    if config is None:
        return [f"{label} has no config.json (not a save_pretrained model directory)"]
    try:
        json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return [f"{label}: {config.name} is not valid JSON ({e})"]
    weights = sorted(path.glob("*.safetensors"))
    if not weights and not any(path.glob("*.bin")):
        return [f"{label} has no weights (*.safetensors or *.bin)"]
    from safetensors import safe_open

    for w in weights:
        try:
            with safe_open(str(w), framework="pt") as f:
                f.keys()
        except Exception as e:  # noqa: BLE001 - any parse failure means the file is unusable
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            return [f"{label}: {w.name} is not a valid safetensors file ({first})"]
    return []


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


def env_kwarg_names(env_id: str) -> tuple[str, ...]:
    """Keyword arguments ``gym.make(env_id, ...)`` accepts: the named parameters of the env class's ``__init__``
    along its MRO, plus ``ArithConfig``'s knobs for the arithmetic envs (ArithEnv takes them through ``**kwargs``)."""
    import inspect

    import gymnasium as gym

    from envs.arith import ArithConfig, ArithEnv
    from envs.core import TextTaskEnv

    cls = gym.registry[env_id].entry_point
    if isinstance(cls, str):
        module, _, attr = cls.partition(":")
        import importlib

        cls = getattr(importlib.import_module(module), attr)
    names: set[str] = set()
    for klass in cls.__mro__:
        if not (isinstance(klass, type) and issubclass(klass, TextTaskEnv)):
            continue
        for p in inspect.signature(klass.__init__).parameters.values():
            if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                names.add(p.name)
    if issubclass(cls, ArithEnv):
        names |= {f.name for f in dataclasses.fields(ArithConfig)}
    return tuple(sorted(names - set(RUN_CONTROLLED_ENV_KWARGS)))


# set by the run itself (tasks come from the train and test splits in dataset mode), so not user kwargs
RUN_CONTROLLED_ENV_KWARGS = ("split", "render_mode")


def make_env(e: EnvConfig):
    """The run's env (unwrapped TextTaskEnv) with ``e.kwargs``: source of tasks and of the verifier."""
    import envs

    return envs.make_unwrapped(e.env_id, **e.kwargs)


POOLS = ("auto", "all", "sft", "rl")


def train_tasks(env, e: EnvConfig, regime: str) -> list:
    """The run's training set: the first ``e.n_train`` tasks of the train split whose problem falls in the pool
    (``e.pool``, "auto" = the regime's), in the env's dataset order. ValueError if the pool is too small."""
    from envs.core import pool_of

    pool = regime if e.pool == "auto" else e.pool
    tasks = env.tasks("train")
    if pool != "all":
        tasks = [t for t in tasks if pool_of(env.split_key(t)) == pool]  # twins (1+3, 3+1) share a pool
    if e.n_train is not None:
        if e.n_train > len(tasks):
            raise ValueError(f"env.n_train={e.n_train} exceeds the {len(tasks)} tasks of {e.env_id}'s train split "
                             f"in pool {pool!r}")
        tasks = tasks[:e.n_train]
    return tasks


def _env_errors(e: EnvConfig, regime: str = "sft") -> list[str]:
    import gymnasium as gym

    import envs

    if e.env_id not in gym.registry:
        known = ", ".join(envs.ENV_IDS)
        return [f"env.env_id={e.env_id!r} is not a registered env id (known: {known})"]
    errors = []
    if e.n_train is not None and e.n_train < 1:
        errors.append(f"env.n_train={e.n_train} must be >= 1 (or None: the whole pool)")
    if e.pool not in POOLS:
        errors.append(f"env.pool={e.pool!r} is unknown; choose one of {POOLS}")
    if e.n_eval < 0:
        errors.append(f"env.n_eval={e.n_eval} must be >= 0")
    if not isinstance(e.kwargs, dict) or not all(isinstance(k, str) for k in e.kwargs):
        return errors + [f"env.kwargs={e.kwargs!r} must be a dict with str keys"]
    accepted = env_kwarg_names(e.env_id)
    unknown = sorted(set(e.kwargs) - set(accepted))
    if unknown:
        return errors + [f"env.kwargs {unknown} not accepted by {e.env_id} (accepted: {', '.join(accepted)})"]
    try:
        json.dumps(e.kwargs)
    except TypeError as exc:
        return errors + [f"env.kwargs must be JSON-serialisable (it is recorded in config.json): {exc}"]
    try:
        env = make_env(e)
        if e.n_eval > env.split_size("test"):
            errors.append(f"env.n_eval={e.n_eval} exceeds the {env.split_size('test')} tasks of {e.env_id}'s "
                          "test split")
        if not errors and regime in REGIMES:
            try:
                train_tasks(env, e, regime)
            except ValueError as exc:
                errors.append(str(exc))
    except Exception as exc:  # an env that cannot even be built (bad knob value, missing data file) is a config error
        errors.append(f"env {e.env_id!r} with kwargs {e.kwargs} cannot be built: {type(exc).__name__}: {exc}")
    return errors


def _train_errors(cfg: RunConfig) -> list[str]:
    t, errors = cfg.train, []
    for name in ("steps", "micro_batch", "grad_accum"):
        if getattr(t, name) < 1:
            errors.append(f"train.{name}={getattr(t, name)} must be >= 1")
    for name in ("eval_every", "retention_every", "checkpoint_every", "n_samples", "retention_tokens"):
        if getattr(t, name) < 0:
            errors.append(f"train.{name}={getattr(t, name)} must be >= 0 (0 = only at the start and end)")
    if not (math.isfinite(t.divergence_loss) and t.divergence_loss > 0):
        errors.append(f"train.divergence_loss={t.divergence_loss} must be a finite number > 0")
    if t.max_length < 2:
        errors.append(f"train.max_length={t.max_length} must be >= 2")
    if t.eval_max_new_tokens < 1:
        errors.append(f"train.eval_max_new_tokens={t.eval_max_new_tokens} must be >= 1")
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
    return errors


def validate(cfg: RunConfig) -> None:
    """Raise ConfigError listing every problem with ``cfg``; loads no model and trains nothing."""
    errors = []
    if cfg.regime not in REGIMES:
        errors.append(f"regime={cfg.regime!r} is unknown; choose one of {REGIMES} (LoRA: model.lora_rank > 0)")
    errors += _model_errors(cfg.model)
    errors += _env_errors(cfg.env, cfg.regime)
    errors += [e for e in optim_errors(cfg.optim)]
    errors += _train_errors(cfg)
    if cfg.regime == "rl":
        errors += ppo_errors(cfg.ppo)
    if cfg.name is not None and (not cfg.name or "/" in cfg.name or cfg.name in (".", "..")):
        errors.append(f"name={cfg.name!r} must be a plain directory name")
    if not isinstance(cfg.probe, ProbeConfig):
        errors.append("probe must be a probes.ProbeConfig")
    errors += _out_dir_errors(cfg)
    reported = {e.split("=")[0] for e in errors}
    errors += [e for e in _finite_errors(cfg) if e.split("=")[0] not in reported]
    if errors:
        raise ConfigError("invalid run config:\n  - " + "\n  - ".join(errors))


# ---------------------------------------------------------------------------------------------------- config I/O
def git_hash() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent.parent,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def config_changes(old: dict, new: dict) -> dict[str, list]:
    """{"section.field": [old, new]} for every differing field of two asdict(RunConfig) dicts."""
    a, b = _flatten(json.loads(json.dumps(old))), _flatten(json.loads(json.dumps(new)))
    return {k: [a.get(k), b.get(k)] for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


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


def _check_existing(cfg: RunConfig, run_dir: Path) -> bool:
    """Before anything loads: may ``cfg`` continue in ``run_dir``? True = finished with this very config (skip).

    Raises ConfigError when the dir holds a finished run with another config, a checkpointed run with a change
    outside RESUMABLE_CHANGES, or a checkpoint beyond train.steps."""
    from agents.trainer import latest_checkpoint

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


def _record_config(cfg: RunConfig, run_dir: Path) -> None:
    """Write config.json; on a resume append the changes (checked by ``_check_existing``) to "resumed"."""
    from agents.trainer import latest_checkpoint

    path = run_dir / "config.json"
    new = asdict(cfg)
    resumed = []
    ckpt = latest_checkpoint(run_dir)
    if ckpt is not None and path.exists():
        old = json.loads(path.read_text())
        changes = config_changes(_compared(old["config"]), _compared(new))
        resumed = old.get("resumed", []) + [{"from_step": ckpt[0], "changes": changes, "argv": sys.argv,
                                             "git_hash": git_hash()}]
    write_json(path, {"config": new, "git_hash": git_hash(), "argv": sys.argv, "resumed": resumed})


@contextlib.contextmanager
def run_dir_lock(run_dir: Path):
    """Hold an exclusive flock on ``run_dir/LOCK_FILE`` for the block; RunDirBusy when another process holds it.

    The kernel releases an flock when its holder exits or is killed, so a crashed run never blocks the next."""
    import fcntl

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


def retention_source(model_name: str) -> str:
    """The pre-trained model whose held-out text measures forgetting for a run starting from ``model_name``.

    A policy saved by a run (``<run>/checkpoints/final_model``) carries ``LINEAGE_FILE`` naming its base model and
    retention source; this follows such files through chains of warm starts (SFT -> RL -> ...) back to the original
    model, so every run of a lineage is scored on the same texts. Any other name is its own source."""
    seen = []
    name = model_name
    while True:
        lineage = Path(name) / LINEAGE_FILE if name != "embedded" else None
        if lineage is not None and lineage.is_file():
            info = json.loads(lineage.read_text())
            if info.get("retention_source"):  # resolved when the policy was saved: robust to moved parents
                return info["retention_source"]
            parent = info["base_model"]
        else:  # a final model saved before lineage files existed: its run's config.json names the base model
            config = Path(name).parent.parent / "config.json" if lineage is not None else None
            if config is None or Path(name).name != Path(FINAL_MODEL).name or not config.is_file():
                return name
            parent = json.loads(config.read_text())["config"]["model"]["name"]
        seen.append(name)
        name = parent
        if name in seen:
            raise ConfigError(f"model lineage of {model_name!r} has a cycle: {' -> '.join(seen + [name])}")


def _lineage_name(model_name: str) -> str:
    """A model name as it will still resolve from another working directory: local paths become absolute."""
    return model_name if model_name == "embedded" or not Path(model_name).exists() else \
        str(Path(model_name).resolve())


@lru_cache(maxsize=4)
def _retention_texts(source: str) -> tuple[str, ...]:
    """Held-out text for forgetting of the pre-trained model ``source`` (see ``retention_source``): the embedded
    model's retention split (prose it never trained on), the ``retention.json`` of a model directory that has one
    (an embedded build), else English prose that no post-training env contains (the Python reference topics of
    ``pydoc_data``), which is instant to load and the same on every machine with the same Python."""
    if source == "embedded":
        from agents.embedded import retention_texts

        return tuple(retention_texts(split="retention"))
    held_out = Path(source) / "retention.json"
    if held_out.is_file():
        return tuple(json.loads(held_out.read_text()))
    from pydoc_data.topics import topics

    return tuple(topics[k] for k in sorted(topics))


def _wandb_logger(cfg: RunConfig, run_dir: Path, name: str):
    import wandb  # lazy: optional dependency at run time

    run = wandb.init(project="eoslab", name=name, id=re.sub(r"[^\w\-]", "_", name)[:64], dir=str(run_dir),
                     config=asdict(cfg), mode=os.environ.get("WANDB_MODE", "offline"), resume="allow")
    return run, lambda row: run.log({k: v for k, v in row.items() if k != "step" and v is not None},
                                    step=row["step"])


# ---------------------------------------------------------------------------------------------------- run
def run(cfg: RunConfig, resume: bool = True, progress: bool = True) -> Path:
    """Train per ``cfg`` into ``out_dir/name``; returns the run dir. Skips a run that has DONE with the same config;
    resumes otherwise. ``resume=False`` (like ``cfg.overwrite``) discards what the run dir holds."""
    validate(cfg)
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
            elif _check_existing(cfg, run_dir):
                return run_dir
            trainer, wandb_run = _build(cfg, run_dir, name, progress)
            _record_config(cfg, run_dir)
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


def _build(cfg: RunConfig, run_dir: Path, name: str, progress: bool):
    """Policy, tasks, regime, optimizer, prober and logger of ``cfg`` -> (Trainer, wandb run or None)."""
    import random

    import numpy as np
    import torch

    import envs
    from agents.optim import build_optimizer, build_scheduler
    from agents.policy import LMPolicy, LoRASpec
    from agents.ppo import PPORegime
    from agents.retention import perplexity
    from agents.sft import SFTRegime
    from agents.trainer import Trainer
    from probes import Prober

    seed = cfg.train.seed
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    if cfg.model.name == "embedded":
        from agents.embedded import embedded_model_path

        path = embedded_model_path(progress=progress)
    else:
        path = cfg.model.name
    lora = LoRASpec(rank=cfg.model.lora_rank, alpha=cfg.model.lora_alpha, targets=tuple(cfg.model.lora_targets))
    device = cfg.model.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        policy = LMPolicy.from_pretrained(path, lora=lora, dtype=cfg.model.dtype, device=device)
    except Exception as e:  # noqa: BLE001 - what validate's header checks cannot see (bad tensors, tokenizer)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ConfigError(f"model.name={cfg.model.name!r} cannot be loaded on {device}: {type(e).__name__}: "
                          f"{first}") from None
    context = policy.max_length or cfg.train.max_length
    max_length = min(cfg.train.max_length, context)

    env = make_env(cfg.env)  # one env with the run's kwargs: tasks and verifier (PPO rewards, eval) both
    tasks = train_tasks(env, cfg.env, cfg.regime)
    eval_tasks = env.tasks("test", cfg.env.n_eval) if cfg.env.n_eval else []

    def score_fn(completions, answers):
        return envs.score_batch(env, completions, answers)

    if cfg.regime == "sft":
        regime = SFTRegime(tasks, micro_batch=cfg.train.micro_batch, grad_accum=cfg.train.grad_accum,
                           full_batch=cfg.train.full_batch, seed=seed, max_length=max_length)
    else:
        regime = PPORegime(policy, tasks, score_fn, cfg.ppo, micro_batch=cfg.train.micro_batch, seed=seed,
                           max_length=max_length)
    groups = [{"params": list(policy.trainable_parameters().values())}]
    extra = getattr(regime, "extra_parameters", dict)()
    if extra:
        groups.append({"params": list(extra.values())})
    optimizer = build_optimizer(groups, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.steps)
    prober = Prober(cfg.probe) if cfg.probe.every > 0 else None

    source = retention_source(cfg.model.name)
    texts = list(_retention_texts(source)) if cfg.train.retention_tokens > 0 else []
    lineage = {"base_model": _lineage_name(cfg.model.name), "retention_source": _lineage_name(source),
               "run": str(run_dir.resolve()), "regime": cfg.regime, "lora_rank": cfg.model.lora_rank}

    def retention(pol) -> dict[str, float]:
        ppl = perplexity(pol.model, pol.tokenizer, texts, max_tokens=cfg.train.retention_tokens)
        return {"retention/perplexity": ppl, "retention/loss": math.log(ppl)}

    wandb_run, log_fn = (None, None)
    if cfg.wandb:
        wandb_run, log_fn = _wandb_logger(cfg, run_dir, name)
    trainer = Trainer(policy, regime, optimizer, cfg.train, run_dir, scheduler=scheduler, prober=prober,
                      eval_tasks=eval_tasks, score_fn=score_fn, retention_fn=retention if texts else None,
                      log_fn=log_fn, grad_clip=cfg.optim.grad_clip, progress=progress, lineage=lineage)
    return trainer, wandb_run


def replace(cfg: RunConfig, **sections) -> RunConfig:
    """``replace(cfg, optim={"lr": 0.1}, train={"steps": 10}, name="x")``: nested dataclasses.replace."""
    updates = {}
    for key, value in sections.items():
        current = getattr(cfg, key)
        updates[key] = dataclasses.replace(current, **value) if isinstance(value, dict) else value
    return dataclasses.replace(cfg, **updates)
