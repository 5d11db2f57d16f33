"""``eoslab study``: does the Edge of Stability persist in SFT, LoRA and RLVR? One resumable command.

The grid: regimes {SFT full, LoRA r ∈ {4, 16, 64}, RLVR full, RLVR LoRA} × optimizers {full-batch GD, SGD β=0,
SGD β=0.9 wd 1e-4 batch 16 (the user's setup), Adam} × an LR grid × seeds.

Seeds: minibatch runs draw their batches with the seed, LoRA its adapter init, RLVR its rollouts; full-parameter
GD has nothing random (one model, one training set), so its seed s trains on the pool's block [s·n, (s+1)·n) of
``gd_n_train`` tasks (seed 0 on the first, the block its calibration measured λ₀ on).

Full-batch GD for RLVR is skipped: RL's data are on-policy rollouts drawn afresh from the current policy at every
step, so there is no fixed dataset whose full gradient GD could descend (the PPO surrogate is defined on one
rollout buffer, which the next step replaces). Every other pair runs.

The LR grid is placed from each (regime, optimizer)'s measured initial sharpness λ₀ (the calibration), so that
the initial ratio r₀ = λ₀/θ(η) = η·λ₀/c takes the values ``ratios`` (about 0.1 … 3): η = r₀·c/λ₀, where θ(η) = c/η is
the optimizer's stability threshold (probes.thresholds): c = 2 for GD and SGD, 2+2β = 3.8 for heavy ball β = 0.9,
(2+2β₁)/(1−β₁) = 38 for Adam on the preconditioned Hessian.

λ₀ is ``probe/lambda_max`` at step 0 of the starting model (before any update), on the objective the study's run
probes: the whole training set for GD, the fixed probe set (``probe_set_size`` training examples) for minibatch SGD,
the first rollout buffer for RLVR. For Adam it is ``probe/adam_lambda_max`` = λ₁(P^-½HP^-½) after
``adam_calibration_steps`` (20) Adam steps at η = 1e-6: Adam has no preconditioner before its first step, and P
after t steps carries Adam's bias factor (1−β₁ᵗ), which inflates λ by 1/(1−0.9ᵗ) (×2.4 at t = 5, ×1.14 at t = 20,
→ 1 later); at η = 1e-6 the parameters move < 1e-4 in 20 steps, so this is P at θ₀ from the first gradients,
independent of the η being placed. SGD β=0 and β=0.9 share one λ₀ (the same probe set at θ₀; weight decay is not in
the probed loss). Calibrations are cached in OUT/calibration.json with a fingerprint of the run that measured them:
re-running reuses them and runs nothing; a changed config measures again.

Layout (OUT = runs/study/<scale> unless ``--out``): OUT/warm_start/ (RLVR's starting policy, once for every RL sweep,
with its held-out learning curve), OUT/calibration/, OUT/calibration.json, OUT/<regime>-<optimizer>/ (one sweep
each), OUT/rl-learn/ (the learning run: `eoslab rl` at its defaults from the warm start, where ``learn_steps`` > 0),
OUT/report/ (index.html, findings.md, PNGs). Runs go seed-major (every pair at seed 0 first), so a study stopped
part-way has covered every pair at the seeds it reached. Every run is idempotent
and resumable (experiments.sweep): a rerun skips finished runs. ``--backend ray`` runs every run (warm start and
calibrations too) as a Ray task (experiments.backends), retried from its checkpoint when its worker dies.

Scales (runs, steps and the wall-time estimate of ``estimate_seconds``: per-step costs measured on the embedded model
on this 2-core CPU for the README's learnability table and the sft_gd_lr sweep, not a timing of this study):
- demo (what ``make demo`` runs, experiments.demo): SFT and LoRA r16 with GD and the user's SGD, RLVR with the
  user's SGD; r₀ ∈ {0.5, 2}; 1 seed; 60 steps (RL 40), λ_max every 6 steps (RL 4); no learning run (the warm
  start's held-out curve shows learning). Estimated ≈ 9 min on 2 workers (150 s of it RLVR's warm start) after
  the embedded model is built (first use, ~4-5 min).
- small: every regime × optimizer pair (22), r₀ ∈ {0.1, 0.55, 3}, seeds {0, 1, 2}: 198 runs of 150 steps (RL 60),
  λ_max every 15 steps (RL 6) on a 24-example probe set, batch sharpness every 75, and the 100-step learning run.
  Estimated ≈ 2.9 h on 2 workers.
  Full-batch GD on the LM reaches the edge from above within 10-20 steps (experiments/sweeps/sft_gd_lr.py), so
  150 steps leave ≥ 8 probes after it; a run that is still sharpening at its end makes its cell "inconclusive"
  rather than "no" (experiments/findings.py), never a false answer.
- full: the user's setting: Pythia-160m on the Alpaca JSON (SFT/LoRA; ``alpaca_path``), RLVR on InstructRLVR-v0,
  5 LRs with r₀ from 0.1 to 3, 3 seeds, 2000 steps (RL 500): for a GPU or a cluster (``--backend ray --address auto
  --gpus-per-run 0.25``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import tyro

from agents.optim import OptimConfig
from agents.policy import ModelConfig
from agents.ppo import PPOConfig
from agents.replay import ReplayConfig
from agents.trainer import FINAL_MODEL, TrainConfig
from experiments.backends import ExecutorConfig, RaySession, executor_errors
from experiments.report import ReportConfig, write_report
from experiments.run import (NOT_COMPARED, ConfigError, EnvConfig, RunConfig, check_run_dir, comparable_config,
                            default_config, replace, run_name, validate)
from experiments.run import warm_start_config as warm_start_config_of_run
from experiments.rundirs import load_run
from experiments.sweep import Sweep, execute, grid, plan
from probes import ProbeConfig
from probes.thresholds import adam_threshold, gd_threshold, momentum_threshold

# regime name -> (RunConfig.regime, LoRA rank); the names become sweep directory prefixes
REGIMES = {"sft": ("sft", 0), "lora_r4": ("sft", 4), "lora_r16": ("sft", 16), "lora_r64": ("sft", 64),
           "rl": ("rl", 0), "rl_lora_r16": ("rl", 16)}
OPTIMIZERS = ("gd", "sgd", "sgd_m0.9", "adam")
USER_MOMENTUM, USER_WD, BATCH = 0.9, 1e-4, 16  # the user's setup: SGD β = 0.9, weight decay 1e-4, batch 16
ADAM_BETAS = (0.9, 0.999)
# c = η·θ(η): the threshold at η = 1, from the probes' own formulas
EDGE = {"gd": gd_threshold(1.0), "sgd": gd_threshold(1.0), "sgd_m0.9": momentum_threshold(1.0, USER_MOMENTUM),
        "adam": adam_threshold(1.0, ADAM_BETAS[0])}
SKIPPED = {("rl", "gd"): "full-batch GD for RLVR is meaningless: RL's data are on-policy rollouts, resampled every "
                         "step, so there is no fixed dataset to take the full gradient of"}
CALIBRATION_LR = 1e-6  # Adam calibration steps: small enough that θ stays at θ₀ (see the module docstring)

# Per-scale defaults of the fields left at None.
SCALES = {
    "demo": dict(model="embedded", env_id="ArithRLVR-v0", rl_env_id="ArithRLVR-v0",
                 regimes=("sft", "lora_r16", "rl"), optimizers=("gd", "sgd_m0.9"), seeds=(0,), ratios=(0.5, 2.0),
                 steps=60, rl_steps=40, probe_every=6, rl_probe_every=4, probe_set_size=32, gd_n_train=32,
                 batch_sharpness_every=0, n_eval=32, warm_start_steps=150, learn_steps=0, checkpoint_every=0),
    "small": dict(model="embedded", env_id="ArithRLVR-v0", rl_env_id="ArithRLVR-v0",
                  regimes=tuple(REGIMES), optimizers=OPTIMIZERS, seeds=(0, 1, 2), ratios=(0.1, 0.55, 3.0),
                  steps=150, rl_steps=60, probe_every=15, rl_probe_every=6, probe_set_size=24, gd_n_train=32,
                  batch_sharpness_every=75, n_eval=64, warm_start_steps=150, learn_steps=100, checkpoint_every=0),
    "full": dict(model="EleutherAI/pythia-160m", env_id="AlpacaSFT-v0", rl_env_id="InstructRLVR-v0",
                 regimes=tuple(REGIMES), optimizers=OPTIMIZERS, seeds=(0, 1, 2),
                 ratios=tuple(float(f"{r:.2g}") for r in np.geomspace(0.1, 3.0, 5)),
                 steps=2000, rl_steps=500, probe_every=25, rl_probe_every=10, probe_set_size=64, gd_n_train=256,
                 batch_sharpness_every=250, n_eval=200, warm_start_steps=500, learn_steps=0, checkpoint_every=250),
}


@dataclass(frozen=True)
class StudyConfig:
    """The study's grid and budgets; fields left at None take the values of ``scale`` (SCALES)."""

    scale: Literal["demo", "small", "full"] = "demo"  # demo (~9 min CPU), small (all pairs, 3 seeds, ~3 h), full (GPU)
    out: Path | None = None  # runs/study/<scale>: sweeps in OUT/<regime>-<optimizer>/, calibration.json, report/
    workers: int = 2  # parallel runs (local worker processes, or the CPUs of a local Ray)
    executor: Annotated[ExecutorConfig, tyro.conf.OmitArgPrefixes] = field(default_factory=ExecutorConfig)
    dry_run: bool = False  # print the plan (pairs, skips, calibration, LRs when calibrated, time estimate) and exit
    model: str | None = None  # model name or local dir (demo/small: embedded; full: EleutherAI/pythia-160m)
    device: str = "auto"  # model.device of every run (auto, cpu, cuda, cuda:1 ...)
    alpaca_path: str = "alpaca_data.json"  # full scale: the Alpaca JSON that AlpacaSFT-v0 reads for SFT and LoRA
    env_id: str | None = None  # SFT/LoRA env (demo/small: ArithRLVR-v0; full: AlpacaSFT-v0 on alpaca_path)
    rl_env_id: str | None = None  # RLVR env and warm-start data (demo/small: ArithRLVR-v0; full: InstructRLVR-v0)
    regimes: tuple[str, ...] | None = None  # subset of sft, lora_r4, lora_r16, lora_r64, rl, rl_lora_r16
    optimizers: tuple[str, ...] | None = None  # subset of gd, sgd, sgd_m0.9 (the user's), adam
    seeds: tuple[int, ...] | None = None  # train seeds of every cell (small/full: 0 1 2)
    ratios: tuple[float, ...] | None = None  # target initial ratios r₀ = η·λ₀/c; one LR each (about 0.1 … 3)
    steps: int | None = None  # optimizer steps per SFT/LoRA run
    rl_steps: int | None = None  # optimizer steps per RLVR run
    probe_every: int | None = None  # λ_max cadence of SFT/LoRA runs (steps)
    rl_probe_every: int | None = None  # λ_max cadence of RLVR runs (steps)
    probe_set_size: int | None = None  # examples in the fixed probe set of minibatch runs (probe/lambda_max)
    gd_n_train: int | None = None  # training-set size of full-batch GD runs (a multiple of 16)
    batch_sharpness_every: int | None = None  # batch sharpness cadence of minibatch SFT/LoRA runs (0 = off)
    n_eval: int | None = None  # held-out problems scored greedily at the start and end of every run
    warm_start_steps: int | None = None  # SFT steps (AdamW, no probes) of RLVR's starting policy
    learn_steps: int | None = None  # one RLVR run at `eoslab rl`'s defaults from the warm start (learning; 0 = off)
    checkpoint_every: int | None = None  # checkpoint cadence (0 = at the end only: an interrupted run starts over)
    adam_calibration_steps: int = 20  # Adam steps at η = 1e-6 before λ₀ of the preconditioned Hessian is read
    replay_weight: float = 0.0  # SFT replay α (0: plain SFT, the user's; > 0 off-embedded needs replay_source)
    replay_source: str = "auto"  # replay text (auto: the embedded model's; or a JSON list / text file)
    title: str = "Does the Edge of Stability persist in post-training?"  # title of the findings page


def resolve(cfg: StudyConfig) -> StudyConfig:
    """``cfg`` with every None field set from its scale's defaults; ConfigError for an unknown scale."""
    if cfg.scale not in SCALES:
        raise ConfigError(f"study.scale={cfg.scale!r} is unknown; choose one of {tuple(SCALES)}")
    preset = dict(SCALES[cfg.scale], out=Path("runs/study") / cfg.scale)
    return dataclasses.replace(cfg, **{k: v for k, v in preset.items() if getattr(cfg, k) is None})


def config_errors(cfg: StudyConfig) -> list[str]:
    """Problems with a resolved study config (the runs' own configs are validated separately)."""
    errors = []
    if cfg.workers < 1:
        errors.append(f"study.workers={cfg.workers} must be >= 1")
    if bad := [r for r in cfg.regimes if r not in REGIMES]:
        errors.append(f"study.regimes: unknown {bad}; choose from {tuple(REGIMES)}")
    if bad := [o for o in cfg.optimizers if o not in OPTIMIZERS]:
        errors.append(f"study.optimizers: unknown {bad}; choose from {OPTIMIZERS}")
    for name in ("regimes", "optimizers", "seeds", "ratios"):
        if not getattr(cfg, name):
            errors.append(f"study.{name} is empty")
        elif len(set(getattr(cfg, name))) != len(getattr(cfg, name)):
            errors.append(f"study.{name}={getattr(cfg, name)} has duplicates")
    if any(not (math.isfinite(r) and r > 0) for r in cfg.ratios):
        errors.append(f"study.ratios={cfg.ratios} must be finite and > 0")
    for name in ("steps", "rl_steps", "probe_every", "rl_probe_every", "gd_n_train", "warm_start_steps",
                 "adam_calibration_steps"):
        if getattr(cfg, name) < 1:
            errors.append(f"study.{name}={getattr(cfg, name)} must be >= 1")
    if cfg.learn_steps < 0:
        errors.append(f"study.learn_steps={cfg.learn_steps} must be >= 0")
    if cfg.gd_n_train % BATCH:
        errors.append(f"study.gd_n_train={cfg.gd_n_train} must be a multiple of {BATCH} (GD's chunks)")
    errors += [f"study.{e}" for e in executor_errors(cfg.executor)]
    if not errors and not pairs(cfg):
        errors.append("study: no regime × optimizer pair left to run")
    return errors


def pairs(cfg: StudyConfig) -> list[tuple[str, str]]:
    """The (regime, optimizer) pairs that run, in order; SKIPPED ones left out."""
    return [(r, o) for r in cfg.regimes for o in cfg.optimizers if (REGIMES[r][0], o) not in SKIPPED]


def has_rlvr(cfg: StudyConfig) -> bool:
    """Whether some pair runs RLVR, which starts from the shared warm start."""
    return any(REGIMES[r][0] == "rl" for r, _ in pairs(cfg))


def learns(cfg: StudyConfig) -> bool:
    """Whether the study runs its learning run (RLVR at `eoslab rl`'s defaults from the warm start)."""
    return cfg.learn_steps > 0 and has_rlvr(cfg)


def skipped(cfg: StudyConfig) -> list[tuple[str, str, str]]:
    """(regime, optimizer, why) for every requested pair that does not run."""
    return [(r, o, SKIPPED[(REGIMES[r][0], o)]) for r in cfg.regimes for o in cfg.optimizers
            if (REGIMES[r][0], o) in SKIPPED]


# ---------------------------------------------------------------------------------------------------- run configs
def warm_start_dir(cfg: StudyConfig) -> Path:
    return Path(cfg.out) / "warm_start"


def warm_start_config(cfg: StudyConfig) -> RunConfig:
    """RLVR's starting policy: experiments.run.warm_start_config on the RL env, in the study's out dir; held-out
    accuracy every 50 steps, its SFT learning curve."""
    return replace(warm_start_config_of_run(cfg.warm_start_steps), out_dir=str(warm_start_dir(cfg)),
                   model={"name": cfg.model, "device": cfg.device},
                   env=EnvConfig(env_id=cfg.rl_env_id, n_eval=cfg.n_eval),
                   train={"eval_every": 50, "retention_every": 0, "retention_tokens": 4096,
                          "checkpoint_every": cfg.checkpoint_every, "n_samples": 4})


LEARN = "rl-learn"  # sweep of the learning run


def learn_config(cfg: StudyConfig) -> RunConfig:
    """The learning run: `eoslab rl` at its defaults (AdamW 1e-4, 32 prompts × 8 samples, no probes) for
    ``learn_steps`` from the warm start, held-out accuracy every 25 steps. The EoS grids run constant, often large
    LRs for a few dozen steps; this run shows what the same starting policy learns at the lab's RLVR default
    (+0.16 to +0.21 held-out in 300 steps, experiments.run.default_config)."""
    return replace(default_config("rl"), model={"name": str(warm_model(cfg)), "device": cfg.device},
                   env=EnvConfig(env_id=cfg.rl_env_id, n_eval=cfg.n_eval), probe=ProbeConfig(every=0),
                   train={"steps": cfg.learn_steps, "eval_every": 25, "retention_every": 0,
                          "retention_tokens": 4096, "checkpoint_every": cfg.checkpoint_every, "n_samples": 4,
                          "save_model": False})


def _optim(optimizer: str, lr: float = 1e-2) -> OptimConfig:
    if optimizer == "adam":
        return OptimConfig(name="adam", lr=lr, weight_decay=0.0, betas=ADAM_BETAS)
    if optimizer == "sgd_m0.9":
        return OptimConfig(name="sgd", lr=lr, momentum=USER_MOMENTUM, weight_decay=USER_WD)
    return OptimConfig(name="sgd", lr=lr, momentum=0.0, weight_decay=0.0)  # gd, sgd: plain (stochastic) GD


def base_config(cfg: StudyConfig, regime: str, optimizer: str) -> RunConfig:
    """The run config of one (regime, optimizer) pair at a placeholder η (the grid sets η and the seed)."""
    kind, rank = REGIMES[regime]
    gd = optimizer == "gd"
    model = ModelConfig(name=cfg.model, device=cfg.device, lora_rank=rank)
    # probes: λ_max of the fixed set (and of the batch) at a steady cadence; tol 1e-2 (λ to ~1 % once warm-started;
    # a cold solve read 6 % low on the tiny test model) saves HVPs, the calibration solves at 1e-3. The cheap traces
    # are off: their cost on a 2-core CPU buys no decision of the study. The batch's λ_max and step sharpness stay
    # on, as in every study run so far (no finding reads them, but finished runs are matched by their config), and
    # so does the eigenvalue stop of cold solves (cold_stop="": the first solve of each run; the residual rule, the
    # default since, would make every finished run a new one)
    probe = ProbeConfig(every=cfg.rl_probe_every if kind == "rl" else cfg.probe_every, tol=1e-2,
                        probe_set_size=cfg.probe_set_size, rayleigh_every=0, alignment_every=0, critical_every=0,
                        batch_lambda_max=True, step_sharpness=True, cold_stop="",
                        batch_min_samples=4, batch_max_samples=8,
                        # batch sharpness is the EoSS quantity of minibatch SGD; under GD the batch is the set, and
                        # for RLVR each draw is a fresh rollout (generation): both off
                        batch_sharpness_every=0 if gd or kind == "rl" else cfg.batch_sharpness_every)
    train = TrainConfig(steps=cfg.rl_steps if kind == "rl" else cfg.steps, micro_batch=BATCH, grad_accum=1,
                        full_batch=gd, eval_every=0, retention_every=0, retention_tokens=4096,
                        checkpoint_every=cfg.checkpoint_every, n_samples=4, save_model=False)
    if kind == "rl":
        return RunConfig(regime="rl", model=dataclasses.replace(model, name=str(warm_model(cfg))),
                         env=EnvConfig(env_id=cfg.rl_env_id, n_eval=cfg.n_eval), optim=_optim(optimizer),
                         ppo=PPOConfig(prompts_per_step=4, group_size=4, max_new_tokens=48, temperature=0.7),
                         train=dataclasses.replace(train, micro_batch=8), probe=probe)
    kwargs = {"path": cfg.alpaca_path} if cfg.env_id == "AlpacaSFT-v0" else {}
    env = EnvConfig(env_id=cfg.env_id, kwargs=kwargs, n_eval=cfg.n_eval, n_train=cfg.gd_n_train if gd else None)
    return RunConfig(regime="sft", model=model, env=env, optim=_optim(optimizer), train=train, probe=probe,
                     replay=ReplayConfig(weight=cfg.replay_weight, source=cfg.replay_source))


def warm_model(cfg: StudyConfig) -> Path:
    return warm_start_dir(cfg) / run_name(warm_start_config(cfg)) / FINAL_MODEL


def sweep_name(regime: str, optimizer: str) -> str:
    return f"{regime}-{optimizer}"


# ---------------------------------------------------------------------------------------------------- calibration
def calibration_key(regime: str, optimizer: str) -> str:
    """SGD β = 0 and β = 0.9 measure the same λ₀ (same probe set at θ₀): one key, "sgd"."""
    return f"{regime}/{'sgd' if optimizer == 'sgd_m0.9' else optimizer}"


def calibration_configs(cfg: StudyConfig) -> dict[str, RunConfig]:
    """One short run per calibration key: probes at step 0 (λ₀), or at step k for Adam (see module docstring)."""
    out = {}
    for regime, optimizer in pairs(cfg):
        key = calibration_key(regime, optimizer)
        if key in out:
            continue
        base = base_config(cfg, regime, optimizer)
        adam = optimizer == "adam"
        k = cfg.adam_calibration_steps if adam else 1
        out[key] = replace(base, name=f"calib-{key.replace('/', '-')}", out_dir=str(Path(cfg.out) / "calibration"),
                           optim={"lr": CALIBRATION_LR},
                           env={"n_eval": 0},
                           probe={"every": k, "batch_sharpness_every": 0, "step_sharpness": False,
                                  "update_sharpness": False, "tol": 1e-3},
                           train={"steps": k + 1 if adam else 1, "retention_tokens": 0, "n_samples": 0,
                                  "checkpoint_every": 0, "seed": 0})
    return out


def _calibration_step_and_key(c: RunConfig) -> tuple[int, str]:
    return (c.probe.every, "probe/adam_lambda_max") if c.optim.name == "adam" else (0, "probe/lambda_max")


def fingerprint(c: RunConfig, warm: RunConfig | None = None) -> str:
    """Hash of what determines a calibration's value: the run config, less where it is stored, and for RLVR the
    warm start's config (its model path stays the same when the warm start changes). A field added to the configs
    later (experiments.run.ADDED_FIELDS) reads as the value that reproduces the older runs, and the probe settings
    of a probe-less warm start do not count (experiments.run.comparable_config), so neither a new field nor a new
    probe default discards a calibration."""
    def what(x: RunConfig) -> dict:
        return {k: v for k, v in comparable_config(asdict(x)).items() if k not in NOT_COMPARED}
    d = {"run": what(c), "warm_start": what(warm) if c.regime == "rl" and warm is not None else None}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def calibration_path(cfg: StudyConfig) -> Path:
    return Path(cfg.out) / "calibration.json"


def cached_calibration(cfg: StudyConfig) -> dict[str, dict]:
    """The entries of OUT/calibration.json whose fingerprint matches this study's calibration run (others: stale)."""
    path = calibration_path(cfg)
    if not path.exists():
        return {}
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}
    want = {k: fingerprint(c, warm_start_config(cfg)) for k, c in calibration_configs(cfg).items()}
    return {k: v for k, v in saved.items() if k in want and v.get("fingerprint") == want[k]}


def calibrate(cfg: StudyConfig, echo=print) -> dict[str, float]:
    """λ₀ per calibration key: cached values where valid, else measured by the short runs (on ``workers``)."""
    cfg = resolve(cfg)
    configs = calibration_configs(cfg)
    cached = cached_calibration(cfg)
    todo = {k: c for k, c in configs.items() if k not in cached}
    for key, c in todo.items():  # a finished calibration of another config is stale: measured again in its place
        run_dir = Path(c.out_dir) / run_name(c)
        if (run_dir / "DONE").exists():
            try:
                check_run_dir(c, run_dir)
            except ConfigError:
                todo[key] = replace(c, overwrite=True)
    if todo:
        echo(f"calibration: measuring λ₀ for {', '.join(todo)} ({len(cached)} cached)")
        planned = [p for c in todo.values() for p in plan(Sweep("calibration", (c,)), cfg.out)]
        execute(planned, workers=cfg.workers, echo=echo, executor=cfg.executor)
        path = calibration_path(cfg)
        saved = json.loads(path.read_text()) if path.exists() else {}
        for key, c in todo.items():
            step, metric = _calibration_step_and_key(c)
            run_dir = Path(c.out_dir) / run_name(c)
            try:
                steps, values = load_run(run_dir).series(metric)
            except FileNotFoundError:
                steps, values = np.zeros(0), np.zeros(0)
            at = values[steps == step]
            if not len(at) or not at[0] > 0:
                raise RuntimeError(f"calibration {key}: no positive {metric} at step {step} in {run_dir} "
                                   f"(got {at.tolist()}); see its status.json")
            saved[key] = {"lambda0": float(at[0]), "metric": metric, "step": step, "run": str(run_dir),
                          "fingerprint": fingerprint(c, warm_start_config(cfg))}
            cached[key] = saved[key]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(saved, indent=1, sort_keys=True))
    else:
        echo(f"calibration: {len(cached)} λ₀ cached in {calibration_path(cfg)}")
    return {k: float(v["lambda0"]) for k, v in cached.items()}


def lr_grid(lambda0: float, optimizer: str, ratios) -> tuple[float, ...]:
    """η = r₀·c/λ₀ for each target r₀ (3 significant digits, so run names stay readable)."""
    if not lambda0 > 0:
        raise ValueError(f"λ₀={lambda0} must be > 0 to place an LR grid")
    return tuple(float(f"{r * EDGE[optimizer] / lambda0:.3g}") for r in ratios)


# ---------------------------------------------------------------------------------------------------- sweeps
def study_sweeps(cfg: StudyConfig, calibration: dict[str, float]) -> list[Sweep]:
    """One Sweep per (regime, optimizer) pair: the LR grid placed from ``calibration`` (λ₀ per calibration_key)
    × seeds. KeyError names a pair without a calibration."""
    cfg = resolve(cfg)
    sweeps = []
    for regime, optimizer in pairs(cfg):
        key = calibration_key(regime, optimizer)
        if key not in calibration:
            raise KeyError(f"no calibration for {key}")
        lrs = lr_grid(calibration[key], optimizer, cfg.ratios)
        metric = "λ₁(P^-½HP^-½)" if optimizer == "adam" else "λ_max"
        desc = (f"{regime} × {optimizer}: λ₀ = {calibration[key]:.4g} ({metric}), edge θ = {EDGE[optimizer]:g}/η, "
                f"r₀ = η·λ₀/{EDGE[optimizer]:g} ∈ {{{', '.join(f'{r:g}' for r in cfg.ratios)}}}")
        configs = grid(base_config(cfg, regime, optimizer), lrs=lrs, seeds=cfg.seeds)
        if optimizer == "gd" and REGIMES[regime][1] == 0:
            # full-parameter GD from one model on one set is deterministic: its seed would change nothing, so each
            # seed trains on its own block of the pool (seed 0 on the first, as the calibration measured)
            configs = [replace(c, env={"offset": c.train.seed * cfg.gd_n_train}) for c in configs]
        sweeps.append(Sweep(sweep_name(regime, optimizer), configs, desc))
    return sweeps


# ---------------------------------------------------------------------------------------------------- cost model
# Seconds on one core of this 2-core CPU for the embedded model (README learnability table: batch 64 SFT ≈ 0.8 s/step
# and the user's batch-16 SGD 0.33 s/step with evals; sft_gd_lr: full-batch GD on 64 examples ≈ 2.5 s/step with a
# tol-1e-3 λ_max every 10 steps; RLVR 8×4 rollouts ≈ 1.9 s/step). A step ≈ 0.1 s + 0.0125 s per example (0.9 s at
# 64, 0.3 s at 16); a λ_max probe at tol 1e-2, warm-started, ≈ 0.1 s per example probed. An estimate for planning,
# not a timing of this study.
SEC_PER_STEP = 0.1
SEC_PER_EXAMPLE_STEP = 0.0125
SEC_PER_PROBED_EXAMPLE = 0.1
SEC_PER_RL_SAMPLE_STEP = 0.06
SEC_PER_RUN = 6.0  # process start, model load, start/end evals of a few dozen problems
SEC_PER_LEARN_STEP = 3.7  # `eoslab rl` at its defaults (32 prompts × 8 samples), README learnability table


def estimate_seconds(cfg: StudyConfig, sweeps: list[Sweep] | None = None) -> float:
    """Wall-clock estimate of the whole study on ``workers`` cores from the constants above (embedded model)."""
    cfg = resolve(cfg)
    sweeps = study_sweeps(cfg, {calibration_key(r, o): 1.0 for r, o in pairs(cfg)}) if sweeps is None else sweeps
    total = 0.0
    for s in sweeps:
        for c in s.configs:
            if c.regime == "rl":
                n, probed = c.ppo.prompts_per_step * c.ppo.group_size, c.ppo.prompts_per_step * c.ppo.group_size
                step = SEC_PER_STEP + n * SEC_PER_RL_SAMPLE_STEP
            else:
                n = c.env.n_train if c.train.full_batch else c.train.micro_batch * c.train.grad_accum
                probed = n if c.train.full_batch else c.probe.probe_set_size + n  # the set and the batch
                step = SEC_PER_STEP + n * SEC_PER_EXAMPLE_STEP
            probes = (c.train.steps - 1) // c.probe.every + 1  # at steps 0, every, ... < steps
            if c.optim.name == "adam":  # one more solve, of the preconditioned Hessian on the probe set
                probed += c.probe.probe_set_size if c.regime == "sft" and not c.train.full_batch else n
            bs = (c.train.steps - 1) // c.probe.batch_sharpness_every + 1 if c.probe.batch_sharpness_every else 0
            total += (SEC_PER_RUN + c.train.steps * step + probes * probed * SEC_PER_PROBED_EXAMPLE
                      + bs * c.probe.batch_max_samples * n * 2 * SEC_PER_EXAMPLE_STEP)
    calib = len(calibration_configs(cfg)) * (SEC_PER_RUN + 64 * SEC_PER_PROBED_EXAMPLE)
    warm = (cfg.warm_start_steps * (SEC_PER_STEP + 64 * SEC_PER_EXAMPLE_STEP) + SEC_PER_RUN) if has_rlvr(cfg) else 0.0
    learn = (SEC_PER_RUN + cfg.learn_steps * SEC_PER_LEARN_STEP) if learns(cfg) else 0.0
    return warm + (calib + total + learn) / cfg.workers


# ---------------------------------------------------------------------------------------------------- the study
def check(cfg: StudyConfig) -> None:
    """ConfigError listing every problem with the study and with each of its run configs, before any training."""
    errors = config_errors(cfg)
    if errors:
        raise ConfigError("invalid study config:\n  - " + "\n  - ".join(errors))
    configs = list(calibration_configs(cfg).values()) + [base_config(cfg, r, o) for r, o in pairs(cfg)]
    if has_rlvr(cfg):
        configs.append(warm_start_config(cfg))
    if learns(cfg):
        configs.append(learn_config(cfg))
    for c in configs:
        if c.regime == "rl" and not warm_model(cfg).exists():  # the warm start may not exist yet
            c = replace(c, model={"name": cfg.model})
        validate(c)


@dataclass(frozen=True)
class StudyResult:
    index: Path | None  # report/index.html (None after a dry run)
    failed: tuple[Path, ...] = ()  # run dirs whose run raised (diverged runs are results, not failures)


def run_study(cfg: StudyConfig = StudyConfig(), echo=print, extra_report_dirs: tuple[Path, ...] = (),
              before_report=None) -> StudyResult:
    """Calibrate, run every sweep (resumable), write the findings page (report/index.html and findings.md) over
    the sweeps, the warm start and ``extra_report_dirs`` (e.g. the demo's Cohen validation); ``before_report()``,
    if given, runs just before the report is written (the demo waits there for the runs it started beside the
    study). With ``--backend ray`` one Ray session serves the warm start, the calibrations and the sweeps."""
    cfg = resolve(cfg)
    check(cfg)
    if cfg.executor.backend == "ray" and not cfg.dry_run:
        with RaySession(cfg.executor, cfg.workers):  # every execute() below finds Ray running and leaves it be
            return _run_study(cfg, echo, extra_report_dirs, before_report)
    return _run_study(cfg, echo, extra_report_dirs, before_report)


def _run_study(cfg: StudyConfig, echo, extra_report_dirs: tuple[Path, ...], before_report) -> StudyResult:
    t0 = time.perf_counter()

    def say(s: str) -> None:
        echo(f"[{time.perf_counter() - t0:5.0f}s] {s}")

    for r, o, why in skipped(cfg):
        say(f"skip {r} × {o}: {why}")
    if cfg.dry_run:
        cached = cached_calibration(cfg)
        say(f"{len(pairs(cfg))} pairs × {len(cfg.ratios)} LRs × {len(cfg.seeds)} seeds; "
            f"calibration: {len(cached)}/{len(calibration_configs(cfg))} cached; estimated "
            f"{estimate_seconds(cfg) / 60:.0f} min on {cfg.workers} workers (embedded model, this CPU)")
        if len(cached) == len(calibration_configs(cfg)):
            for s in study_sweeps(cfg, {k: v["lambda0"] for k, v in cached.items()}):
                say(f"{s.name}: {s.description}; η ∈ {sorted({c.optim.lr for c in s.configs})}")
        return StudyResult(None)
    if has_rlvr(cfg):
        say("warm start for RLVR")
        res = execute(plan(Sweep("warm_start", (warm_start_config(cfg),)), cfg.out), workers=1, echo=say,
                      executor=cfg.executor)
        if any(r.status not in ("completed", "skipped") for r in res):
            raise RuntimeError(f"the warm start failed: {res}")
    calibration = calibrate(cfg, echo=say)
    sweeps = study_sweeps(cfg, calibration)
    for s in sweeps:
        say(f"{s.name}: {s.description}")
    if learns(cfg):
        sweeps.append(Sweep(LEARN, (learn_config(cfg),), f"learning: `eoslab rl` at its defaults for "
                                                          f"{cfg.learn_steps} steps from the warm start"))
    # seed-major order: a study stopped part-way has covered every pair at the seeds it reached
    planned = sorted((p for s in sweeps for p in plan(s, cfg.out)), key=lambda p: p.config.train.seed)
    say(f"{len(planned)} runs ({sum(p.done for p in planned)} done) on {cfg.workers} workers -> {cfg.out}")
    results = execute(planned, workers=cfg.workers, echo=say, executor=cfg.executor)
    # how each LR grid was placed, and what was skipped: read from the calibration and the plan, not written here
    def lrs(s: Sweep) -> str:
        return ", ".join(f"{lr:g}" for lr in sorted({c.optim.lr for c in s.configs}))

    notes = tuple(f"{s.name}: {s.description}; η ∈ {{{lrs(s)}}}" for s in sweeps) + \
        tuple(f"skipped {r} × {o}: {why}" for r, o, why in skipped(cfg))
    if before_report is not None:
        before_report()
    index = write_report([Path(cfg.out) / s.name for s in sweeps] + [warm_start_dir(cfg)] * has_rlvr(cfg)
                         + list(extra_report_dirs),
                         ReportConfig(out=Path(cfg.out) / "report", title=cfg.title, notes=notes))
    found = json.loads((index.parent / "findings.json").read_text())
    for a in found.get("regimes", []):
        say(f"{a['statement']}")
    for r in results:
        if r.status == "error":
            say(f"FAILED {r.run_dir}: {r.error}")
    say(f"report: {index.resolve()} (Markdown: {(index.parent / 'findings.md').resolve()})")
    return StudyResult(index, tuple(r.run_dir for r in results if r.status == "error"))
