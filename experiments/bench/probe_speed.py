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
- "λ_max along a run" is the Prober's use: ``track_points`` solves ``track_every`` training steps apart (default:
  the Prober's cadence, ``probes.ProbeConfig().every``), with ``track_batch="fixed"`` each on the same frozen batch
  (the probe set, as the Prober's default ``lambda_max`` of SFT and LoRA runs holds it), with ``"fresh"`` each on the
  current minibatch of the training stream (its ``lambda_max_batch``; RLVR's rollout buffer); ours warm from its
  own previous eigenvector, hessian-eigenthings warm from its own previous top Ritz vector through its public
  ``lanczos_tridiagonal(op, v0, max_iter)`` (oracle step count, searched from 1), PyHessian cold (its
  ``eigenvalues`` takes no start vector) with oracle stopping; the first point is cold for all. Totals over the
  points, each solve checked against its point's reference.
Why a single cold solve cannot reach 2× against an oracle-stopped Lanczos: for k=1, LOBPCG's iterates span the
same Krylov space as Lanczos from the same start (identical Ritz values per HVP, checked on this model), so the
HVP counts are equal up to the start vector (the gradient saves ~1), and an exact HVP costs ≥ 2 G (the R-forward
and R-backward passes, 6 matmuls per linear layer). The cold ratio is then at most their per-HVP cost over ours
(3.1 G recomputed vs 2.0 G cached: ~1.5× vs hessian-eigenthings) or their HVP count over ours (power iteration).
Warm starts do not give us the 2× either: hessian-eigenthings takes one too (above), and warm, oracle-stopped, it
needs about our HVP count or fewer (3 points 250 steps apart, 2 rounds, a loaded 2-core machine: 33 vs our 30 on
a 64x2 tiny model, 1.45× [1.24–1.59] their time over ours; 18 vs our 23 on the embedded model, 0.97× [0.93–1.02]).
What is left to us along a run is the per-HVP cost of the cached graph against its oracle stop (the eigenvalue
stop is not a guarantee: a point where it misses ``rel_acc`` shows in the rel-err column).
Minibatches: the cold tables use the first minibatch of the training stream (tiny: ``tiny_batches`` minibatches
of random tokens, Adam for ``pretrain_steps`` steps over them in turn; LM: the SFT stream of the env).
Timed solves run interleaved, round-robin with every other round reversed (A B C, C B A, ...), ``repeats`` rounds;
each table prints the median seconds, and every ratio is paired by round (their round-r time over ours) and
printed as median [min–max] over the rounds, because the CPUs are shared.
Also prints the cost of one HVP in gradient units (G = one forward + backward on the batch) for each HVP mode.

Run: ``python experiments/bench/probe_speed.py [--hidden 128 --layers 4 --vocab 4096 --device cpu]``, or at the
research setting: ``--model embedded [--env-id ArithRLVR-v0 --lr 1e-2]`` (the offline pre-trained default, SFT loss
on the env's demonstrations, SGD with momentum between tracking points). A quick run: ``--track-every 10
--track-points 3 --repeats 2`` (tracking points 10 steps apart are closer than the Prober's, so warm starts gain
more there than they do in a run). ``--no-cold`` runs only the tracking table (and the HVP costs);
``--track-batch fresh`` tracks on fresh minibatches instead of the frozen probe batch.
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

from probes import HessianOperator, ProbeConfig, top_eigenvalues
from probes.testing import neox_batch, neox_loss_fn, tiny_neox

try:
    from experiments.bench.spread import abba, paired_ratios
except ImportError:   # run as a script: python experiments/bench/probe_speed.py
    from spread import abba, paired_ratios


@dataclass(frozen=True)
class BenchConfig:
    hidden: int = 128          # the embedded model's width, heads and vocabulary
    layers: int = 4
    heads: int = 4
    vocab: int = 4096
    batch: int = 16
    seq: int = 64
    chunk: int = 16            # one chunk by default: PyHessian's cached mode takes a single batch
    pretrain_steps: int = 30   # a few Adam steps on the data so the spectrum has outliers, as in training
    tiny_batches: int = 8      # tiny: the training set is this many minibatches of random tokens, streamed in order
    rel_acc: float = 1e-3
    device: str = "cpu"
    seed: int = 0
    repeats: int = 3
    seeds: int = 5             # start vectors for the HVP-count table (one draw decides ±2 HVPs at 1e-3)
    cost_reps: int = 7
    track_points: int = 6      # λ_max along a run: solves this many times (0 = skip) ...
    track_every: int = ProbeConfig().every   # ... this many optimizer steps apart (the Prober's default cadence)
    track_warmup: int = 0      # optimizer steps before the first tracking point (past the start's transient)
    track_batch: str = "fixed"  # "fixed": every point on the frozen probe batch (the Prober's lambda_max);
                                # "fresh": on the current minibatch (its lambda_max_batch, RLVR's rollout buffer)
    cold: bool = True          # False: skip the cold-start tables (only tracking and HVP costs)
    model: str = "tiny"        # "tiny": random GPT-NeoX of the sizes above, Adam-trained on the probe batch;
                               # "embedded" (the offline pre-trained default) or a local model dir: SFT on env_id
    env_id: str = "ArithRLVR-v0"   # LM only: SFT data; batch = examples, in grad_accum chunks
    grad_accum: int = 1
    lr: float = 1e-2           # LM only: SGD momentum 0.9, weight decay 1e-4 between tracking points


# A solver is prepared once (searching for its oracle budget if it needs one), then timed:
# solve() -> (hvps, value). Preparation returns the solve function or an error string.
Solve = Callable[[], tuple[int, float]]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def setup(cfg: BenchConfig):
    """(device, model, named params, loss_fn, probe chunks of the cold tables, next_batch(), advance(steps)):
    ``next_batch`` draws the next minibatch of the training stream (the tracking points probe it, as the Prober's
    lambda_max_batch probes the current batch); ``advance`` trains the model between the tracking points on the
    stream (tiny: Adam on ``tiny_batches`` minibatches of random tokens in turn; embedded: the research setting,
    SGD with momentum 0.9 and weight decay 1e-4 at ``lr`` on fresh SFT batches of the env)."""
    if cfg.model != "tiny":
        return setup_lm(cfg)
    device = torch.device(cfg.device)
    model = tiny_neox(hidden=cfg.hidden, layers=cfg.layers, vocab=cfg.vocab, heads=cfg.heads, seed=cfg.seed)
    model = model.to(device)
    data = [[{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in c.items()}
             for c in neox_batch(cfg.batch, cfg.seq, cfg.vocab, cfg.chunk, seed=cfg.seed + 1 + i)]
            for i in range(max(1, cfg.tiny_batches))]
    cursor = {"i": 0}

    def next_batch():
        cursor["i"] += 1
        return data[(cursor["i"] - 1) % len(data)]
    loss_fn = neox_loss_fn(model)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def advance(steps):
        _train_steps(model, opt, loss_fn, next_batch, steps)
    advance(cfg.pretrain_steps)
    model.eval()
    return device, model, dict(model.named_parameters()), loss_fn, data[0], next_batch, advance


def setup_lm(cfg: BenchConfig):
    from agents.policy import LMPolicy
    from agents.sft import SFTRegime
    from experiments.run import EnvConfig, make_env

    device = torch.device(cfg.device)
    if cfg.model == "embedded":
        from agents.embedded import embedded_model_path
        path = embedded_model_path(progress=False)
    else:
        path = cfg.model
    policy = LMPolicy.from_pretrained(path, device=device)
    tasks = make_env(EnvConfig(env_id=cfg.env_id)).tasks("train", 4096)
    regime = SFTRegime(tasks, micro_batch=cfg.batch // cfg.grad_accum, grad_accum=cfg.grad_accum, seed=cfg.seed)
    chunks, _ = regime.next_batch(policy, 0)   # the frozen probe batch, as the trainer's Prober holds it
    model = policy.model
    model.eval()   # the embedded model has no dropout; eval keeps the libraries' forward identical to ours

    def loss_fn(chunk):
        return regime.loss(policy, chunk)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.SGD(params.values(), lr=cfg.lr, momentum=0.9, weight_decay=1e-4)

    def next_batch():
        return regime.next_batch(policy, 0)[0]

    def advance(steps):
        _train_steps(model, opt, loss_fn, next_batch, steps)
    return device, model, params, loss_fn, chunks, next_batch, advance


def _train_steps(model, opt, loss_fn, next_batch, steps):
    """``steps`` optimizer steps, each on the chunks ``next_batch()`` returns; leaves no gradients behind."""
    for _ in range(steps):
        opt.zero_grad()
        sum(loss_fn(c) for c in next_batch()).backward()
        opt.step()
    model.zero_grad(set_to_none=True)


def reference(params, loss_fn, chunks, model):
    res = top_eigenvalues(HessianOperator(params, loss_fn, chunks, model=model), k=1, tol=1e-7, max_hvps=400)
    return float(res.values[0]), res


def ours(params, loss_fn, chunks, model, tol, budget=200, init=None, stop="residual",
         gradient_start=False, seed=0) -> Solve:
    """``gradient_start``: start from the probe-batch gradient, which the cached graph holds for free (the top
    Hessian eigenvectors dominate it in training, Gur-Ari et al. 2018). ``solve.result`` keeps the last EigResult
    (the tracking table warm-starts from its vectors)."""
    def solve():
        op = HessianOperator(params, loss_fn, chunks, model=model)
        start = op.gradient() if gradient_start and init is None else init
        solve.result = top_eigenvalues(op, k=1, tol=tol, max_hvps=budget, init=start, stop=stop,
                                       generator=torch.Generator().manual_seed(seed))
        return solve.result.hvps, float(solve.result.values[0])
    return solve


def ours_oracle(params, loss_fn, chunks, model, ref, rel_acc, max_hvps=60) -> Solve | str:
    # The iterates are deterministic, so the budget-b run is a prefix of every longer one.
    for budget in range(1, max_hvps + 1):
        solve = ours(params, loss_fn, chunks, model, tol=1e-12, budget=budget)
        if abs(solve()[1] - ref) <= rel_acc * abs(ref):
            return solve
    return f"not within {rel_acc:g} in {max_hvps} HVPs"


def het_lanczos(model, loss_fn, chunks, ref, rel_acc, max_steps=60, fixed_steps: int | None = None,
                seed=0, init: torch.Tensor | None = None) -> Solve | str:
    """Oracle step count, or ``fixed_steps``: its lanczos has no early stop, so a user must fix the step count in
    advance without knowing the oracle's. ``init``: a warm start (its previous top Ritz vector), through its public
    ``lanczos_tridiagonal(op, v0, max_iter)`` (the kernel of its ``lanczos``, which draws v0 at random), the top
    Ritz pair of the tridiagonal computed as its ``lanczos`` does (``which="LA"``); oracle steps searched from 1.
    ``solve.vector`` keeps the last solve's top Ritz vector (the next warm start)."""
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
            if init is None:
                res = het.lanczos(op, k=1, max_iter=steps, which="LA", seed=seed, reorthogonalize=True)
                value, vector = float(res.eigenvalues[0]), res.eigenvectors[0]
            else:
                value, vector = _het_warm(het, op, init, steps)
        run.vector = vector
        return counted["n"], value
    if fixed_steps is not None:
        return _keeping_vector(lambda: run(fixed_steps), run)
    # Its lanczos has no early stop: the smallest step count that lands within rel_acc.
    for steps in range(1 if init is not None else 2, max_steps + 1):
        if abs(run(steps)[1] - ref) <= rel_acc * abs(ref):
            return _keeping_vector(lambda: run(steps), run)
    return f"Lanczos not within {rel_acc:g} in {max_steps} steps"


def _keeping_vector(solve, run):
    def timed():
        out = solve()
        timed.vector = run.vector
        return out
    return timed


def _het_warm(het, op, init, steps):
    """hessian-eigenthings' Lanczos from ``init``: its public tridiagonal kernel, then the largest Ritz pair."""
    td = het.lanczos_tridiagonal(op, init.to(device=op.device, dtype=op.dtype).reshape(-1), steps,
                                 reorthogonalize=True)
    m = td.alphas.shape[0]
    tri = torch.diag(td.alphas)
    if m > 1:
        tri += torch.diag(td.betas[:m - 1], 1) + torch.diag(td.betas[:m - 1], -1)
    theta, s = torch.linalg.eigh(tri)
    top = int(torch.argmax(theta))
    vector = torch.zeros_like(td.basis[0])
    for j, b in enumerate(td.basis):
        vector.add_(b, alpha=float(s[j, top]))
    return float(theta[top]), vector


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
    if len(chunks) == 1:
        full = chunks[0]
    elif "n_tokens" in chunks[0] and "attention_mask" not in chunks[0]:   # probes.testing's equal-length chunks
        full = {"input_ids": torch.cat([c["input_ids"] for c in chunks]),
                "labels": torch.cat([c["labels"] for c in chunks]), "n_tokens": chunks[0]["n_tokens"]}
    else:
        return "PyHessian takes one batch: run with the probe batch in one chunk (--grad-accum 1)"
    ids, labels = full["input_ids"], full["labels"]

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
    """``repeats`` interleaved rounds, every other one reversed (A B C, C B A, ...): {name: {"times": seconds per
    round in round order, "seconds": their median, "hvps", "value"}} (the solves are deterministic: every round
    gives the same HVPs and value)."""
    runs: dict[str, dict] = {name: {"times": []} for name in solvers}
    for name in abba(list(solvers), repeats):
        _sync(device)
        t0 = time.perf_counter()
        hvps, value = solvers[name]()
        _sync(device)
        runs[name]["times"].append(time.perf_counter() - t0)
        runs[name].update(hvps=hvps, value=value)
    for r in runs.values():
        r["seconds"] = statistics.median(r["times"])
    return runs


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


TRACK_OURS = "probes warm start, Prober's rules"     # eigenvalue stop warm, residual cold (ProbeConfig)
TRACK_RESIDUAL = "probes warm start, residual stop"  # ‖r‖ ≤ tol·|θ|: a guaranteed bound on |λ − θ|
TRACK_HET = "hessian-eigenthings LA warm (oracle)"
TRACK_PYH = "pyhessian power (oracle)"


def tracking(cfg: BenchConfig, device, model, params, loss_fn, probe_set, next_batch, advance) -> dict[str, dict]:
    """λ_max along a training run, the Prober's use: ``track_points`` solves ``track_every`` training steps apart,
    each on ``probe_set`` (``cfg.track_batch="fixed"``) or on the next, fresh minibatch of the training stream.
    Ours and hessian-eigenthings start each solve from their own previous eigenvector (the first from a random
    vector); ours with the Prober's default stop rule and with the residual rule, hessian-eigenthings with oracle
    stopping; PyHessian, which takes no start vector, solves cold with oracle stopping at every point. Every solve
    is checked against a tight reference at its point. Per solver: totals over the points, and the total of each
    interleaved round (``round_seconds``), so the ratios pair round r with round r."""
    if cfg.track_points <= 0:
        return {}
    if cfg.track_batch not in ("fixed", "fresh"):
        raise ValueError(f"track_batch must be 'fixed' or 'fresh', got {cfg.track_batch!r}")
    advance(cfg.track_warmup)
    on = "the frozen probe batch" if cfg.track_batch == "fixed" else "a fresh minibatch"
    print(f"\nλ_max along a run: {cfg.track_points} solves, {cfg.track_every} training steps apart "
          f"(ProbeConfig().every = {ProbeConfig().every}), from step {cfg.track_warmup}, each on {on}; "
          f"median seconds of {cfg.repeats} interleaved rounds per point:")
    names = (TRACK_OURS, TRACK_RESIDUAL, TRACK_HET, TRACK_PYH)
    print(f"{'point':>5s} {'λ_max':>9s}   " + "   ".join(f"{n:>24s}" for n in
                                                        ("probes (Prober's rules)", "probes (residual stop)",
                                                         "hessian-eigenthings warm", "pyhessian cold")))
    totals: dict[str, dict] = {}
    prev: dict[str, torch.Tensor | None] = dict.fromkeys(names)
    rules = ProbeConfig()   # the Prober's stop rules: ``stop`` warm, ``cold_stop`` at the first point
    for point in range(cfg.track_points):
        if point:
            advance(cfg.track_every)
        chunks = probe_set if cfg.track_batch == "fixed" else next_batch()
        ref, _ = reference(params, loss_fn, chunks, model)
        prepared = {TRACK_OURS: ours(params, loss_fn, chunks, model, cfg.rel_acc, init=prev[TRACK_OURS],
                                     stop=rules.stop_rule(warm=prev[TRACK_OURS] is not None)),
                    TRACK_RESIDUAL: ours(params, loss_fn, chunks, model, cfg.rel_acc, init=prev[TRACK_RESIDUAL]),
                    TRACK_HET: het_lanczos(model, loss_fn, chunks, ref, cfg.rel_acc, init=prev[TRACK_HET]),
                    TRACK_PYH: pyhessian_power(model, loss_fn, chunks, device, ref, cfg.rel_acc)}
        timed = round_robin({k: v for k, v in prepared.items() if not isinstance(v, str)}, device, cfg.repeats)
        cells = []
        for name in names:
            if name not in timed:
                cells.append(str(prepared[name])[:24].rjust(24))
                continue
            r = timed[name]
            t = totals.setdefault(name, {"seconds": 0.0, "hvps": 0, "max_rel_err": 0.0, "points": 0,
                                         "round_seconds": [0.0] * cfg.repeats})
            err = abs(r["value"] - ref) / abs(ref)
            t["seconds"] += r["seconds"]
            t["round_seconds"] = [a + b for a, b in zip(t["round_seconds"], r["times"])]
            t["hvps"] += r["hvps"]
            t["max_rel_err"] = max(t["max_rel_err"], err)
            t["points"] += 1
            cells.append(f"{r['hvps']:3d} HVP {r['seconds']:5.2f}s {err:7.1e}".rjust(24))
        print(f"{point:5d} {ref:9.4g}   " + "   ".join(cells), flush=True)
        # the next warm starts: each solve's own top eigenvector (PyHessian cannot take one)
        prev[TRACK_OURS] = prepared[TRACK_OURS].result.vectors
        prev[TRACK_RESIDUAL] = prepared[TRACK_RESIDUAL].result.vectors
        if not isinstance(prepared[TRACK_HET], str):
            prev[TRACK_HET] = prepared[TRACK_HET].vector
    print(f"{'total':>15s}   " + "   ".join(f"{t['hvps']:3d} HVP {t['seconds']:5.2f}s {t['max_rel_err']:7.1e}".rjust(24)
                                           for t in totals.values()))
    complete = {k: v for k, v in totals.items() if v["points"] == cfg.track_points}
    return complete


def _print_table(title, rows, ref, base):
    print(title)
    print(f"{'solver':34s} {'HVPs':>5s} {'seconds':>8s} {'rel err':>9s} {'HVPs vs ours':>12s}  time vs ours, paired by "
          "round: median [min–max]")
    for name, r in rows.items():
        if isinstance(r, str):
            print(f"{name:34s} skipped: {r}")
            continue
        print(f"{name:34s} {r['hvps']:5d} {r['seconds']:8.2f} {abs(r['value'] - ref) / abs(ref):9.1e} "
              f"{r['hvps'] / base['hvps']:11.2f}x  {paired_ratios(r['times'], base['times']).fmt('.2f', 'x')}")


def cold_tables(cfg: BenchConfig, device, model, params, loss_fn, chunks) -> dict:
    """The cold-start tables on the first minibatch: every solver's HVPs and seconds to ``rel_acc`` (interleaved
    rounds), then HVP counts over ``cfg.seeds`` random start vectors."""
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
    _print_table(f"\nλ_max to {cfg.rel_acc:g} relative accuracy, cold start (median seconds of {cfg.repeats} "
                 "interleaved rounds; oracle = stopped at the first iterate within it; last two rows: the libraries "
                 "as users run them):",
                 rows, ref, rows["probes (own stop rule)"])

    print(f"\nHVPs to {cfg.rel_acc:g} over {cfg.seeds} random start vectors (seeds 0..{cfg.seeds - 1}; negative = "
          "stopped outside the accuracy), at the cold point:")
    counts = hvp_counts(params, loss_fn, chunks, model, device, ref, cfg.rel_acc, cfg.seeds)
    for name, c in counts.items():
        print(f"  {name:40s} mean {statistics.mean(abs(x) for x in c):4.1f}  {c}")

    return {"reference": ref, "cold": rows, "hvp_counts": counts}


def main(cfg: BenchConfig = BenchConfig()) -> dict:
    torch.manual_seed(cfg.seed)
    device, model, params, loss_fn, chunks, next_batch, advance = setup(cfg)
    n = sum(p.numel() for p in params.values())
    tokens = sum(int(c["input_ids"].numel()) for c in chunks)
    what = (f"{cfg.model} GPT-NeoX ({model.config.num_hidden_layers}x{model.config.hidden_size}), SFT on {cfg.env_id}, "
            f"SGD momentum 0.9 lr {cfg.lr:g} between tracking points" if cfg.model != "tiny" else
            f"random GPT-NeoX hidden={cfg.hidden} layers={cfg.layers} vocab={cfg.vocab}, Adam between tracking points")
    print(f"model: {what}; {n:,} params; probe batch {tokens} tokens in {len(chunks)} chunk(s); device {device}; "
          f"threads {torch.get_num_threads()}")
    cold = cold_tables(cfg, device, model, params, loss_fn, chunks) if cfg.cold else {"cold": {}}
    rows = cold["cold"]
    others = {k: v for k, v in rows.items() if not isinstance(v, str) and k in
              ("hessian-eigenthings LA (oracle)", "pyhessian power (oracle)")}
    track = tracking(cfg, device, model, params, loss_fn, chunks, next_batch, advance)
    theirs = [k for k in (TRACK_HET, TRACK_PYH) if k in track]
    if others or theirs:
        print(f"\nspeed-up (their seconds / ours, paired by interleaved round: median [min–max] over {cfg.repeats} "
              "rounds; ≥ 2 is the goal) and HVPs (theirs / ours) against the oracle-stopped libraries:")
        mine = {"cold, own stop rule (residual)": "probes (own stop rule)",
                "cold, eigenvalue stop": "probes eigenvalue stop",
                "cold, eigenvalue stop, lambda_max(init='gradient')": "probes eigenvalue stop, g start"}
        for name, row in mine.items() if others else ():
            m = rows[row]
            print(f"  {name:55s} " + "  ".join(f"vs {k.split(' ')[0]} {paired_ratios(v['times'], m['times']).fmt()}"
                                              f", HVPs {v['hvps'] / m['hvps']:.2f}x" for k, v in others.items()))
    for mine_name, label in ((TRACK_OURS, "Prober's stop rules"), (TRACK_RESIDUAL, "residual stop")):
        if mine_name in track and theirs:
            m = track[mine_name]
            where = f"along a run ({cfg.track_points} solves, {cfg.track_every} steps apart), {label}"
            print(f"  {where:55s} " + "  ".join(
                f"vs {k.split(' ')[0]}{' warm' if k == TRACK_HET else ' cold'} "
                f"{paired_ratios(track[k]['round_seconds'], m['round_seconds']).fmt()}, "
                f"HVPs {track[k]['hvps'] / m['hvps']:.2f}x" for k in theirs))

    g, costs = hvp_costs(params, loss_fn, chunks, model, device, cfg.cost_reps)
    print(f"\nHVP cost in gradient units (G = {g * 1e3:.1f} ms, median of {cfg.cost_reps}; cache excludes the one-time"
          " graph build):")
    for m, c in costs.items():
        print(f"  {m:10s} {c:5.2f} G")
    return {**cold, "tracking": track, "hvp_cost_G": costs}


if __name__ == "__main__":
    import tyro
    main(tyro.cli(BenchConfig))
