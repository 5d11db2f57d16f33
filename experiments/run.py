"""One run = one frozen ``RunConfig`` -> one run directory (see CONTRACTS.md for the layout).

``validate(cfg)`` checks everything that can be checked without loading a model and raises one ``ConfigError`` that
lists every problem. ``run(cfg)`` validates, writes ``config.json`` (resolved config, git hash, argv), builds the
policy (``model.name == "embedded"`` = the offline default of agents.embedded), the env's train / test tasks, the
regime (SFT or PPO; LoRA is ``model.lora_rank > 0`` with either), the optimizer and the prober, and hands them to
``agents.trainer.Trainer``. A run whose directory holds ``DONE`` is skipped; otherwise it resumes from the latest
checkpoint. Resuming with a changed LR, batch size, step count, cadence or probe config is allowed and recorded in
``config.json["resumed"]``; any other change is an error (use another ``name`` or ``resume=False``).
"""

from __future__ import annotations

import dataclasses
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
from agents.trainer import TrainConfig, write_json
from probes import ProbeConfig

REGIMES = ("sft", "rl")
# Fields that may differ when resuming a run dir (section.field); everything else defines the trajectory.
RESUMABLE_CHANGES = ("optim.lr", "train.steps", "train.micro_batch", "train.grad_accum", "train.eval_every",
                     "train.retention_every", "train.checkpoint_every", "train.divergence_loss",
                     "train.n_samples", "train.save_model", "probe.", "wandb")


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
    n_train: int = 256              # fixed training set (train split); full-batch GD uses all of it
    n_eval: int = 64                # held-out test-split tasks for eval/accuracy


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


class ConfigError(ValueError):
    """A RunConfig that cannot run; the message lists every problem found."""


def run_name(cfg: RunConfig) -> str:
    """``name`` or e.g. ``sft-ArithRLVR-v0-sgd-lr0.01-b16-r0-s0`` (``gd`` = full batch; rl: prompts x group)."""
    if cfg.name:
        return cfg.name
    if cfg.regime == "rl":
        batch = f"p{cfg.ppo.prompts_per_step}x{cfg.ppo.group_size}"
    else:
        batch = "gd" if cfg.train.full_batch else f"b{cfg.train.micro_batch * cfg.train.grad_accum}"
    return (f"{cfg.regime}-{cfg.env.env_id}-{cfg.optim.name}-lr{cfg.optim.lr:g}-{batch}"
            f"-r{cfg.model.lora_rank}-s{cfg.train.seed}")


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
            torch.device(m.device)
        except (RuntimeError, TypeError):
            errors.append(f"model.device={m.device!r} is not a torch device (e.g. 'auto', 'cpu', 'cuda:0')")
    if m.name != "embedded" and not Path(m.name).exists():
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")
        if offline or not re.fullmatch(r"[\w.\-]+(/[\w.\-]+)?", m.name):
            errors.append(f"model.name={m.name!r} is neither 'embedded' nor an existing local directory"
                          + (" (HF_HUB_OFFLINE is set, so hub names cannot be fetched)" if offline else ""))
    return errors


def _env_errors(e: EnvConfig) -> list[str]:
    import gymnasium as gym

    import envs

    if e.env_id not in gym.registry:
        known = ", ".join(envs.ENV_IDS)
        return [f"env.env_id={e.env_id!r} is not a registered env id (known: {known})"]
    errors = []
    if e.n_train < 1:
        errors.append(f"env.n_train={e.n_train} must be >= 1")
    if e.n_eval < 0:
        errors.append(f"env.n_eval={e.n_eval} must be >= 0")
    try:
        env = envs.make_unwrapped(e.env_id)
        for split, n in (("train", e.n_train), ("test", e.n_eval)):
            if n > env.split_size(split):
                errors.append(f"env.n_{'train' if split == 'train' else 'eval'}={n} exceeds the "
                              f"{env.split_size(split)} tasks of {e.env_id}'s {split} split")
    except Exception as exc:  # an env that cannot even be built is a config error too
        errors.append(f"env.env_id={e.env_id!r} cannot be built: {type(exc).__name__}: {exc}")
    return errors


def _train_errors(cfg: RunConfig) -> list[str]:
    t, errors = cfg.train, []
    for name in ("steps", "micro_batch", "grad_accum"):
        if getattr(t, name) < 1:
            errors.append(f"train.{name}={getattr(t, name)} must be >= 1")
    for name in ("eval_every", "retention_every", "checkpoint_every", "n_samples", "retention_tokens"):
        if getattr(t, name) < 0:
            errors.append(f"train.{name}={getattr(t, name)} must be >= 0 (0 = only at the start and end)")
    if not (t.divergence_loss > 0 and not math.isnan(t.divergence_loss)):
        errors.append(f"train.divergence_loss={t.divergence_loss} must be > 0")
    if t.max_length < 2:
        errors.append(f"train.max_length={t.max_length} must be >= 2")
    if t.eval_max_new_tokens < 1:
        errors.append(f"train.eval_max_new_tokens={t.eval_max_new_tokens} must be >= 1")
    if t.full_batch:
        if cfg.regime == "rl":
            errors.append("train.full_batch=True is for SFT (full-batch GD over a fixed dataset); "
                          "RL batches are rollouts (set ppo.prompts_per_step instead)")
        elif cfg.env.n_train >= 1 and t.micro_batch >= 1 and cfg.env.n_train % t.micro_batch:
            errors.append(f"train.full_batch=True needs env.n_train ({cfg.env.n_train}) divisible by "
                          f"train.micro_batch ({t.micro_batch}) so every chunk has the same size")
    elif cfg.regime == "sft" and t.micro_batch * t.grad_accum > cfg.env.n_train >= 1:
        errors.append(f"effective batch micro_batch*grad_accum={t.micro_batch * t.grad_accum} exceeds "
                      f"env.n_train={cfg.env.n_train}")
    return errors


def validate(cfg: RunConfig) -> None:
    """Raise ConfigError listing every problem with ``cfg``; loads no model and trains nothing."""
    errors = []
    if cfg.regime not in REGIMES:
        errors.append(f"regime={cfg.regime!r} is unknown; choose one of {REGIMES} (LoRA: model.lora_rank > 0)")
    errors += _model_errors(cfg.model)
    errors += _env_errors(cfg.env)
    errors += [e for e in optim_errors(cfg.optim)]
    errors += _train_errors(cfg)
    if cfg.regime == "rl":
        errors += ppo_errors(cfg.ppo)
    if cfg.name is not None and (not cfg.name or "/" in cfg.name or cfg.name in (".", "..")):
        errors.append(f"name={cfg.name!r} must be a plain directory name")
    if not isinstance(cfg.probe, ProbeConfig):
        errors.append("probe must be a probes.ProbeConfig")
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


def _record_config(cfg: RunConfig, run_dir: Path, resume: bool) -> None:
    """Write config.json; on a resume check that only resumable fields changed and append to "resumed"."""
    from agents.trainer import latest_checkpoint

    path = run_dir / "config.json"
    new = asdict(cfg)
    resumed = []
    ckpt = latest_checkpoint(run_dir) if resume else None
    if ckpt is not None and path.exists():  # without a checkpoint the run starts over, so any change is fine
        old = json.loads(path.read_text())
        changes = config_changes(old["config"], new)
        bad = [k for k in changes if not any(k == r or (r.endswith(".") and k.startswith(r))
                                             for r in RESUMABLE_CHANGES)]
        if bad:
            raise ConfigError(f"run dir {run_dir} holds a run with a different config ({', '.join(bad)}); "
                              "use another name, or resume=False to start over")
        resumed = old.get("resumed", []) + [{"from_step": ckpt[0], "changes": changes, "argv": sys.argv,
                                             "git_hash": git_hash()}]
    write_json(path, {"config": new, "git_hash": git_hash(), "argv": sys.argv, "resumed": resumed})


@lru_cache(maxsize=4)
def _retention_texts(model_name: str) -> tuple[str, ...]:
    """Held-out text for forgetting: the embedded model's retention split (prose it never trained on); for any other
    model, English prose that no post-training env contains (the Python reference topics of ``pydoc_data``),
    which is instant to load and the same on every machine with the same Python."""
    if model_name == "embedded":
        from agents.embedded import retention_texts

        return tuple(retention_texts(split="retention"))
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
    """Train per ``cfg`` into ``out_dir/name``; returns the run dir. Skips a run that has DONE; resumes otherwise."""
    validate(cfg)
    name = run_name(cfg)
    run_dir = Path(cfg.out_dir) / name
    if resume and (run_dir / "DONE").exists():
        return run_dir
    if not resume and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _record_config(cfg, run_dir, resume)

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
    policy = LMPolicy.from_pretrained(path, lora=lora, dtype=cfg.model.dtype, device=device)
    context = policy.max_length or cfg.train.max_length
    max_length = min(cfg.train.max_length, context)

    train_tasks = envs.load_tasks(cfg.env.env_id, "train", cfg.env.n_train)
    eval_tasks = envs.load_tasks(cfg.env.env_id, "test", cfg.env.n_eval) if cfg.env.n_eval else []

    def score_fn(completions, answers):
        return envs.score_batch(cfg.env.env_id, completions, answers)

    if cfg.regime == "sft":
        regime = SFTRegime(train_tasks, micro_batch=cfg.train.micro_batch, grad_accum=cfg.train.grad_accum,
                           full_batch=cfg.train.full_batch, seed=seed, max_length=max_length)
    else:
        regime = PPORegime(policy, train_tasks, score_fn, cfg.ppo, micro_batch=cfg.train.micro_batch, seed=seed,
                           max_length=max_length)
    groups = [{"params": list(policy.trainable_parameters().values())}]
    extra = getattr(regime, "extra_parameters", dict)()
    if extra:
        groups.append({"params": list(extra.values())})
    optimizer = build_optimizer(groups, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.steps)
    prober = Prober(cfg.probe) if cfg.probe.every > 0 else None

    texts = list(_retention_texts(cfg.model.name)) if cfg.train.retention_tokens > 0 else []

    def retention(pol) -> dict[str, float]:
        ppl = perplexity(pol.model, pol.tokenizer, texts, max_tokens=cfg.train.retention_tokens)
        return {"retention/perplexity": ppl, "retention/loss": math.log(ppl)}

    wandb_run, log_fn = (None, None)
    if cfg.wandb:
        wandb_run, log_fn = _wandb_logger(cfg, run_dir, name)
    trainer = Trainer(policy, regime, optimizer, cfg.train, run_dir, scheduler=scheduler, prober=prober,
                      eval_tasks=eval_tasks, score_fn=score_fn, retention_fn=retention if texts else None,
                      log_fn=log_fn, grad_clip=cfg.optim.grad_clip, progress=progress)
    try:
        trainer.train(resume=resume)
    finally:
        if wandb_run is not None:
            wandb_run.finish()
    return run_dir


def replace(cfg: RunConfig, **sections) -> RunConfig:
    """``replace(cfg, optim={"lr": 0.1}, train={"steps": 10}, name="x")``: nested dataclasses.replace."""
    updates = {}
    for key, value in sections.items():
        current = getattr(cfg, key)
        updates[key] = dataclasses.replace(current, **value) if isinstance(value, dict) else value
    return dataclasses.replace(cfg, **updates)
