"""λ_max speed, side by side in one run: probes (warm-startable LOBPCG on a cached-graph HVP) vs
hessian-eigenthings (Lanczos, which="LA") vs PyHessian (power iteration), same model, batch and loss.

For each solver: HVPs and wall time to reach λ_max within ``rel_acc`` of a tight reference (probes at tol 1e-7).
- "probes (own stop rule)" stops by its relative residual ‖Hx − θx‖ ≤ rel_acc·|θ|, which it can check (the
  solver's and the Prober's default; it overshoots, λ to ~1e-6); "probes eigenvalue stop" uses
  ``stop="eigenvalue"`` (Kato–Temple estimate ‖r‖²/gap, see probes/eigs.py), "g start" also starts from the
  gradient, free from the cached graph;
- the others get *oracle* stopping (the first iterate within ``rel_acc`` of the reference, found by re-running
  Lanczos with growing step counts and by watching every power-iteration Rayleigh quotient), which favours them;
  "probes (oracle stop)" applies the same oracle to our solver; the last two rows run the libraries as a user
  would (Lanczos with a fixed 20 steps; PyHessian's own stop rule), accuracy as it comes;
- "probes warm start" is the Prober's steady state: one small step later, starting from the last eigenvector
  (neither hessian-eigenthings' ``lanczos`` nor PyHessian take a start vector), against a cold solve there.
Timed solves run round-robin (``repeats`` rounds, minimum kept) because the CPUs are shared.
Also prints the cost of one HVP in gradient units (G = one forward + backward on the batch) for each HVP mode.

Run: ``python experiments/bench/probe_speed.py [--hidden 128 --layers 4 --vocab 4096 --device cpu]``.
hessian-eigenthings and PyHessian are optional (``pip install hessian-eigenthings pyhessian``); a missing one is
reported and skipped.
"""
from __future__ import annotations

import importlib
import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from probes import HessianOperator, top_eigenvalues
from probes.testing import neox_batch, neox_loss_fn, tiny_neox


@dataclass(frozen=True)
class BenchConfig:
    hidden: int = 128          # the embedded model's width, heads and vocabulary
    layers: int = 4
    heads: int = 4
    vocab: int = 4096
    batch: int = 16
    seq: int = 64
    chunk: int = 16            # one chunk by default: PyHessian's cached mode takes a single batch
    pretrain_steps: int = 30   # a few Adam steps on the batch so the spectrum has outliers, as in training
    rel_acc: float = 1e-3
    device: str = "cpu"
    seed: int = 0
    repeats: int = 3
    seeds: int = 5             # start vectors for the HVP-count table (one draw decides ±2 HVPs at 1e-3)
    cost_reps: int = 7


# A solver is prepared once (searching for its oracle budget if it needs one), then timed:
# solve() -> (hvps, value). Preparation returns the solve function or an error string.
Solve = Callable[[], tuple[int, float]]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def setup(cfg: BenchConfig):
    device = torch.device(cfg.device)
    model = tiny_neox(hidden=cfg.hidden, layers=cfg.layers, vocab=cfg.vocab, heads=cfg.heads, seed=cfg.seed)
    model = model.to(device)
    chunks = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in c.items()}
              for c in neox_batch(cfg.batch, cfg.seq, cfg.vocab, cfg.chunk, seed=cfg.seed + 1)]
    loss_fn = neox_loss_fn(model)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(cfg.pretrain_steps):
        opt.zero_grad()
        sum(loss_fn(c) for c in chunks).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    model.eval()
    return device, model, dict(model.named_parameters()), loss_fn, chunks, opt


def adam_steps(model, loss_fn, chunks, opt, steps):
    for _ in range(steps):
        opt.zero_grad()
        sum(loss_fn(c) for c in chunks).backward()
        opt.step()
    model.zero_grad(set_to_none=True)


def reference(params, loss_fn, chunks, model):
    res = top_eigenvalues(HessianOperator(params, loss_fn, chunks, model=model), k=1, tol=1e-7, max_hvps=400)
    return float(res.values[0]), res


def ours(params, loss_fn, chunks, model, tol, budget=200, init=None, stop="residual",
         gradient_start=False, seed=0) -> Solve:
    """``gradient_start``: start from the probe-batch gradient, which the cached graph holds for free (the top
    Hessian eigenvectors dominate it in training, Gur-Ari et al. 2018)."""
    def solve():
        op = HessianOperator(params, loss_fn, chunks, model=model)
        start = op.gradient() if gradient_start and init is None else init
        res = top_eigenvalues(op, k=1, tol=tol, max_hvps=budget, init=start, stop=stop,
                              generator=torch.Generator().manual_seed(seed))
        return res.hvps, float(res.values[0])
    return solve


def ours_oracle(params, loss_fn, chunks, model, ref, rel_acc, max_hvps=60) -> Solve | str:
    # The iterates are deterministic, so the budget-b run is a prefix of every longer one.
    for budget in range(1, max_hvps + 1):
        solve = ours(params, loss_fn, chunks, model, tol=1e-12, budget=budget)
        if abs(solve()[1] - ref) <= rel_acc * abs(ref):
            return solve
    return f"not within {rel_acc:g} in {max_hvps} HVPs"


def het_lanczos(model, loss_fn, chunks, ref, rel_acc, max_steps=60, fixed_steps: int | None = None,
                seed=0) -> Solve | str:
    """Oracle step count, or ``fixed_steps`` (its lanczos has no early stop; 20 steps is what a user must pick
    for k=1, research §B6)."""
    try:
        import hessian_eigenthings as het
    except ImportError as err:
        return f"hessian-eigenthings not installed ({err}); pip install hessian-eigenthings"
    n_chunks = len(chunks)
    # HET averages batches with equal weight; our chunk losses sum to the batch loss, so scale by the chunk count.
    op = het.HessianOperator(model, chunks, lambda m, c: n_chunks * loss_fn(c), full_dataset=True)
    counted = {"n": 0}
    matvec = op.matvec

    def counting(v):
        counted["n"] += 1
        return matvec(v)
    op.matvec = counting

    def run(steps):
        counted["n"] = 0
        with sdpa_kernel(SDPBackend.MATH):   # SDPA's fused CPU kernel has no double backward
            res = het.lanczos(op, k=1, max_iter=steps, which="LA", seed=seed, reorthogonalize=True)
        return counted["n"], float(res.eigenvalues[0])
    if fixed_steps is not None:
        return lambda: run(fixed_steps)
    # Its lanczos has no early stop: the smallest step count that lands within rel_acc.
    for steps in range(2, max_steps + 1):
        if abs(run(steps)[1] - ref) <= rel_acc * abs(ref):
            return lambda: run(steps)
    return f"Lanczos not within {rel_acc:g} in {max_steps} steps"


class _Reached(Exception):
    pass


def pyhessian_power(model, loss_fn, chunks, device, ref, rel_acc, max_iter=300, own_stop=False,
                    seed=0) -> Solve | str:
    """Oracle stop (first Rayleigh quotient within rel_acc), or with ``own_stop`` its defaults: maxIter=100 and
    stop when the eigenvalue changes by < 1e-3 relative."""
    try:
        # the module itself: the package __init__ shadows the name pyhessian.hessian with the class
        ph = importlib.import_module("pyhessian.hessian")
    except ImportError as err:
        return f"PyHessian not installed ({err}); pip install pyhessian"
    # PyHessian takes (model, criterion, (inputs, targets)) as one batch: the whole probe batch at once.
    ids = torch.cat([c["input_ids"] for c in chunks])
    labels = torch.cat([c["labels"] for c in chunks])
    full = {"input_ids": ids, "labels": labels, "n_tokens": chunks[0]["n_tokens"]}

    class Passthrough(torch.nn.Module):   # PyHessian calls criterion(model(x), y); our closure runs the model
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x):
            return x

    hvp = ph.hessian_vector_product

    def solve():
        count = {"n": 0}

        def recording(gradsH, params, v):
            out = hvp(gradsH, params, v)
            count["n"] += 1
            count["value"] = sum(float((a * b).sum()) for a, b in zip(out, v))   # PyHessian's Rayleigh quotient
            if not own_stop and abs(count["value"] - ref) <= rel_acc * abs(ref):
                raise _Reached
            return out
        ph.hessian_vector_product = recording
        torch.manual_seed(seed)   # PyHessian draws its start vector from the global RNG
        try:
            with sdpa_kernel(SDPBackend.MATH):
                h = ph.hessian(Passthrough(), lambda out, tgt: loss_fn(full), data=(ids, labels),
                               cuda=device.type == "cuda")
                values, _ = h.eigenvalues(maxIter=100, tol=1e-3, top_n=1) if own_stop else \
                    h.eigenvalues(maxIter=max_iter, tol=1e-12, top_n=1)
                count["value"] = float(values[0])
        except _Reached:
            pass
        finally:
            ph.hessian_vector_product = hvp
            model.zero_grad(set_to_none=True)   # PyHessian leaves create_graph gradients in .grad
        return count["n"], count.get("value", math.nan)
    if own_stop:
        return solve
    n, value = solve()
    if not abs(value - ref) <= rel_acc * abs(ref):
        return (f"power iteration not within {rel_acc:g} in {n} HVPs (it converges to the largest |λ|, and slowly "
                "when λ₁ ≈ λ₂)")
    return solve


def hvp_counts(params, loss_fn, chunks, model, device, ref, rel_acc, seeds) -> dict[str, list[int]]:
    """HVPs to rel_acc over several random start vectors (the timed tables use one draw, and a start vector with a
    large top-eigenvector component saves Lanczos or LOBPCG 1–2 HVPs: a lottery, not a property of a solver)."""
    counts: dict[str, list[int]] = {}
    for seed in range(seeds):
        runs = {"probes, own stop rule (residual)": ours(params, loss_fn, chunks, model, rel_acc, seed=seed),
                "probes, eigenvalue stop": ours(params, loss_fn, chunks, model, rel_acc, stop="eigenvalue", seed=seed),
                "hessian-eigenthings LA (oracle)": het_lanczos(model, loss_fn, chunks, ref, rel_acc, seed=seed),
                "pyhessian power (oracle)": pyhessian_power(model, loss_fn, chunks, device, ref, rel_acc, seed=seed)}
        for name, solve in runs.items():
            if isinstance(solve, str):
                continue
            hvps, value = solve()
            ok = abs(value - ref) <= rel_acc * abs(ref)
            counts.setdefault(name, []).append(hvps if ok else -hvps)   # negative: missed rel_acc
    return counts


def round_robin(solvers: dict[str, Solve], device, repeats) -> dict[str, dict]:
    best = {name: {"seconds": math.inf} for name in solvers}
    for _ in range(repeats):
        for name, solve in solvers.items():
            _sync(device)
            t0 = time.perf_counter()
            hvps, value = solve()
            _sync(device)
            t = time.perf_counter() - t0
            if t < best[name]["seconds"]:
                best[name] = {"seconds": t, "hvps": hvps, "value": value}
    return best


def hvp_costs(params, loss_fn, chunks, model, device, reps):
    """Median seconds of one gradient and one HVP per mode, interleaved; returned in gradient units."""
    plist = list(params.values())
    v = torch.randn(sum(p.numel() for p in plist), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ops = {m: HessianOperator(params, loss_fn, chunks, mode=m, model=model) for m in ("cache", "recompute", "fd")}
    ops["cache"].matvec(v)   # build the graph once, outside the timing (that is what caching buys)
    # fd perturbs θ in place between the cache HVPs; it restores θ without a _version bump, so the graph survives
    # (before that fix every timed cache HVP silently included a graph rebuild: 3.1 G "cache" vs 3.2 G recompute).
    times = {k: [] for k in ("gradient", "cache", "recompute", "fd")}
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        with sdpa_kernel(SDPBackend.MATH):
            torch.autograd.grad(sum(loss_fn(c) for c in chunks), plist)
        _sync(device)
        times["gradient"].append(time.perf_counter() - t0)
        for m, op in ops.items():
            t0 = time.perf_counter()
            op.matvec(v)
            _sync(device)
            times[m].append(time.perf_counter() - t0)
    if ops["cache"].gradient_evals != 1:
        raise RuntimeError(f"cache graph was rebuilt {ops['cache'].gradient_evals - 1} times during the timing")
    g = statistics.median(times["gradient"])
    return g, {m: statistics.median(times[m]) / g for m in ("cache", "recompute", "fd")}


def _print_table(title, rows, ref, base):
    print(title)
    print(f"{'solver':34s} {'HVPs':>5s} {'seconds':>8s} {'rel err':>9s} {'time vs ours':>12s} {'HVPs vs ours':>12s}")
    for name, r in rows.items():
        if isinstance(r, str):
            print(f"{name:34s} skipped: {r}")
            continue
        print(f"{name:34s} {r['hvps']:5d} {r['seconds']:8.2f} {abs(r['value'] - ref) / abs(ref):9.1e} "
              f"{r['seconds'] / base['seconds']:11.2f}x {r['hvps'] / base['hvps']:11.2f}x")


def main(cfg: BenchConfig = BenchConfig()) -> dict:
    torch.manual_seed(cfg.seed)
    device, model, params, loss_fn, chunks, opt = setup(cfg)
    n = sum(p.numel() for p in params.values())
    print(f"model: GPT-NeoX hidden={cfg.hidden} layers={cfg.layers} vocab={cfg.vocab}, {n:,} params; "
          f"batch {cfg.batch}x{cfg.seq} tokens in {len(chunks)} chunk(s); device {device}; "
          f"threads {torch.get_num_threads()}")
    ref, ref_res = reference(params, loss_fn, chunks, model)
    print(f"reference λ_max = {ref:.8g} (probes, tol 1e-7, {ref_res.hvps} HVPs)")

    prepared = {"probes (own stop rule)": ours(params, loss_fn, chunks, model, cfg.rel_acc),
                "probes eigenvalue stop": ours(params, loss_fn, chunks, model, cfg.rel_acc, stop="eigenvalue"),
                "probes eigenvalue stop, g start": ours(params, loss_fn, chunks, model, cfg.rel_acc,
                                                        stop="eigenvalue", gradient_start=True),
                "probes (oracle stop)": ours_oracle(params, loss_fn, chunks, model, ref, cfg.rel_acc),
                "hessian-eigenthings LA (oracle)": het_lanczos(model, loss_fn, chunks, ref, cfg.rel_acc),
                "pyhessian power (oracle)": pyhessian_power(model, loss_fn, chunks, device, ref, cfg.rel_acc),
                "hessian-eigenthings, 20 steps": het_lanczos(model, loss_fn, chunks, ref, cfg.rel_acc, fixed_steps=20),
                "pyhessian, own stop rule": pyhessian_power(model, loss_fn, chunks, device, ref, cfg.rel_acc,
                                                            own_stop=True)}
    timed = round_robin({k: v for k, v in prepared.items() if not isinstance(v, str)}, device, cfg.repeats)
    rows = {k: (v if isinstance(v, str) else timed[k]) for k, v in prepared.items()}
    _print_table(f"\nλ_max to {cfg.rel_acc:g} relative accuracy, cold start (min of {cfg.repeats} round-robin runs; "
                 "oracle = stopped at the first iterate within it; last two rows: the libraries as users run them):",
                 rows, ref, rows["probes (own stop rule)"])

    print(f"\nHVPs to {cfg.rel_acc:g} over {cfg.seeds} random start vectors (seeds 0..{cfg.seeds - 1}; negative = "
          "stopped outside the accuracy), at the cold point:")
    counts = hvp_counts(params, loss_fn, chunks, model, device, ref, cfg.rel_acc, cfg.seeds)
    for name, c in counts.items():
        print(f"  {name:40s} mean {statistics.mean(abs(x) for x in c):4.1f}  {c}")

    # Steady state of the Prober: the same training run 1 and then 10 Adam steps later (the Prober's default
    # cadence), warm from the last eigenvector vs cold.
    warm = {}
    for steps in (1, 9):
        vector = top_eigenvalues(HessianOperator(params, loss_fn, chunks, model=model), k=1, tol=cfg.rel_acc).vectors
        adam_steps(model, loss_fn, chunks, opt, steps)
        ref2, _ = reference(params, loss_fn, chunks, model)
        warm = round_robin({"probes cold (own stop rule)": ours(params, loss_fn, chunks, model, cfg.rel_acc),
                            "probes warm start (own stop rule)": ours(params, loss_fn, chunks, model, cfg.rel_acc,
                                                                      init=vector),
                            "probes warm, eigenvalue stop": ours(params, loss_fn, chunks, model, cfg.rel_acc,
                                                                 init=vector, stop="eigenvalue")},
                           device, cfg.repeats)
        _print_table(f"\n{steps} Adam step(s) later (λ_max {ref:.4g} -> {ref2:.4g}): warm start from the previous "
                     "eigenvector", warm, ref2, warm["probes cold (own stop rule)"])
        ref = ref2
    others = {k: v for k, v in rows.items() if not isinstance(v, str) and k in
              ("hessian-eigenthings LA (oracle)", "pyhessian power (oracle)")}
    if others:
        print("\nspeed-up (their seconds / ours; ≥ 2 is the goal), oracle-stopped libraries from the cold table:")
        mine = {"cold, own stop rule (residual)": rows["probes (own stop rule)"],
                "cold, eigenvalue stop": rows["probes eigenvalue stop"],
                "cold, eigenvalue stop, gradient start": rows["probes eigenvalue stop, g start"],
                "warm (10 steps later), residual": warm["probes warm start (own stop rule)"],
                "warm (10 steps later), eigenvalue stop (Prober default)": warm["probes warm, eigenvalue stop"]}
        for name, m in mine.items():
            print(f"  {name:50s} " + "  ".join(f"vs {k.split(' ')[0]} {v['seconds'] / m['seconds']:4.2f}x"
                                              for k, v in others.items()))

    g, costs = hvp_costs(params, loss_fn, chunks, model, device, cfg.cost_reps)
    print(f"\nHVP cost in gradient units (G = {g * 1e3:.1f} ms, median of {cfg.cost_reps}; cache excludes the one-time"
          " graph build):")
    for m, c in costs.items():
        print(f"  {m:10s} {c:5.2f} G")
    return {"cold": rows, "warm": warm, "hvp_counts": counts, "hvp_cost_G": costs}


if __name__ == "__main__":
    import tyro
    main(tyro.cli(BenchConfig))
