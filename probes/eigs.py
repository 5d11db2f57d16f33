"""Largest-algebraic eigenpairs of a symmetric operator by block LOBPCG with warm start.

Why our own solver: ``torch.lobpcg`` recomputes A·X each iteration and has no warm-start fast path; scipy works on
numpy copies; EoS sharpness needs the largest *algebraic* eigenvalue (LoRA Hessians are indefinite, so power
iteration and ``which="LM"`` Lanczos return a negative eigenvalue). This is Knyazev's LOBPCG (SIAM J. Sci. Comput.
23(2), 2001) with the basis [X, P, W] orthonormalised explicitly (Duersch et al., SIAM J. Sci. Comput. 40(5), 2018)
and the images A·X, A·P kept as linear combinations of A·S, so each iteration costs only as many HVPs as there are
unconverged residuals (k per iteration instead of 3k–4k in the EoSS/CentralFlows ports, research §B1/B4).

Stop rule: every Ritz pair satisfies ‖A x − θ x‖ ≤ tol · max|θ_RR| (θ_RR: all Ritz values of the last
Rayleigh–Ritz, an estimate of ‖A‖ on the subspace). For a symmetric A this guarantees an eigenvalue within
tol·‖A‖ of θ, and the usual Ritz-value error is ‖r‖²/gap, far smaller.
Cost: k HVPs for A·X₀, then one HVP per unconverged column per iteration; a warm start from the eigenvectors of a
nearby operator usually converges in 1–3 HVPs per vector.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["EigResult", "top_eigenvalues"]

DTYPE = torch.float64


@dataclass
class EigResult:
    values: torch.Tensor     # (k,) float64, descending (largest algebraic first)
    vectors: torch.Tensor    # (n, k) float64, orthonormal columns
    hvps: int                # operator applications used by this solve
    converged: bool
    iterations: int
    residuals: torch.Tensor  # (k,) ‖A x − θ x‖ / max|θ_RR|


def _project_out(v, av, basis):
    """Remove the components of v along the orthonormal blocks in ``basis`` (two passes: classical Gram–Schmidt
    twice is enough in fp64), applying the same combination to the images av (A is linear, no HVP)."""
    for _ in range(2):
        for q, aq in basis:
            c = q.T @ v
            v = v - q @ c
            if av is not None:
                av = av - aq @ c
    return v, av


def _orthonormalize(v, av=None, basis=(), drop: float = 1e-8):
    """Orthonormalise the columns of v against ``basis`` and among themselves (SVQB), dropping directions that
    are numerically dependent. Returns (v, av) with the same combination applied to av."""
    norms0 = v.norm(dim=0)
    v, av = _project_out(v, av, basis)
    keep = v.norm(dim=0) > drop * norms0.clamp_min(torch.finfo(DTYPE).tiny)
    v = v[:, keep]
    av = av[:, keep] if av is not None else None
    if v.shape[1] == 0:
        return v, av
    for _ in range(2):  # SVQB twice restores orthonormality to ~machine precision
        d = v.norm(dim=0)
        g = (v.T @ v) / (d[:, None] * d[None, :])
        lam, u = torch.linalg.eigh(g)
        good = lam > drop * lam.max()
        t = (u[:, good] / lam[good].sqrt()) / d[:, None]
        v = v @ t
        av = av @ t if av is not None else None
    return v, av


def _rayleigh_ritz(s, a_s, k):
    """Top-k Ritz pairs of A on span(s) (s orthonormal). Returns θ (k, descending), coefficients Y, all Ritz values."""
    h = s.T @ a_s
    h = 0.5 * (h + h.T)
    theta, z = torch.linalg.eigh(h)
    order = torch.argsort(theta, descending=True)[:k]
    return theta[order], z[:, order], theta


def top_eigenvalues(op, k: int = 1, tol: float = 1e-3, init: torch.Tensor | None = None,
                    max_hvps: int | None = None, generator: torch.Generator | None = None) -> EigResult:
    """The k largest (algebraic) eigenvalues and eigenvectors of the symmetric operator ``op``.

    ``op`` has ``.dim``, ``.matvec(V)`` for V of shape (n,) or (n, j), and ``.hvps`` (a counter).
    ``init``: warm-start vectors (n,) or (n, j); missing columns are drawn from ``generator`` (a private
    generator seeded 0 when None, so the global RNG is never touched). ``max_hvps`` caps the cost
    (default 60·k); when it is hit the best Ritz pairs so far are returned with ``converged=False``.
    """
    n = int(op.dim)
    if not 1 <= k <= n:
        raise ValueError(f"probes: k must be in [1, {n}], got {k}")
    if tol <= 0:
        raise ValueError(f"probes: tol must be positive, got {tol}")
    max_hvps = 60 * k if max_hvps is None else int(max_hvps)
    if max_hvps < k:
        raise ValueError(f"probes: max_hvps={max_hvps} is below k={k} (one HVP per vector is the minimum)")
    device = getattr(op, "device", torch.device("cpu"))
    start = op.hvps
    gen = generator if generator is not None else torch.Generator().manual_seed(0)

    if 3 * k >= n:  # the subspace would be the whole space: take the dense matrix (n HVPs)
        a = op.matvec(torch.eye(n, dtype=DTYPE, device=device))
        lam, u = torch.linalg.eigh(0.5 * (a + a.T))
        order = torch.argsort(lam, descending=True)[:k]
        return EigResult(lam[order].cpu(), u[:, order], op.hvps - start, True, 0, torch.zeros(k, dtype=DTYPE))

    cols = []
    if init is not None:
        init = init.detach().to(device=device, dtype=DTYPE)
        init = init[:, None] if init.dim() == 1 else init
        if init.shape[0] != n:
            raise ValueError(f"probes: init has {init.shape[0]} rows, operator dimension is {n}")
        cols.append(init[:, :k])
    missing = k - (cols[0].shape[1] if cols else 0)
    if missing > 0:
        cols.append(torch.randn(n, missing, generator=gen, dtype=DTYPE).to(device))
    x, _ = _orthonormalize(torch.cat(cols, dim=1))
    while x.shape[1] < k:  # init was rank-deficient: top up with random directions
        extra = torch.randn(n, k - x.shape[1], generator=gen, dtype=DTYPE).to(device)
        e, _ = _orthonormalize(extra, basis=[(x, x)])
        x = torch.cat([x, e], dim=1)

    ax = op.matvec(x)
    theta, y, theta_all = _rayleigh_ritz(x, ax, k)
    x, ax = x @ y, ax @ y
    p = ap = None
    iterations, converged = 0, False
    while True:
        r = ax - x * theta
        scale = theta_all.abs().max().clamp_min(torch.finfo(DTYPE).tiny)
        rel = r.norm(dim=0) / scale
        active = rel > tol
        if not bool(active.any()):
            converged = True
            break
        w = r[:, active]
        if op.hvps - start + w.shape[1] > max_hvps:
            break
        iterations += 1
        basis = [(x, ax)]
        if p is not None:
            p, ap = _orthonormalize(p, ap, basis=basis)
            if p.shape[1]:
                basis.append((p, ap))
        w, _ = _orthonormalize(w, None, basis=basis)
        if w.shape[1] == 0:  # residuals already lie in span[X, P]: nothing new to learn
            converged = bool((rel <= tol).all())
            break
        aw = op.matvec(w)
        s = torch.cat([q for q, _ in basis] + [w], dim=1)
        a_s = torch.cat([aq for _, aq in basis] + [aw], dim=1)
        theta, y, theta_all = _rayleigh_ritz(s, a_s, k)
        x, ax = s @ y, a_s @ y
        # P: the part of the new Ritz vectors outside the old X (Knyazev's implicit conjugate direction)
        p, ap = s[:, k:] @ y[k:], a_s[:, k:] @ y[k:]
    return EigResult(theta.cpu(), x, op.hvps - start, converged, iterations, rel.cpu())
