"""The eigen-solver of probes/eigs.py before the lean rewrite (main @ e736314), verbatim but for this docstring and
the imports: the reference that experiments/bench/solver_memory.py and tests/test_probes_solver_memory.py compare
against. Its stop rule's helpers (Temple bounds, the operator's error bound) were identical to the lean solver's and
are imported from probes.eigs, so both solvers stop by the same code. Block LOBPCG with fp64 n-vectors: 4 buffers
of 3k rows (12k fp64 n-vectors) plus the start and residual temporaries and the fp64 images the operator returns.
See probes/eigs.py for the method and the stop rules.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from probes.eigs import _temple_errors, _with_operator_error

__all__ = ["EigResult", "top_eigenvalues"]

DTYPE = torch.float64
STOPS = ("residual", "eigenvalue")
GRAM_DROP = 1e-10     # Rayleigh–Ritz: directions with relative Gram eigenvalue below this are dependent
ROW_DROP = 1e-8       # ... and rows shorter than this × the longest carry images that are mostly rounding (√eps)
NOISE_AMPLIFICATION = 1e4   # ... and directions that would amplify the measured image noise more than this,
NOISE_DROP_CAP = 1e-2       # ... up to this relative Gram eigenvalue (fd HVPs carry ~3e-4 noise in fp32)


@dataclass
class EigResult:
    values: torch.Tensor     # (k,) float64, descending (largest algebraic first)
    vectors: torch.Tensor    # (n, k) float64, orthonormal columns
    hvps: int                # operator applications used by this solve
    converged: bool
    iterations: int
    residuals: torch.Tensor  # (k,) ‖A x − θ x‖ / max|θ_RR|
    errors: torch.Tensor | None = None   # (k,) bound on |λ − θ| used by the stop rule (at least the operator's
                                         # own error bound, fd mode), / max|θ_RR|


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
    """Top-k Ritz pairs of A on the span of the ROWS of s (a_s = rows of A·s), for a non-orthonormal basis: the
    generalized problem (S A Sᵀ) z = θ (S Sᵀ) z on the small Gram matrices only (rows scaled to unit norm,
    directions with relative Gram eigenvalue below ``drop`` discarded). Returns θ (k, descending), coefficients
    Y (m, k) with Yᵀ S Sᵀ Y = I, and all Ritz values. Two tall-skinny products replace explicit
    orthogonalisation, which would take ~40 passes over n per iteration.

    Noisy images. The images of X and P rows are linear combinations of earlier images, not fresh HVPs, and an
    fp32 HVP carries relative noise ~1e-7; a direction of relative Gram eigenvalue μ amplifies it by 1/√μ. Near
    convergence P and W become nearly dependent (μ ~ 1e-10), and the amplified noise would create spurious
    directions of huge θ that derail the iteration whenever tol is below the HVP's noise floor (e.g. tol 1e-7 in
    fp32). The noise is measured here as the asymmetry of S·(AS)ᵀ, which exact images make symmetric, and
    directions with μ < (1e4·noise)² are dropped too (amplified noise ≤ 1e-4·|θ|), at most μ < 1e-2 (fd HVPs in
    fp32 are noisier than 1e4 amplification allows); with exact fp64 images this is below ``drop``. Rows shorter
    than ``row_drop`` × the longest take no part (zero coefficients)."""
    g = s @ s.T
    h = s @ a_s.T
    d = g.diagonal().clamp_min(0).sqrt()
    rows = torch.nonzero(d > row_drop * d.max()).squeeze(1)
    g = g[rows][:, rows] / (d[rows, None] * d[None, rows])
    h = h[rows][:, rows] / (d[rows, None] * d[None, rows])
    noise = float((h - h.T).abs().max() / h.abs().max().clamp_min(torch.finfo(DTYPE).tiny))
    lam, u = torch.linalg.eigh(0.5 * (g + g.T))
    good = lam > min(max(drop, (NOISE_AMPLIFICATION * noise) ** 2), NOISE_DROP_CAP) * lam.max()
    c = u[:, good] / lam[good].sqrt()
    theta, z = torch.linalg.eigh(c.T @ (0.5 * (h + h.T)) @ c)
    order = torch.argsort(theta, descending=True)[:k]
    y = torch.zeros(s.shape[0], order.shape[0], dtype=s.dtype, device=s.device)
    y[rows] = (c @ z[:, order]) / d[rows, None]
    return theta[order], y, theta


def top_eigenvalues(op, k: int = 1, tol: float = 1e-3, init: torch.Tensor | None = None,
                    max_hvps: int | None = None, generator: torch.Generator | None = None,
                    stop: str = "residual", known: tuple[torch.Tensor, torch.Tensor] | None = None) -> EigResult:
    """The k largest (algebraic) eigenvalues and eigenvectors of the symmetric operator ``op``.

    ``op`` has ``.dim``, ``.matvec(V)`` for V of shape (n,) or (n, j), and ``.hvps`` (a counter).
    ``init``: warm-start vectors (n,) or (n, j); missing columns are drawn from ``generator`` (a private
    generator seeded 0 when None, so the global RNG is never touched). ``max_hvps`` caps the cost
    (default 60·k); when it is hit the best Ritz pairs so far are returned with ``converged=False``.
    ``stop``: "residual" (vectors and values to tol) or "eigenvalue" (values only, fewer HVPs); see the module doc.
    ``known``: (V, AV), vectors (n,) or (n, j) whose images A·V the caller already has (e.g. the gradient g and Hg
    from step sharpness): they join the first Rayleigh–Ritz at no HVP cost. Without ``init`` they are the whole
    start subspace (topped up with random vectors below rank k). The Rayleigh–Ritz keeps the direction of largest
    θ, so a known vector inside an invariant subspace that misses the top eigenvector can trap a cold solve even
    beside a random start; the Prober passes them only beside a warm start (whose θ is near λ_max already).
    """
    n = int(op.dim)
    if not 1 <= k <= n:
        raise ValueError(f"probes: k must be in [1, {n}], got {k}")
    if tol <= 0:
        raise ValueError(f"probes: tol must be positive, got {tol}")
    if stop not in STOPS:
        raise ValueError(f"probes: stop must be one of {STOPS}, got {stop!r}")
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
    floor = torch.full((k,), -torch.inf, dtype=DTYPE, device=theta.device)   # running max of Ritz values k+1.. per rank
    last = torch.full((k,), torch.inf, dtype=DTYPE, device=theta.device)     # θ of the previous iteration
    prev_step = torch.full((k,), torch.inf, dtype=DTYPE, device=theta.device)  # |Δθ| of the previous iteration
    claimed = torch.zeros(k, dtype=torch.bool, device=theta.device)  # the estimate passed at the previous check
    iterations, converged = 0, False
    while True:
        r = torch.addcmul(a_s[:k], s[:k], theta[:, None], value=-1.0)   # A x − θ x in one pass
        scale = theta_all.abs().max().clamp_min(torch.finfo(DTYPE).tiny)
        rnorm = r.norm(dim=1)
        rel = rnorm / scale
        step = (theta - last).abs()
        if stop == "residual":
            err = rel
            active = err > tol
        else:
            err, floor = _temple_errors(theta, theta_all, rnorm, floor)
            # ... and at least the geometric extrapolation of the last step, Δθ·ρ/(1−ρ) with ρ the
            # observed contraction of Δθ: slow convergence reveals a gap smaller than the Ritz values suggest.
            if bool(torch.isfinite(last).all()):   # from the second check on (the first is the residual rule)
                rho = (step / prev_step).nan_to_num(1.0).clamp(0.0, 0.99)   # prev_step = inf first: ρ = 0
                err = torch.maximum(err, step * rho / (1 - rho))
                prev_step = step
            err = err / scale
            # The Temple bound trusts the subspace's picture of the spectrum, and a cold start's first subspaces
            # can hold a tiny θ₁ beside a large negative Ritz value (δ and scale large, λ_max far above θ₁;
            # tests/test_probes_stop.py reproduces it). Asking ‖r_i‖ ≤ √tol·|θ_i| too (relative to the Ritz value
            # itself) keeps the quadratic gain without that failure.
            err = torch.where(rnorm > tol ** 0.5 * theta.abs(), torch.full_like(err, torch.inf), err)
            # An estimate below tol is a claim that λ − θ ≤ tol·scale, checked by one more iteration: θ only rises,
            # so a rise above tol·scale refutes it (an eigenvalue the subspace had not resolved, e.g. λ₁ hidden
            # behind a close λ₂). The residual rule needs no check: ‖r‖ ≤ tol·scale bounds |λ − θ| by itself.
            passed = err <= tol
            active = ~(passed & ((claimed & (step <= tol * scale)) | (rel <= tol)))
            claimed = passed
        last = theta
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
