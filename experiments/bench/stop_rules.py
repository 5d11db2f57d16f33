"""The λ_max solver's two stop rules side by side on synthetic spectra with known eigenvalues: HVPs, and how often
each misses the tolerance it was given, against the exact top eigenvalue (dense ``eigvalsh``).

``probes.top_eigenvalues(k=1, tol)`` stops by
- ``"residual"``: ‖Ax − θx‖ ≤ tol·scale, which for a symmetric A puts an eigenvalue within tol·scale of θ;
- ``"eigenvalue"`` (the Prober's default): the Kato–Temple estimate ‖r‖²/δ ≤ tol·scale, δ the gap to the rest of
  the spectrum as the subspace sees it, confirmed by one more iteration (probes/eigs.py).
The second is cheaper, and not a guarantee: δ comes from the subspace. Where the top of the spectrum is a cluster
narrower than the subspace resolves (a close pair; the edge of a random matrix's semicircle, the spectrum of a
randomly initialised network), it can stop at a Ritz value inside the cluster and report an error far below the
true one. This bench measures how often and by how much.

Spectra, n = ``n`` (scale = max|λ|): outliers over a bulk with negatives larger than λ_max (test_probes_stop);
power laws λ_i = i^-a; a top pair 1 and r over a bulk in [−0.1, 0.1]; a GOE semicircle, and one shifted by +0.5 so
that λ_max is also the largest magnitude. ``seeds`` random eigenbases and start vectors each; cold (random start)
and warm (the top eigenvector plus noise of relative norm ``warm_noise``).
Printed per spectrum and start: mean HVPs per rule and their ratio, the number of solves whose error |θ − λ₁|/scale
exceeds tol, the worst error, and how many solves reported an error bound (``EigResult.errors``) below their true
error. The HVPs are exact products with a dense matrix: no timing here (HVP counts are what a solve costs).

Run: ``python experiments/bench/stop_rules.py [--n 600 --seeds 20 --tol 1e-3]``.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere

from probes import LinearOperator, top_eigenvalues  # noqa: E402

D = torch.float64
RULES = ("eigenvalue", "residual")
SPECTRA = ("outliers", "power 0.5", "power 1", "power 2", "pair 0.7", "pair 0.9", "pair 0.95", "pair 0.99",
           "semicircle", "semicircle + 0.5")


@dataclass(frozen=True)
class BenchConfig:
    n: int = 600
    seeds: int = 20
    tol: float = 1e-3
    warm_noise: tuple[float, ...] = (0.3, 1.0)   # warm starts: top eigenvector + noise of this relative norm
    max_hvps: int = 300


def eigenvalues(kind: str, n: int, gen: torch.Generator) -> torch.Tensor:
    """The spectrum ``kind`` (one of SPECTRA) of size n."""
    name, _, arg = kind.partition(" ")
    if name == "outliers":
        head = torch.tensor([10.0, 6.0, 4.0, 3.0, -12.0, -20.0], dtype=D)
        return torch.cat([head, torch.linspace(-0.5, 0.5, n - 6, dtype=D)])
    if name == "power":
        return torch.arange(1, n + 1, dtype=D) ** -float(arg)
    if name == "pair":
        return torch.cat([torch.tensor([1.0, float(arg)], dtype=D), torch.linspace(-0.1, 0.1, n - 2, dtype=D)])
    if name == "semicircle":
        x = torch.randn(n, n, generator=gen, dtype=D)
        shift = float(arg.split()[-1]) if arg else 0.0
        return torch.linalg.eigvalsh((x + x.T) / (2 * n) ** 0.5) + shift
    raise ValueError(f"unknown spectrum {kind!r}; one of {SPECTRA}")


def solve_all(cfg: BenchConfig, kind: str, noise: float | None) -> dict[str, dict]:
    """Per rule: mean HVPs, misses (error > tol), worst error, and reported bounds below the true error."""
    out = {rule: {"hvps": 0, "misses": 0, "worst": 0.0, "optimistic": 0} for rule in RULES}
    for seed in range(cfg.seeds):
        gen = torch.Generator().manual_seed(seed)
        lam = eigenvalues(kind, cfg.n, gen)
        q, _ = torch.linalg.qr(torch.randn(cfg.n, cfg.n, generator=gen, dtype=D))
        a = (q * lam) @ q.T
        truth, scale = float(lam.max()), float(lam.abs().max())
        init = None
        if noise is not None:
            init = q[:, int(torch.argmax(lam))] + noise * torch.randn(cfg.n, generator=gen, dtype=D) / cfg.n ** 0.5
        for rule in RULES:
            res = top_eigenvalues(LinearOperator.from_matrix(a), k=1, tol=cfg.tol, stop=rule, init=init,
                                  max_hvps=cfg.max_hvps, generator=torch.Generator().manual_seed(1000 + seed))
            err = abs(float(res.values[0]) - truth) / scale
            row = out[rule]
            row["hvps"] += res.hvps / cfg.seeds
            row["misses"] += err > cfg.tol
            row["worst"] = max(row["worst"], err)
            row["optimistic"] += float(res.errors[0]) < err
    return out


def main(cfg: BenchConfig = BenchConfig()) -> dict:
    print(f"λ_max to tol {cfg.tol:g} (relative to max|λ|), n = {cfg.n}, {cfg.seeds} eigenbases and start vectors "
          "per row; misses = solves with |θ − λ₁|/scale > tol; optimistic = reported bound below the true error")
    print(f"{'spectrum':18s} {'start':10s} " + "  ".join(
        f"{rule + ' HVPs':>15s} {'misses':>6s} {'worst':>8s} {'optim.':>6s}" for rule in RULES) + "  HVPs e/r")
    results = {}
    for kind in SPECTRA:
        for noise in (None, *cfg.warm_noise):
            start = "cold" if noise is None else f"warm {noise:g}"
            r = results[(kind, start)] = solve_all(cfg, kind, noise)
            cells = "  ".join(f"{r[rule]['hvps']:15.1f} {r[rule]['misses']:6d} {r[rule]['worst']:8.1e} "
                              f"{r[rule]['optimistic']:6d}" for rule in RULES)
            ratio = r["eigenvalue"]["hvps"] / r["residual"]["hvps"]
            print(f"{kind:18s} {start:10s} {cells}  {ratio:8.2f}", flush=True)
    for rule in RULES:
        rows = [r[rule] for r in results.values()]
        print(f"{rule}: {sum(x['misses'] for x in rows)} misses in {len(rows) * cfg.seeds} solves, worst error "
              f"{max(x['worst'] for x in rows):.1e}, mean HVPs {sum(x['hvps'] for x in rows) / len(rows):.1f}")
    return results


if __name__ == "__main__":
    import tyro
    main(tyro.cli(BenchConfig))
