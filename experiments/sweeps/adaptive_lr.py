"""Does the EoS LR controller (optim.schedule eos) beat tuned baselines? Controller vs a constant-LR grid (so the best
constant is known) vs warm-up + cosine vs CDAT (Roulet et al. 2024, σ = 2 "on edge"), ≥ 3 seeds each.

Two parts:
- ``SWEEP`` (``eoslab sweep adaptive_lr``): the embedded LM in SFT, LoRA (rank 8) and RLVR (from a 150-step SFT
  warm start), each from its ``default_config`` (AdamW; the controller aims at ρ × the Adam threshold on the
  preconditioned sharpness; eos and cdat start from the middle LR of the constant grid).
  Probes every 100 steps in every arm (equal overhead); the controller's own cost is in ``optim/est_*``.
- ``COHEN`` (``python -m experiments.sweeps.adaptive_lr``): the Cohen et al. 2021 tanh MLP under full-batch GD,
  500 steps; prints final loss at equal steps and at equal compute (500 G, G = one full-batch gradient; a step
  costs 1 G, the controller's graph builds 1.3 G and HVPs 1.6 G each, the tanh-MLP costs measured in
  probes/hvp.py), mean ± 95% t-CI over seeds, and the measured wall-clock per run (``train/seconds``: the
  controller included, diagnostic probes excluded; noisy on a shared CPU).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

import numpy as np

from agents.eos_lr import ControlConfig
from experiments.cohen2021 import CohenConfig, run_cohen
from experiments.rundirs import load_run
from experiments.run import RunConfig, default_config, replace, warm_start_config
from experiments.sweep import WARM_START, Sweep
from probes import ProbeConfig
from probes.sharpness import t_quantile

SEEDS = (0, 1, 2)


def _arms(base: RunConfig, tag: str, lrs: tuple[float, ...], warmup: int) -> list[RunConfig]:
    """constant at each of ``lrs``; cosine (with ``warmup``), eos (ρ = 0.9; Rayleigh and critical sharpness) and cdat
    (σ = 2) from the middle lr.
    RLVR's eos arm has no spike back-off: its PPO loss hovers near 0 with either sign (ControlConfig.spike)."""
    mid = lrs[len(lrs) // 2]
    spike = 0.0 if base.regime == "rl" else ControlConfig().spike
    arms = [(f"const-lr{lr:g}", {"lr": lr, "schedule": "constant", "warmup_steps": 0}) for lr in lrs]
    arms += [(f"cosine-lr{mid:g}", {"lr": mid, "schedule": "cosine", "warmup_steps": warmup}),
             (f"eos0.9-lr{mid:g}", {"lr": mid, "schedule": "eos", "warmup_steps": 0,
                                    "control": ControlConfig(target=0.9, every=10, spike=spike)}),
             (f"eos0.9-critical-lr{mid:g}", {"lr": mid, "schedule": "eos", "warmup_steps": 0,
                                             "control": ControlConfig(target=0.9, every=10, spike=spike,
                                                                      estimator="critical")}),
             (f"cdat2-lr{mid:g}", {"lr": mid, "schedule": "cdat", "warmup_steps": 0,
                                   "control": ControlConfig(cdat_scale=2.0, every=1)})]
    base = replace(base, probe=ProbeConfig(every=100, batch_sharpness_every=0))
    return [replace(base, optim=optim, train={"seed": seed}, name=f"{tag}-{arm}-s{seed}")
            for arm, optim in arms for seed in SEEDS]


_SFT = replace(default_config("sft"), train={"steps": 500})
_LORA = replace(default_config("lora"), train={"steps": 500})
# RLVR from the lab's warm start (150 SFT steps), as in the README's learnability table: from the base the reward is ~0
_WARM = warm_start_config()
_RL = replace(default_config("rl"), model={"name": WARM_START}, train={"steps": 300})
SWEEP = Sweep("adaptive_lr", tuple(_arms(_SFT, "sft", (3e-4, 1e-3, 3e-3), warmup=50)
                                   + _arms(_LORA, "lora", (1e-3, 3e-3, 1e-2), warmup=50)
                                   + _arms(_RL, "rl", (3e-5, 1e-4, 3e-4), warmup=10)), __doc__, warm_start=_WARM)


# ---- the Cohen MLP part ------------------------------------------------------------------------------------------
def cohen_configs(out_dir: str = "runs/adaptive_lr/cohen", steps: int = 500, seeds=SEEDS) -> dict[str, list]:
    """arm -> CohenConfigs over seeds: constant grid, warm-up + cosine, eos at ρ ∈ {0.5, 0.8, 0.9, 1.0, 1.5} (k = 5),
    eos on critical sharpness at ρ ∈ {0.5, 0.8, 1.0} (k = 5), cdat σ ∈ {1, 2} (every step)."""
    base = CohenConfig(steps=steps, eig_every=50, out_dir=out_dir)
    arms = {f"const-lr{lr:g}": dict(lr=lr) for lr in (0.1, 0.2, 0.3, 0.45, 0.6, 0.8, 1.0, 1.3, 1.6)}
    arms.update({f"cosine-lr{lr:g}-w50": dict(lr=lr, schedule="cosine", warmup_steps=50) for lr in (0.6, 1.0, 1.6)})
    arms.update({f"eos{rho:g}": dict(lr=0.3, schedule="eos", control=ControlConfig(target=rho, every=5))
                 for rho in (0.5, 0.8, 0.9, 1.0, 1.5)})  # 1.5: above the edge, exploratory
    arms.update({f"eos{rho:g}-critical": dict(lr=0.3, schedule="eos",
                                              control=ControlConfig(target=rho, every=5, estimator="critical"))
                 for rho in (0.5, 0.8, 1.0)})
    arms.update({f"cdat{s:g}": dict(lr=0.3, schedule="cdat", control=ControlConfig(cdat_scale=s, every=1))
                 for s in (1.0, 2.0)})
    return {arm: [dataclasses.replace(base, seed=seed, **kw) for seed in seeds] for arm, kw in arms.items()}


def _mean_ci(xs: list[float]) -> tuple[float, float]:

    n = len(xs)
    mean = sum(xs) / n
    if n < 2:
        return mean, math.inf
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    return mean, t_quantile(0.975, n - 1) * sd / math.sqrt(n)


def paired_ratio(xs: list[float], base: list[float]) -> tuple[float, float, float]:
    """(ratio, lo, hi): the geometric mean over seeds of xs[s]/base[s] with its 95 % t-interval (computed on the
    log ratios, paired by seed). NaN for an empty or non-finite pair list; (r, -inf, inf) bounds for one seed."""
    logs = [math.log(x / b) for x, b in zip(xs, base) if 0 < x < math.inf and 0 < b < math.inf]
    if not logs or len(logs) < len(xs):
        return math.nan, math.nan, math.nan
    m, h = _mean_ci(logs)
    return math.exp(m), math.exp(m - h), math.exp(m + h)


GRAPH_COST, HVP_COST = 1.3, 1.6   # in G on the tanh MLP (cached graph; probes/hvp.py)
FORWARD_COST = 1 / 3              # a forward pass, the usual third of a forward + backward (critical sharpness)


def run_cohen_part(out_dir: str = "runs/adaptive_lr/cohen", steps: int = 500, echo=print) -> dict[str, dict]:
    """Run (or reuse) every Cohen config; returns arm -> {loss, loss_ci, loss_at_C, loss_at_C_ci, seconds,
    est_hvps, diverged, x_best, x_best_ci} and echoes a table. C = ``steps`` G of compute (what a plain GD run
    spends). x_best: the final loss over that of the best constant arm (lowest mean final loss), paired by seed."""
    runs = {arm: [load_run(run_cohen(c)) for c in cfgs] for arm, cfgs in cohen_configs(out_dir, steps).items()}
    out, finals = {}, {}
    for arm, rs in runs.items():
        final, at_t, secs, hvps, diverged = [], [], [], [], 0
        for r in rs:
            s, loss = r.series("train/loss")
            _, sec = r.series("train/seconds")
            diverged += r.status.get("status") != "completed"
            final.append(float(loss[-1]) if r.status.get("status") == "completed" else math.inf)
            cost = s.astype(float)   # G spent before the row of step t: t steps + the controller's estimates
            if "optim/est_hvps" in r.records[0]:
                sh, h = r.series("optim/est_hvps")
                _, gr = r.series("optim/est_grads")
                fw = r.series("optim/est_forwards")[1] if r.has("optim/est_forwards") else np.zeros_like(h)
                extra = {int(t): HVP_COST * a + GRAPH_COST * b + FORWARD_COST * f for t, a, b, f in zip(sh, h, gr, fw)}
                cost = cost + np.cumsum([0.0] + [extra.get(int(t), 0.0) for t in s[:-1]])
                hvps.append(float(h.sum()))
            within = loss[cost <= steps]
            at_t.append(float(within[-1]) if len(within) and math.isfinite(final[-1]) else math.inf)
            secs.append(float(sec[-1]))
        finals[arm] = final
        m, ci = _mean_ci(final)
        mt, cit = _mean_ci(at_t)
        out[arm] = {"loss": m, "loss_ci": ci, "loss_at_C": mt, "loss_at_C_ci": cit, "seconds": sum(secs) / len(secs),
                    "est_hvps": sum(hvps) / len(hvps) if hvps else 0.0, "diverged": diverged, "n": len(rs)}
    constants = [a for a in out if a.startswith("const-") and math.isfinite(out[a]["loss"])]
    best = min(constants, key=lambda a: out[a]["loss"]) if constants else None
    for arm, o in out.items():
        r, lo, hi = paired_ratio(finals[arm], finals[best]) if best else (math.nan,) * 3
        o.update({"x_best": r, "x_best_ci": [lo, hi], "best_constant": best})
    echo(f"Cohen MLP, full-batch GD, {steps} steps, {len(SEEDS)} seeds (mean ± 95% t-CI); C = {steps} G of compute; "
         f"x best: final loss / {best}'s, paired by seed (geometric mean, 95% t-CI)")
    echo(f"{'arm':<18}{'final loss':>22}{'x best [95% CI]':>24}{'loss at C':>22}{'s/run':>8}{'HVPs':>8}{'div':>5}")
    for arm, o in out.items():
        lo, hi = o["x_best_ci"]
        echo(f"{arm:<18}{o['loss']:>12.4f} ± {o['loss_ci']:<7.4f}{o['x_best']:>8.2f} [{lo:.2f}, {hi:.2f}]  "
             f"{o['loss_at_C']:>12.4f} ± {o['loss_at_C_ci']:<7.4f}{o['seconds']:>8.2f}{o['est_hvps']:>8.0f}"
             f"{o['diverged']:>5}")
    return out


if __name__ == "__main__":
    root = sys.argv[1] if len(sys.argv) > 1 else "runs/adaptive_lr/cohen"
    summary = run_cohen_part(root)
    Path(root, "summary.json").write_text(json.dumps(summary, indent=1))
