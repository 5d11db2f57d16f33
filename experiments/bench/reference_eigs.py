"""The eigen-solver of probes/eigs.py before the lean rewrite (main @ e736314), verbatim but for this docstring and
the imports: the reference that experiments/bench/solver_memory.py and tests/test_probes_solver_memory.py compare
against. What was identical to the lean solver's is imported from probes.eigs (the constants, EigResult, the
argument checks, the Rayleigh–Ritz reduction of the Gram matrices, the stop rules and the operator's error bound),
so both solvers share that code. Block LOBPCG with fp64 n-vectors: 4 buffers
of 3k rows (12k fp64 n-vectors) plus the start and residual temporaries and the fp64 images the operator returns.
See probes/eigs.py for the method and the stop rules.
"""
from __future__ import annotations

import torch

from probes.eigs import DTYPE, GRAM_DROP, ROW_DROP, EigResult, _checked_arguments
from probes.eigs import _rayleigh_ritz as gram_rayleigh_ritz
from probes.eigs import _StopRule, _with_operator_error

__all__ = ["EigResult", "top_eigenvalues"]

def _orthonormalize(v, drop: float = 1e-8):
    """Orthonormal basis of span(v) by SVQB twice (Stathopoulos & Wu 2002), dropping dependent directions."""
    for _ in range(2):  # the second pass restores orthonormality to ~machine precision
        d = v.norm(dim=0).clamp_min(torch.finfo(DTYPE).tiny)
        g = (v.T @ v) / (d[:, None] * d[None, :])
        lam, u = torch.linalg.eigh(g)
        good = lam > drop * lam.max()
        v = v @ ((u[:, good] / lam[good].sqrt()) / d[:, None])
    return v


def _rayleigh_ritz(s, a_s, k, drop: float = GRAM_DROP, row_drop: float = ROW_DROP):
    """Top-k Ritz pairs of A on the span of the ROWS of s (a_s = rows of A·s): probes.eigs._rayleigh_ritz on the
    Gram matrices of these full fp64 rows (the lean solver accumulates them chunk by chunk; the reduction after
    them is the same code)."""
    return gram_rayleigh_ritz(s @ s.T, s @ a_s.T, k, drop, row_drop)


def top_eigenvalues(op, k: int = 1, tol: float = 1e-3, init: torch.Tensor | None = None,
                    max_hvps: int | None = None, generator: torch.Generator | None = None,
                    stop: str = "residual", known: tuple[torch.Tensor, torch.Tensor] | None = None) -> EigResult:
    """probes.eigs.top_eigenvalues as it was (same arguments and result), with fp64 n-vectors throughout; ``op``'s
    ``.matvec`` takes (n,) or (n, j)."""
    n, max_hvps = _checked_arguments(op, k, tol, stop, max_hvps)
    device = getattr(op, "device", torch.device("cpu"))
    start = op.hvps
    gen = generator if generator is not None else torch.Generator().manual_seed(0)

    if 3 * k >= n:  # the subspace would be the whole space: take the dense matrix (n HVPs)
        a = op.matvec(torch.eye(n, dtype=DTYPE, device=device))
        lam, u = torch.linalg.eigh(0.5 * (a + a.T))
        order = torch.argsort(lam, descending=True)[:k]
        zero = torch.zeros(k, dtype=DTYPE)
        return _with_operator_error(EigResult(lam[order].cpu(), u[:, order], op.hvps - start, True, 0, zero,
                                              zero.clone()), op, tol, lam.abs().max())

    known_v, known_av = _known_pairs(known, n, device)
    cols = []
    if init is not None:
        init = init.detach().to(device=device, dtype=DTYPE)
        init = init[:, None] if init.dim() == 1 else init
        if init.shape[0] != n:
            raise ValueError(f"probes: init has {init.shape[0]} rows, operator dimension is {n}")
        cols.append(init[:, :k])
    # Known pairs stand in for random start vectors when there is no init; the rank of V is checked below.
    want = k if init is not None else k - known_v.shape[0]
    missing = want - (cols[0].shape[1] if cols else 0)
    if missing > 0:
        cols.append(torch.randn(n, missing, generator=gen, dtype=DTYPE).to(device))
    x = _orthonormalize(torch.cat(cols, dim=1)) if cols else torch.empty(n, 0, dtype=DTYPE, device=device)
    while x.shape[1] < want:  # init was rank-deficient: top up with random directions
        extra = torch.randn(n, want - x.shape[1], generator=gen, dtype=DTYPE).to(device)
        x = _orthonormalize(torch.cat([x, extra - x @ (x.T @ extra)], dim=1))

    # Vectors are stored as ROWS of (3k, n) buffers S (basis [X; P; W]) and AS (their images), two of each so the
    # next basis is written with mm(out=) and no n-sized concatenation or strided copy is ever made.
    bufs = [torch.empty(3 * k, n, dtype=DTYPE, device=device) for _ in range(4)]
    s, a_s, s_next, as_next = bufs
    s0 = torch.empty(x.shape[1], n, dtype=DTYPE, device=device)
    s0.copy_(x.T)
    as0 = torch.stack([op.matvec(row) for row in s0]) if x.shape[1] else torch.empty_like(s0)
    if known_v.shape[0]:
        s0, as0 = torch.cat([s0, known_v]), torch.cat([as0, known_av])
    theta, y, theta_all = _rayleigh_ritz(s0, as0, k)
    if theta.shape[0] < k:   # the known vectors were rank-deficient: add random directions and their images
        extra = torch.randn(k - theta.shape[0], n, generator=gen, dtype=DTYPE).to(device)
        s0 = torch.cat([s0, extra])
        as0 = torch.cat([as0, torch.stack([op.matvec(row) for row in extra])])
        theta, y, theta_all = _rayleigh_ritz(s0, as0, k)
    torch.mm(y.T, s0, out=s_next[:k])
    torch.mm(y.T, as0, out=as_next[:k])
    del s0, as0
    s, a_s, s_next, as_next = s_next, as_next, s, a_s
    n_p = 0                         # rows of P currently in the basis (none before the first iteration)
    rule = _StopRule(k, tol, stop, theta.device)   # the lean solver's stop rules: the same code, moved there
    iterations, converged = 0, False
    while True:
        r = torch.addcmul(a_s[:k], s[:k], theta[:, None], value=-1.0)   # A x − θ x in one pass
        rnorm = r.norm(dim=1)
        active, err, rel, scale = rule.check(theta, theta_all, rnorm)
        n_w = int(active.sum())
        if n_w == 0:
            converged = True
            break
        if op.hvps - start + n_w > max_hvps:
            break
        iterations += 1
        m = k + n_p + n_w
        # W = unconverged residuals, rescaled to unit norm so A·w is computed at full relative precision
        keep = slice(None) if n_w == k else active   # (a boolean index would copy r)
        torch.div(r[keep], rnorm[keep, None], out=s[k + n_p:m])
        for i in range(k + n_p, m):
            a_s[i] = op.matvec(s[i])
        theta, y, theta_all = _rayleigh_ritz(s[:m], a_s[:m], k)
        # New X = Yᵀ S and P = the part of it outside the old X (Knyazev's implicit conjugate direction), both
        # from one product with [Y, Y with its X rows zeroed], so S and AS are each read once (memory-bound at n≈2M).
        y2 = torch.cat([y, y], dim=1)
        y2[:k, k:] = 0
        torch.mm(y2.T, s[:m], out=s_next[:2 * k])
        torch.mm(y2.T, a_s[:m], out=as_next[:2 * k])
        n_p = k
        s, a_s, s_next, as_next = s_next, as_next, s, a_s
    x = s[:k].clone()
    del bufs, s, a_s, s_next, as_next
    return _with_operator_error(EigResult(theta.cpu(), x.T, op.hvps - start, converged, iterations, rel.cpu(),
                                          err.cpu()), op, tol, scale)


def _known_pairs(known, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(V, AV) as ROWS (j, n) in float64, without zero or non-finite vectors (e.g. a zero gradient)."""
    empty = torch.empty(0, n, dtype=DTYPE, device=device)
    if known is None:
        return empty, empty
    v, av = (t.detach().to(device=device, dtype=DTYPE) for t in known)
    v, av = (t[:, None] if t.dim() == 1 else t for t in (v, av))
    if v.shape != av.shape or v.shape[0] != n:
        raise ValueError(f"probes: known vectors {tuple(v.shape)} and images {tuple(av.shape)} must both be (n={n}, j)")
    ok = (v.norm(dim=0) > 0) & torch.isfinite(v).all(dim=0) & torch.isfinite(av).all(dim=0)
    return v[:, ok].T.contiguous(), av[:, ok].T.contiguous()
