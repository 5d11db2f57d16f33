"""Findings of a learning-rate comparison (experiments/sweeps/adaptive_lr.py), computed from run dirs: does a
curvature-driven LR (schedule eos or cdat) beat the best constant LR, at equal steps and at equal compute?

Arms: runs that differ only in their seed (the run name less its ``-s<seed>`` suffix). The best constant is the
constant-LR arm (schedule constant, no warm-up) with the lowest mean final loss. Per arm, over seeds:
- final loss: mean with a Student-t 95 % CI; a diverged run counts as +inf (its arm's mean is inf). The last
  ``train/loss`` where it is the training set's (the Cohen MLP, full-batch GD); for a minibatch LM run the mean over
  its last 10 % of steps (every arm sees the same batches at a step for a seed, so the pairs stay paired). For an
  RLVR run the loss compared is the error rate 1 − ``env/reward_mean`` of its rollouts (the mean over its last 10 %
  of steps), not ``train/loss``: PPO's clipped surrogate is centred by its normalised advantages, so it hovers near 0
  with either sign and says nothing about how well the policy does;
- held-out accuracy (LM runs): the last ``eval/accuracy``, mean with its CI, and Δ acc, the difference from the best
  constant's paired by seed with its t-interval;
- × best: the final loss over the best constant's, paired by seed, as the geometric mean of the per-seed ratios with
  a t-interval on their logs (:func:`paired_ratio`);
- loss at C: the final loss (as above) of the steps whose cumulative compute is within C = ``steps`` gradients (G,
  what a plain run of that length spends), counting a step as 1 G and the controller's estimates as ``HVP_COST``
  per HVP, ``GRAPH_COST`` per graph build and ``FORWARD_COST`` per forward pass (``optim/est_*``); × best at C: that
  over the best constant's final loss, paired by seed.
Rules (statements generated from those numbers, none hard-coded):
- "beats the best constant": the 95 % interval of × best lies below 1; "loses to" it: above 1; else "is not resolved
  from" it (inconclusive with these seeds). The same at equal compute with × best at C.
- held-out accuracy "above" / "below" the best constant's: the 95 % interval of Δ acc lies above / below 0; else
  "not resolved from" it.
Only runs of one experiment are compared (:func:`comparisons` groups by run directory parent and regime).
Costs in G (probes/hvp.py, measured on CPU): a graph build 1.3 G; an HVP 1.6 G on the tanh MLP of the Cohen runs,
2.1 G on GPT-NeoX (LM runs: 2.0–2.2 G); a forward pass ⅓ G.
"""
from __future__ import annotations

import math
import re

import numpy as np

from experiments.rundirs import Run
from probes.sharpness import t_quantile

GRAPH_COST, HVP_COST = 1.3, 1.6   # in G on the tanh MLP (cached graph; probes/hvp.py)
HVP_COST_LM = 2.1                 # in G on GPT-NeoX (cached graph, 2.0–2.2 G; probes/hvp.py)
FORWARD_COST = 1 / 3              # a forward pass, the usual third of a forward + backward (critical sharpness)
TAIL = 0.1                        # share of the last steps whose mean is a minibatch LM run's final loss
CONTROLLED = ("eos", "cdat")


def mean_ci(xs: list[float]) -> tuple[float, float]:
    """(mean, half-width of the 95 % Student-t interval); inf half-width for one value."""
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
    m, h = mean_ci(logs)
    return math.exp(m), math.exp(m - h), math.exp(m + h)


def schedule(run: Run) -> str:
    """The run's LR schedule (Cohen configs hold it at the top level, RunConfigs under optim)."""
    return str(run._get("optim", "schedule", default=None) or run._get("schedule", default="constant"))


def warmup(run: Run) -> int:
    return int(run._get("optim", "warmup_steps", default=None) or run._get("warmup_steps", default=0) or 0)


def is_lm(run: Run) -> bool:
    """An eoslab LM run (a RunConfig: sections model/optim/train), not a Cohen MLP run."""
    return run._get("model", "name", default=None) is not None


def objective(run: Run) -> tuple[str, np.ndarray, np.ndarray]:
    """(name, steps, values) of what the comparison ranks runs by: ``train/loss``, or for RLVR the rollouts' error
    rate 1 − ``env/reward_mean`` (module docstring)."""
    if run.regime == "rl":
        s, reward = run.series("env/reward_mean")
        return "error rate 1 − reward", s, 1.0 - reward
    s, loss = run.series("train/loss")
    return "loss", s, loss


def _last_loss(run: Run, loss: np.ndarray) -> float:
    """The last of ``loss`` (a run's train/loss up to some step), or for a minibatch LM run the mean of its last
    ``TAIL`` share: a single minibatch's loss is too noisy to rank LRs by."""
    if not len(loss):
        return math.inf
    if is_lm(run) and not run._get("train", "full_batch", default=False):
        return float(np.mean(loss[-max(1, int(round(TAIL * len(loss)))):]))
    return float(loss[-1])


def final_loss(run: Run) -> float:
    """``_last_loss`` of the whole run; inf if it did not complete."""
    if run.status.get("status") != "completed":
        return math.inf
    return _last_loss(run, objective(run)[2])


def final_accuracy(run: Run) -> float:
    """The last eval/accuracy (NaN when never evaluated)."""
    _, acc = run.series("eval/accuracy")
    return float(acc[-1]) if len(acc) else math.nan


def paired_difference(xs: list[float], base: list[float]) -> tuple[float, float, float]:
    """(mean, lo, hi) of xs[s] − base[s] over seeds with its 95 % t-interval; NaN when a value is missing."""
    d = [x - b for x, b in zip(xs, base) if math.isfinite(x) and math.isfinite(b)]
    if not d or len(d) < len(xs):
        return math.nan, math.nan, math.nan
    m, h = mean_ci(d)
    return m, m - h, m + h


def arm_and_seed(run: Run) -> tuple[str, int]:
    m = re.fullmatch(r"(.*)-s(\d+)", run.name)
    return (m.group(1), int(m.group(2))) if m else (run.name, 0)


def _at_compute(run: Run, budget: float) -> tuple[float, float]:
    """(loss (the objective) of the last step within ``budget`` G, HVPs the controller spent)."""
    _, s, loss = objective(run)
    cost, hvps = s.astype(float), 0.0
    if run.has("optim/est_hvps"):
        sh, h = run.series("optim/est_hvps")
        gr = np.asarray([r.get("optim/est_grads", 0.0) or 0.0 for r in run.records if "optim/est_hvps" in r])
        fw = np.asarray([r.get("optim/est_forwards", 0.0) or 0.0 for r in run.records if "optim/est_hvps" in r])
        if len(gr) != len(h):
            gr = np.zeros_like(h)
        if len(fw) != len(h):
            fw = np.zeros_like(h)
        hvp_cost = HVP_COST_LM if is_lm(run) else HVP_COST
        extra = {int(t): hvp_cost * a + GRAPH_COST * b + FORWARD_COST * f for t, a, b, f in zip(sh, h, gr, fw)}
        cost = cost + np.cumsum([0.0] + [extra.get(int(t), 0.0) for t in s[:-1]])
        hvps = float(h.sum())
    return _last_loss(run, loss[cost <= budget]), hvps


def lr_comparison(runs: list[Run], steps: int | None = None) -> dict:
    """{"arms": {arm: row}, "best_constant": arm | None, "budget": C, "statements": [...]}; rows: n, loss,
    loss_ci, x_best [ratio, lo, hi], loss_at_C, loss_at_C_ci, x_best_at_C [...], seconds, est_hvps, diverged,
    schedule. ``steps`` (C in G) defaults to the longest run's steps."""
    by: dict[str, list[tuple[int, Run]]] = {}
    for r in runs:
        arm, seed = arm_and_seed(r)
        by.setdefault(arm, []).append((seed, r))
    budget = float(steps if steps is not None else max((r.series("train/loss")[0].max(initial=0) for r in runs),
                                                       default=0))
    what = objective(runs[0])[0] if runs else "loss"
    rows, finals, at_c, accs = {}, {}, {}, {}
    for arm, items in sorted(by.items()):
        items.sort(key=lambda x: x[0])
        final, at, secs, hvps, diverged, acc = [], [], [], [], 0, []
        for _, r in items:
            ok = r.status.get("status") == "completed"
            diverged += not ok
            final.append(final_loss(r))
            acc.append(final_accuracy(r))
            a, h = _at_compute(r, budget)
            at.append(a if ok else math.inf)
            hvps.append(h)
            _, sec = r.series("train/seconds")
            if len(sec):
                secs.append(float(sec[-1]))
        finals[arm], at_c[arm], accs[arm] = final, at, acc
        m, ci = mean_ci(final)
        mt, cit = mean_ci(at)
        ma, cia = mean_ci(acc)
        rows[arm] = {"n": len(items), "schedule": schedule(items[0][1]), "loss": m, "loss_ci": ci,
                     "accuracy": ma, "accuracy_ci": cia,
                     "loss_at_C": mt, "loss_at_C_ci": cit, "seconds": float(np.mean(secs)) if secs else math.nan,
                     "est_hvps": float(np.mean(hvps)), "diverged": diverged,
                     "constant": schedule(items[0][1]) == "constant" and not warmup(items[0][1])}
    constants = [a for a, row in rows.items() if row["constant"] and math.isfinite(row["loss"])]
    best = min(constants, key=lambda a: rows[a]["loss"]) if constants else None
    statements = []
    for arm, row in rows.items():
        row["x_best"] = list(paired_ratio(finals[arm], finals[best])) if best else [math.nan] * 3
        row["x_best_at_C"] = list(paired_ratio(at_c[arm], finals[best])) if best else [math.nan] * 3
        row["d_acc"] = list(paired_difference(accs[arm], accs[best])) if best else [math.nan] * 3
        if best is None or row["schedule"] not in CONTROLLED:
            continue
        d, lo, hi = row["d_acc"]
        if math.isfinite(d):
            verdict = "above" if lo > 0 else "below" if hi < 0 else "not resolved from"
            statements.append({
                "arm": arm, "at": "held-out accuracy", "verdict": verdict,
                "statement": f"{arm}'s held-out accuracy is {verdict} the best constant's ({best}): "
                             f"{row['accuracy']:.3f} vs {rows[best]['accuracy']:.3f}, "
                             f"Δ {d:+.3f} [{lo:+.3f}, {hi:+.3f}] over {row['n']} seeds",
                "rule": "above / below: the 95% interval of the seed-paired accuracy difference lies above / below "
                        "0; else unresolved"})
        for at, key in (("at equal steps", "x_best"), (f"at equal compute ({budget:g} G)", "x_best_at_C")):
            r, lo, hi = row[key]
            verdict = "beats" if hi < 1 else "loses to" if lo > 1 else "is not resolved from"
            statements.append({
                "arm": arm, "at": at, "verdict": verdict,
                "statement": f"{arm} {verdict} the best constant ({best}) {at}: final {what} × {r:.2f} "
                             f"[{lo:.2f}, {hi:.2f}] over {row['n']} seeds"
                             + (f", {row['diverged']} diverged" if row["diverged"] else ""),
                "rule": "beats: the 95% interval of the paired loss ratio lies below 1; loses: above 1; else "
                        "unresolved"})
    return {"arms": rows, "best_constant": best, "budget": budget, "statements": statements, "objective": what}


def comparison_rows(found: dict) -> list[dict]:
    """Table rows (strings) of :func:`lr_comparison` for the report."""
    def ratio(x):
        return "–" if not math.isfinite(x[0]) else f"{x[0]:.2f} [{x[1]:.2f}, {x[2]:.2f}]"

    def accuracy(r):
        if not math.isfinite(r["accuracy"]):
            return {}
        d = r["d_acc"]
        return {"held-out acc": f"{r['accuracy']:.3f} ± {r['accuracy_ci']:.2g}",
                "Δ acc": "–" if not math.isfinite(d[0]) else f"{d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}]"}

    what = found.get("objective", "loss")
    return [{"arm": arm, "schedule": r["schedule"], "seeds": r["n"],
             f"final {what}": f"{r['loss']:.4g} ± {r['loss_ci']:.2g}", "× best": ratio(r["x_best"]),
             f"{what} at {found['budget']:g} G": f"{r['loss_at_C']:.4g} ± {r['loss_at_C_ci']:.2g}",
             "× best at C": ratio(r["x_best_at_C"]), **accuracy(r),
             "HVPs": f"{r['est_hvps']:.0f}", "diverged": r["diverged"]} for arm, r in found["arms"].items()]


def comparisons(runs: list[Run]) -> dict[str, dict]:
    """:func:`lr_comparison` per experiment (runs sharing a parent directory and a regime label) that holds a
    curvature-driven arm and a constant one; keyed "<parent dir name> · <regime>"."""
    groups: dict[tuple, list[Run]] = {}
    for r in runs:
        groups.setdefault((r.path.parent.name, r.label), []).append(r)
    out = {}
    for (parent, label), group in sorted(groups.items()):
        kinds = {schedule(r) for r in group}
        if kinds & set(CONTROLLED) and "constant" in kinds:
            out[f"{parent} · {label}"] = lr_comparison(group)
    return out
