"""One λ_max solve, main's fp64 solver (experiments/bench/reference_eigs.py) vs the lean one (probes/eigs.py), side by
side in one run: peak RSS increase, wall time and HVPs, on GPT-NeoX models from agents.embedded.init_model (random
init, a byte-level BPE trained on a small text list, as tests/conftest.py build_tiny_model does) at a few sizes.

Each solve: cold (both from the same random fp32 start vector), k=1, tol 1e-3, stop="eigenvalue" (as the Prober
runs it), on one cached-graph HessianOperator per model (graph built before any timing: only the solve counts).
Peak RSS increase = VmHWM − VmRSS before the solve, the high-water mark reset at its start (probes.memory.PeakMemory);
glibc's mmap threshold is pinned to 64 KiB (pin_mmap_threshold) so every freed n-vector goes back to the OS between
solves.
It includes the HVP's own temporaries (autograd's per-parameter H·v and the flat image: ~2 n-vectors of the
parameter dtype), the same for both solvers; printed also in units of one fp32 n-vector (4n bytes).
Solves alternate A B B A (``--rounds`` times, after one unreported warm-up solve each) because the CPUs are shared;
min–max spread printed.

Run: ``python experiments/bench/solver_memory.py [--sizes 2x128,4x256,6x512 --rounds 1 --vocab 2048]``

Measured 2026-12-03 on the 2 shared CPU cores (``--rounds 1 --max-hvps 10``, OMP_NUM_THREADS=2; median of 2, spread
in brackets), peak RSS increase main → lean: 2x128 (0.70M) 94 → 42 MB, 1.31 (1.27–1.34) → 1.15 (1.11–1.19) s;
4x256 (3.8M) 488 → 114 MB, 4.18 (3.90–4.45) → 4.52 (4.51–4.53) s; 6x512 (20.1M) 2610 → 480 MB (34.0 → 6.3 fp32
n-vectors), 17.4 (17.0–17.9) → 14.6 (13.8–15.4) s; the same λ_max and HVPs. Uncapped at 2x128: 23 HVPs each.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from experiments.bench.reference_eigs import top_eigenvalues as reference_top_eigenvalues
from probes import HessianOperator
from probes.eigs import top_eigenvalues
from probes.memory import PeakMemory, pin_mmap_threshold

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Edge of stability: sharpness rises to 2/eta and hovers.",
         "def add(a, b):\n    return a + b\n", "Hessian-vector products cost about two gradients each."] * 8 + \
        [f"{i} + {2 * i} = {3 * i}" for i in range(300)]
SOLVERS = {"main (fp64)": reference_top_eigenvalues, "lean": top_eigenvalues}


def build(layers: int, hidden: int, vocab: int, batch: int, seq: int, seed: int = 0):
    """A random-init GPT-NeoX, its cached-graph Hessian operator on a fixed random token batch (LM loss)."""
    from agents.embedded import init_model, train_tokenizer
    tok = train_tokenizer(TEXTS, vocab_size=vocab)
    model = init_model(tok, n_layer=layers, hidden=hidden, heads=max(4, hidden // 64), context=seq, seed=seed)
    ids = torch.randint(0, len(tok), (batch, seq), generator=torch.Generator().manual_seed(seed))

    def loss_fn(chunk):
        return model(input_ids=chunk, labels=chunk).loss
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    op = HessianOperator(params, loss_fn, [ids], model=model)
    op.gradient()   # build the graph now, outside the measurement
    return model, op


def measure(solve, op, x0, tol: float, max_hvps: int = 60) -> dict:
    with PeakMemory("cpu") as mem:
        t0 = time.perf_counter()
        res = solve(op, k=1, tol=tol, init=x0, stop="eigenvalue", max_hvps=max_hvps)
        wall = time.perf_counter() - t0
    out = {"mb": mem.mb, "s": wall, "hvps": res.hvps, "lam": float(res.values[0]), "converged": res.converged}
    del res
    return out


def main(sizes=((2, 128), (4, 256), (6, 512)), rounds: int = 1, vocab: int = 2048, batch: int = 4, seq: int = 64,
         tol: float = 1e-3, max_hvps: int = 60) -> dict:
    if not pin_mmap_threshold():
        print("(mallopt unavailable: freed memory may stay resident between solves)")
    torch.set_grad_enabled(True)
    results = {}
    for layers, hidden in sizes:
        model, op = build(layers, hidden, vocab, batch, seq)
        n = op.dim
        x0 = torch.randn(n, generator=torch.Generator().manual_seed(1))
        rows = {name: [] for name in SOLVERS}
        names = list(SOLVERS)
        for name in names:   # warm-up (lazy initialisation, first-touch of allocator pages): not reported
            measure(SOLVERS[name], op, x0, tol, max_hvps)
        for _ in range(rounds):
            for name in names + names[::-1]:   # A B B A
                rows[name].append(measure(SOLVERS[name], op, x0, tol, max_hvps))
        results[(layers, hidden)] = (n, rows)
        vec_mb = 4 * n / 2 ** 20
        print(f"\nGPT-NeoX {layers}x{hidden}: n = {n:,} parameters (one fp32 n-vector = {vec_mb:.1f} MB), "
              f"{batch}x{seq} tokens")
        print(f"  {'solver':<12} {'λ_max':>10} {'HVPs':>5} {'peak RSS increase MB (min–max)':>32} "
              f"{'in fp32 n-vectors':>18} {'wall s (min–max)':>18}")
        for name, rs in rows.items():
            mb = [r["mb"] for r in rs]
            s = [r["s"] for r in rs]
            print(f"  {name:<12} {rs[0]['lam']:>10.4f} {rs[0]['hvps']:>4d}{'' if rs[0]['converged'] else '*'} "
                  f"{statistics.median(mb):>12.0f} ({min(mb):.0f}–{max(mb):.0f}){'':>8} "
                  f"{statistics.median(mb) / vec_mb:>18.1f} {statistics.median(s):>8.2f} ({min(s):.2f}–{max(s):.2f})")
        old, new = (statistics.median(r[key] for r in rows[name]) for key in ("mb",) for name in names)
        t_old, t_new = (statistics.median(r["s"] for r in rows[name]) for name in names)
        print(f"  lean / main: memory {new / old:.2f}x, wall {t_new / t_old:.2f}x   (* = hit --max-hvps)")
        del model, op
    return results


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="2x128,4x256,6x512", help="comma-separated LAYERSxHIDDEN")
    ap.add_argument("--rounds", type=int, default=1, help="A B B A rounds per size")
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--tol", type=float, default=1e-3)
    ap.add_argument("--max-hvps", type=int, default=60, help="cap per solve (a capped solve still allocates all "
                    "its vectors in its first iteration: the memory comparison holds, the wall time is per HVP)")
    a = ap.parse_args()
    main(tuple(tuple(int(x) for x in s.split("x")) for s in a.sizes.split(",")), a.rounds, a.vocab, a.batch, a.seq,
         a.tol, a.max_hvps)
