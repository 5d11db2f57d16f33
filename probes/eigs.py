"""Largest-algebraic eigenpairs of a symmetric operator by LOBPCG with warm start, in the operator's dtype.

Why our own solver: ``torch.lobpcg`` recomputes A·X each iteration and has no warm-start fast path; scipy works on
numpy copies; EoS sharpness needs the largest *algebraic* eigenvalue (LoRA Hessians are indefinite, so power
iteration and ``which="LM"`` Lanczos return a negative eigenvalue). This is Knyazev's LOBPCG (SIAM J. Sci. Comput.
23(2), 2001): Rayleigh–Ritz on the span of [X; P; W] (X the Ritz vectors, W their unconverged residuals, P the part
of the new X outside the old X, Knyazev's implicit conjugate direction) through the generalized problem on its Gram
matrices (rows normalised, numerically dependent directions dropped, as in SVQB of Stathopoulos & Wu 2002). The
images A·X, A·P are kept as linear combinations of A·S, so an iteration costs one HVP per unconverged residual
(a textbook LOBPCG that recomputes A·X and A·P takes 3k).

Precision and memory. Parameter-sized (n-)vectors are kept in the operator's dtype (``op.dtype``: fp32 for an fp32
model; fp64 for an operator without one, e.g. an explicit matrix); every reduction over n (Gram matrices, norms)
and every basis update is computed in fp64 CHUNK entries at a time (fp64 temporaries of a few rows × CHUNK), and the
projected k×k / 3k×3k problems are fp64. An fp32 vector carries ~1e-7 relative rounding, the size of the fp32 HVP's
own, far below any tol this is used with.
- k = 1 (the λ_max probe): 4 n-vectors [x, w, p, A·p] are held, 5 at the peak (A·w, the HVP just taken); A·x is
  not stored, since x is the Ritz vector and w its normalised residual: A·x = θx + ‖r‖w. Why this and not Lanczos:
  a Lanczos Ritz vector needs the whole basis (full reorthogonalisation: one n-vector per HVP) or a second pass
  (twice the HVPs); a thick restart in the same 4 vectors (keep the top 2 Ritz vectors, 1 new direction) took
  1.3–2× the HVPs of this LOBPCG on the spectra of tests/test_probes_solver.py, whose [x, w, p] reaches about the
  Ritz value of the whole Krylov space per HVP.
- k > 1: S = [X; P; W] and A·S, 6k n-vectors, updated in place.

Stop rules (``stop=``), both relative to ``scale = max|θ_RR|`` (θ_RR: all Ritz values of the last Rayleigh–Ritz,
an estimate of ‖A‖ on the subspace):
- ``"residual"`` (default): every Ritz pair satisfies ‖A x − θ x‖ ≤ tol · scale. For a symmetric A this guarantees
  an eigenvalue within tol·scale of θ, and the usual Ritz-value error ‖r‖²/gap is far smaller (tol=1e-3 gives
  λ to ~1e-6 on the GPT-NeoX bench), and the vectors are accurate to ~tol/gap, so a re-solve at the same
  operator from them takes 1 HVP.
- ``"eigenvalue"``: every Ritz VALUE is estimated within tol · scale. Estimate: the Kato–Temple inequality
  |λ − θ| ≤ ‖r‖²/δ (Temple 1928, Kato 1949; the gap theorems in Parlett, The Symmetric Eigenvalue Problem), δ the
  distance from θ to the rest of the spectrum, estimated from Ritz values: the one above (≤ its eigenvalue, so
  that side is conservative) and the running maximum of the one below (a lower bound of the next eigenvalue, so
  δ is overestimated while that eigenvalue is unresolved). The quadratic bound is used only where ‖r‖ ≤ δ/4, else
  the rigorous ‖r‖; only once ‖r_i‖ ≤ √tol·|θ_i| (a cold start's subspace can look self-consistent around a tiny
  θ beside a large negative Ritz value); and the estimate is at least the geometric tail Δθ·ρ/(1−ρ) of the last
  step (ρ: observed contraction of Δθ), which catches slow convergence. An estimate below tol is a claim that one
  more iteration tests: Ritz values only rise, so a rise above tol·scale refutes it and the solve goes on. This
  catches an eigenvalue the subspace had not resolved, e.g. a cold start whose first Krylov vectors mix a close
  pair λ₁ > λ₂ and estimate δ from the bulk below both (tests/test_probes_stop.py). A pair passing the residual
  rule needs no such check. Still NOT a guarantee: δ comes from the subspace, so a near-double top eigenvalue
  whose partner is not in it yet can stop early (eigenvalues 10 and 9.99 over a bulk: error 1.4e-3 at tol 1e-3;
  tests/test_probes_stop.py has the spectra where it holds). Measured on synthetic spectra with known eigenvalues
  (experiments/bench/stop_rules.py, n = 600, 20 draws each, tol 1e-3): from random starts it stopped inside the
  top cluster in 19 of 200 solves (a top pair 1.0/0.9 read as 0.9 once in 20, 1.0/0.95 twice, 1.0/0.99 14 times;
  a random matrix's semicircle edge twice in 40, 1.5e-2 off), from warm starts in none of 400; the residual rule
  missed in 2 of 600 (the 1.0/0.99 pair, cold, 1e-2 off) for 1.0–2.6× the HVPs. So the Prober solves cold by
  the residual rule (``ProbeConfig.cold_stop``) and warm by this one.
  It pays when only λ is wanted, on the test problems in tests/test_probes_stop.py 10–30 % fewer HVPs than the
  residual rule (as many on a close top pair, which both must resolve); the vectors are only ~sqrt(tol) accurate,
  so "residual" stays the default here (a re-solve at an unchanged operator takes 1 HVP only from
  residual-accurate vectors); the Prober, which wants λ, uses "eigenvalue".
Cost: k HVPs for A·X₀, then one HVP per unconverged column per iteration; a warm start from the eigenvectors of a
nearby operator usually converges in 1–3 HVPs per vector. Vectors whose images the caller already holds
(``known=``, e.g. g and Hg from step sharpness) join the first Rayleigh–Ritz for free (read in place, not copied).
For k = 1 the iterates stay in the Krylov space of the start vector, like Lanczos, at about its Ritz value per
HVP, so a cold solve costs what Lanczos costs and warm starts and the cached HVP are where the speed comes from.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .hvp import operator_error

__all__ = ["EigResult", "top_eigenvalues", "work_dtype", "dot64"]

DTYPE = torch.float64   # projected (small) matrices and every reduction over n
CHUNK = 1 << 18         # entries of n per step of a chunked reduction or update: bounds the fp64 temporaries
STOPS = ("residual", "eigenvalue")
TEMPLE_MARGIN = 4.0   # the quadratic bound is trusted where ‖r‖ ≤ δ / TEMPLE_MARGIN
GRAM_DROP = 1e-10     # Rayleigh–Ritz: directions with relative Gram eigenvalue below this are dependent
ROW_DROP = 1e-8       # ... and rows shorter than this × the longest carry images that are mostly rounding (√eps)
NOISE_AMPLIFICATION = 1e4   # ... and directions that would amplify the measured image noise more than this,
NOISE_DROP_CAP = 1e-2       # ... up to this relative Gram eigenvalue (fd HVPs carry ~3e-4 noise in fp32)


@dataclass
class EigResult:
    values: torch.Tensor     # (k,) float64, descending (largest algebraic first)
    vectors: torch.Tensor    # (n, k) in the operator's dtype (work_dtype), orthonormal columns
    hvps: int                # operator applications used by this solve
    converged: bool
    iterations: int
    residuals: torch.Tensor  # (k,) ‖A x − θ x‖ / max|θ_RR|
    errors: torch.Tensor | None = None   # (k,) bound on |λ − θ| used by the stop rule (at least the operator's
                                         # own error bound, fd mode), / max|θ_RR|


def work_dtype(op) -> torch.dtype:
    """dtype of the solver's n-vectors: ``op.dtype`` (fp32 or fp64; fp64 when the operator names none)."""
    dtype = getattr(op, "dtype", DTYPE)
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


# ---- chunked fp64 reductions and in-place updates over rows of n-vectors -------------------------------------
def _scratch(ws: dict, key: str, rows: int, width: int, device) -> torch.Tensor:
    """A contiguous (rows, width) fp64 block of the workspace ``ws`` (one flat buffer per key, grown on demand):
    the chunk temporaries are allocated once per solve, not once per chunk (allocator and page-fault churn)."""
    t = ws.get(key)
    if t is None or t.numel() < rows * width:
        t = ws[key] = torch.empty(rows * max(width, CHUNK), dtype=DTYPE, device=device)
    return t[:rows * width].view(rows, width)


def _chunk(rows: list[torch.Tensor], lo: int, hi: int, ws: dict, key: str) -> torch.Tensor:
    out = _scratch(ws, key, sum(r.shape[0] for r in rows), hi - lo, rows[0].device)
    i = 0
    for r in rows:
        out[i:i + r.shape[0]].copy_(r[:, lo:hi])
        i += r.shape[0]
    return out


def _gram(a: list[torch.Tensor], b: list[torch.Tensor] | None = None, ws: dict | None = None) -> torch.Tensor:
    """A Bᵀ in fp64 for A, B the row-stacks of the (j, n) tensors in ``a``, ``b`` (any float dtype; b = a by
    default), accumulated CHUNK columns at a time: fp64 accuracy without an fp64 copy of any n-vector."""
    ws = {} if ws is None else ws
    n = a[0].shape[1]
    out = torch.zeros(sum(r.shape[0] for r in a), sum(r.shape[0] for r in (a if b is None else b)), dtype=DTYPE,
                      device=a[0].device)
    for lo in range(0, n, CHUNK):
        hi = min(n, lo + CHUNK)
        ca = _chunk(a, lo, hi, ws, "a")
        out.addmm_(ca, (ca if b is None else _chunk(b, lo, hi, ws, "b")).T)
    return out


def dot64(a: torch.Tensor, b: torch.Tensor | None = None) -> float:
    """aᵀb (aᵀa for b None) of n-vectors of any float dtypes, accumulated in fp64 CHUNK entries at a time: fp64
    accuracy without an fp64 copy of either, so probes keep their n-vectors in the operator's dtype."""
    rows = [a.reshape(1, -1)]
    return float(_gram(rows) if b is None else _gram(rows, [b.reshape(1, -1)]))


def _combine(rows: list[torch.Tensor], coef: torch.Tensor, out: torch.Tensor, ws: dict | None = None) -> None:
    """out ← coef · (row-stack of ``rows``), in fp64 CHUNK columns at a time; each chunk is read before it is
    written, so ``out`` may alias the rows (the basis is updated in place, no second buffer)."""
    ws = {} if ws is None else ws
    coef = coef.to(DTYPE)
    n = out.shape[1]
    for lo in range(0, n, CHUNK):
        hi = min(n, lo + CHUNK)
        res = _scratch(ws, "c", out.shape[0], hi - lo, out.device)
        torch.mm(coef, _chunk(rows, lo, hi, ws, "a"), out=res)
        out[:, lo:hi].copy_(res)


def _svqb(g: torch.Tensor, drop: float = 1e-8) -> torch.Tensor:
    """C with C G Cᵀ = I on the directions of the Gram matrix G kept (SVQB, Stathopoulos & Wu 2002): C·S is an
    orthonormal basis of span(rows of S), dependent directions dropped."""
    d = g.diagonal().clamp_min(0).sqrt().clamp_min(torch.finfo(DTYPE).tiny)
    lam, u = torch.linalg.eigh(g / (d[:, None] * d[None, :]))
    good = lam > drop * lam.max()
    return ((u[:, good] / lam[good].sqrt()) / d[:, None]).T


def _orthonormalize_(s: torch.Tensor, ws: dict | None = None) -> int:
    """Orthonormalise the rows of s in place (twice: the second pass restores orthonormality to the dtype's
    precision); returns how many independent rows lead s."""
    for _ in range(2):
        c = _svqb(_gram([s], ws=ws))
        _combine([s], c, s[:c.shape[0]], ws)
        s = s[:c.shape[0]]
    return s.shape[0]


def _rayleigh_ritz(g, h, k, drop: float = GRAM_DROP, row_drop: float = ROW_DROP):
    """Top-k Ritz pairs of A on the span of the rows of a basis S, from its Gram matrices g = S Sᵀ, h = S (AS)ᵀ
    (fp64): the generalized problem h z = θ g z, rows scaled to unit norm, directions with relative Gram eigenvalue
    below ``drop`` discarded. Returns θ (k, descending), coefficients Y (m, k) with Yᵀ g Y = I, and all Ritz
    values. The two small Gram matrices replace explicit orthogonalisation (~40 passes over n per iteration).

    Noisy images. The images of X and P rows are linear combinations of earlier images, not fresh HVPs, and an
    fp32 HVP carries relative noise ~1e-7; a direction of relative Gram eigenvalue μ amplifies it by 1/√μ. Near
    convergence P and W become nearly dependent (μ ~ 1e-10), and the amplified noise would create spurious
    directions of huge θ that derail the iteration whenever tol is below the HVP's noise floor (e.g. tol 1e-7 in
    fp32). The noise is measured here as the asymmetry of h, which exact images make symmetric, and directions
    with μ < (1e4·noise)² are dropped too (amplified noise ≤ 1e-4·|θ|), at most μ < 1e-2 (fd HVPs in fp32 are
    noisier than 1e4 amplification allows); with exact fp64 images this is below ``drop``. Rows shorter than
    ``row_drop`` × the longest take no part (zero coefficients)."""
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
    y = torch.zeros(d.shape[0], order.shape[0], dtype=DTYPE, device=g.device)
    y[rows] = (c @ z[:, order]) / d[rows, None]
    return theta[order], y, theta


class _StopRule:
    """The stop rules of the module doc, carried across iterations: ``check(θ, θ_RR, ‖r‖)`` -> (still active
    (k,) bool, error estimate / scale, ‖r‖ / scale, scale)."""

    def __init__(self, k: int, tol: float, stop: str, device):
        self.tol, self.stop = tol, stop
        self.floor = torch.full((k,), -torch.inf, dtype=DTYPE, device=device)   # running max of Ritz values k+1..
        self.last = torch.full((k,), torch.inf, dtype=DTYPE, device=device)     # θ of the previous iteration
        self.prev_step = torch.full((k,), torch.inf, dtype=DTYPE, device=device)  # |Δθ| of the previous iteration
        self.claimed = torch.zeros(k, dtype=torch.bool, device=device)  # the estimate passed at the previous check

    def check(self, theta, theta_all, rnorm):
        tol = self.tol
        scale = theta_all.abs().max().clamp_min(torch.finfo(DTYPE).tiny)
        rel = rnorm / scale
        step = (theta - self.last).abs()
        if self.stop == "residual":
            err = rel
            active = err > tol
        else:
            err, self.floor = _temple_errors(theta, theta_all, rnorm, self.floor)
            # ... and at least the geometric extrapolation of the last step, Δθ·ρ/(1−ρ) with ρ the
            # observed contraction of Δθ: slow convergence reveals a gap smaller than the Ritz values suggest.
            if bool(torch.isfinite(self.last).all()):   # from the second check on (the first is the residual rule)
                rho = (step / self.prev_step).nan_to_num(1.0).clamp(0.0, 0.99)   # prev_step = inf first: ρ = 0
                err = torch.maximum(err, step * rho / (1 - rho))
                self.prev_step = step
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
            active = ~(passed & ((self.claimed & (step <= tol * scale)) | (rel <= tol)))
            self.claimed = passed
        self.last = theta
        return active, err, rel, scale


def top_eigenvalues(op, k: int = 1, tol: float = 1e-3, init: torch.Tensor | None = None,
                    max_hvps: int | None = None, generator: torch.Generator | None = None,
                    stop: str = "residual", known: tuple[torch.Tensor, torch.Tensor] | None = None) -> EigResult:
    """The k largest (algebraic) eigenvalues and eigenvectors of the symmetric operator ``op``.

    ``op`` has ``.dim``, ``.matvec(v)`` for v of shape (n,), ``.hvps`` (a counter) and optionally ``.dtype`` (of
    the solver's n-vectors, :func:`work_dtype`; the images it returns are cast to it).
    ``init``: warm-start vectors (n,) or (n, j); missing columns are drawn from ``generator`` (a private
    generator seeded 0 when None, so the global RNG is never touched). ``max_hvps`` caps the cost
    (default 60·k); when it is hit the best Ritz pairs so far are returned with ``converged=False``.
    ``stop``: "residual" (vectors and values to tol) or "eigenvalue" (values only, fewer HVPs); see the module doc.
    ``known``: (V, AV), vectors (n,) or (n, j) whose images A·V the caller already has (e.g. the gradient g and Hg
    from step sharpness): they join the first Rayleigh–Ritz at no HVP cost. Without ``init`` they are the whole
    start subspace (topped up with random vectors below rank k). The Rayleigh–Ritz keeps the direction of largest
    θ, so a known vector inside an invariant subspace that misses the top eigenvector can trap a cold solve even
    beside a random start; the Prober passes them only beside a warm start (whose θ is near λ_max already).
    Memory: 4 n-vectors (5 at the peak) for k = 1, 6k for k > 1, in the operator's dtype (module doc). ``init`` and
    ``known`` are let go after the first Rayleigh–Ritz: passed without a reference kept (as the Prober does), their
    memory is free for the rest of the solve.
    """
    n, max_hvps = _checked_arguments(op, k, tol, stop, max_hvps)
    device = getattr(op, "device", torch.device("cpu"))
    dtype = work_dtype(op)
    start = op.hvps
    gen = generator if generator is not None else torch.Generator().manual_seed(0)

    if 3 * k >= n:  # the subspace would be the whole space: take the dense matrix (n HVPs)
        a = op.matvec(torch.eye(n, dtype=dtype, device=device)).to(DTYPE)
        lam, u = torch.linalg.eigh(0.5 * (a + a.T))
        order = torch.argsort(lam, descending=True)[:k]
        zero = torch.zeros(k, dtype=DTYPE)
        return _with_operator_error(EigResult(lam[order].cpu(), u[:, order].to(dtype), op.hvps - start, True, 0,
                                              zero, zero.clone()), op, tol, lam.abs().max())
    if init is not None:
        init = init.detach()
        init = init[:, None] if init.dim() == 1 else init
        if init.shape[0] != n:
            raise ValueError(f"probes: init has {init.shape[0]} rows, operator dimension is {n}")
    # [init, V, AV], which the solver empties after its first Rayleigh–Ritz: no frame of this solve holds them after
    # that, so a caller that handed them over (kept no reference) gets their memory back for the rest of the solve
    given = [init, *_known_pairs(known, n, device)]
    del init, known
    solve = _solve_one if k == 1 else _solve_block
    return solve(op, k, tol, given, max_hvps, gen, stop, device, dtype, start)


def _checked_arguments(op, k: int, tol: float, stop: str, max_hvps: int | None) -> tuple[int, int]:
    """(n, max_hvps) of a solve, max_hvps defaulting to 60·k; ValueError for an impossible k, tol, stop or cap."""
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
    return n, max_hvps


def _hvp(op, v: torch.Tensor, dtype) -> torch.Tensor:
    return op.matvec(v).to(dtype)


def _start(op, k, given, gen, s, a_s, ws):
    """Start vectors in the rows of s (capacity 2k) and their images in a_s: init (or random) orthonormalised, then
    the first Rayleigh–Ritz with the known pairs (``given`` = [init, V, AV]). Returns the basis and image row lists
    and (θ, Y, θ_RR)."""
    init, known_v, known_av = given
    j = 0
    if init is not None:
        j = min(k, init.shape[1])
        s[:j].copy_(init[:, :j].T)
        j = _orthonormalize_(s[:j], ws)   # drops dependent (e.g. zero) columns: topped up below
    # Known pairs stand in for random start vectors when there is no init; their rank is checked below.
    want = k if init is not None else k - known_v.shape[0]
    while j < want:   # random columns (and top-up where init was rank-deficient)
        s[j:want].copy_(torch.randn(want - j, s.shape[1], generator=gen, dtype=s.dtype))
        j = _orthonormalize_(s[:want], ws)
    for i in range(j):
        a_s[i].copy_(_hvp(op, s[i], s.dtype))
    basis, images = [s[:j], known_v], [a_s[:j], known_av]
    theta, y, theta_all = _rayleigh_ritz(_gram(basis, ws=ws), _gram(basis, images, ws), k)
    if theta.shape[0] < k:   # the known vectors were rank-deficient: add random directions and their images
        extra = k - theta.shape[0]
        s[j:j + extra].copy_(torch.randn(extra, s.shape[1], generator=gen, dtype=s.dtype))
        for i in range(j, j + extra):
            a_s[i].copy_(_hvp(op, s[i], s.dtype))
        basis, images = [s[:j + extra], known_v], [a_s[:j + extra], known_av]
        theta, y, theta_all = _rayleigh_ritz(_gram(basis, ws=ws), _gram(basis, images, ws), k)
    return basis, images, theta, y, theta_all


def _solve_one(op, k, tol, given, max_hvps, gen, stop, device, dtype, start) -> EigResult:
    """k = 1: LOBPCG on span[x, w, p] in 4 rows [x, w, p, A·p] (A·x = θx + ρw implicit, ρ = ‖r‖), plus A·w."""
    n = int(op.dim)
    buf = torch.empty(4, n, dtype=dtype, device=device)
    ws: dict = {}   # chunk scratch (fp64, a few rows × CHUNK), reused by every pass of this solve
    basis, images, theta, y, theta_all = _start(op, 1, given, gen, buf[0:2], buf[2:4], ws)
    # x = Yᵀ S and r = Yᵀ AS − θ x, written over the start rows in place (A·x itself is never stored)
    m = y.shape[0]
    coef = torch.zeros(2, 2 * m, dtype=DTYPE, device=y.device)
    coef[0, :m], coef[1, :m], coef[1, m:] = y[:, 0], -theta[0] * y[:, 0], y[:, 0]
    _combine(basis + images, coef, buf[0:2], ws)
    del basis, images
    given.clear()   # init and the known pairs are read for the last time (top_eigenvalues)
    x, w = buf[0:1], buf[1:2]
    rho = float(_gram([w], ws=ws).sqrt())
    rule = _StopRule(1, tol, stop, theta.device)
    n_p, iterations, converged = 0, 0, False
    while True:
        active, err, rel, scale = rule.check(theta, theta_all, torch.full_like(theta, rho))
        if not bool(active.any()):
            converged = True
            break
        if op.hvps - start + 1 > max_hvps:
            break
        iterations += 1
        w.div_(rho)   # A·w at full relative precision; now A·x = θx + ρw
        aw = _hvp(op, w[0], dtype)[None]
        rows = [buf[:2 + 2 * n_p], aw]              # [x, w, (p, A·p), A·w]
        d = _gram(rows, ws=ws)
        m, iw = 2 + n_p, 2 + 2 * n_p                # basis size; row of A·w in d
        g = d[:m, :m]
        h = torch.empty(m, m, dtype=DTYPE, device=d.device)
        h[:, 0] = theta[0] * g[:, 0] + rho * g[:, 1]
        h[:, 1] = d[:m, iw]
        if n_p:
            h[:, 2] = d[:m, 3]
        t0 = float(theta[0])
        theta, y, theta_all = _rayleigh_ritz(g, h, 1)
        c = y[:, 0]
        a0, a1, a2 = float(c[0]), float(c[1]), float(c[2]) if n_p else 0.0
        # new rows as combinations of [x, w, p, A·p, A·w]: x' = a0x + a1w + a2p, p' = a1w + a2p (the part outside
        # the old x), A·p' = a1A·w + a2A·p, and r' = A·x' − θ'x' with A·x = θx + ρw.
        t = float(theta[0])
        coef = torch.tensor([[a0, a1, a2, 0.0, 0.0],
                             [a0 * (t0 - t), a0 * rho - t * a1, -t * a2, a2, a1],
                             [0.0, a1, a2, 0.0, 0.0],
                             [0.0, 0.0, 0.0, a2, a1]], dtype=DTYPE)
        if not n_p:   # no p, A·p rows yet
            coef = coef[:, [0, 1, 4]]
        _combine(rows, coef, buf, ws)
        del aw, rows
        n_p = 1
        rho = float(_gram([w], ws=ws).sqrt())
    vec = x.T.clone()
    del buf, x, w
    return _with_operator_error(EigResult(theta.cpu(), vec, op.hvps - start, converged, iterations, rel.cpu(),
                                          err.cpu()), op, tol, scale)


def _solve_block(op, k, tol, given, max_hvps, gen, stop, device, dtype, start) -> EigResult:
    """k > 1: block LOBPCG on S = [X; P; W] (3k rows) and A·S, both updated in place."""
    n = int(op.dim)
    s = torch.empty(3 * k, n, dtype=dtype, device=device)
    a_s = torch.empty(3 * k, n, dtype=dtype, device=device)
    ws: dict = {}   # chunk scratch (fp64, a few rows × CHUNK), reused by every pass of this solve
    basis, images, theta, y, theta_all = _start(op, k, given, gen, s[:2 * k], a_s[:2 * k], ws)
    _combine(basis, y.T, s[:k], ws)
    _combine(images, y.T, a_s[:k], ws)
    del basis, images
    given.clear()   # init and the known pairs are read for the last time (top_eigenvalues)
    n_p = 0                         # rows of P currently in the basis (none before the first iteration)
    rule = _StopRule(k, tol, stop, theta.device)
    eye = torch.eye(k, dtype=DTYPE, device=theta.device)
    iterations, converged = 0, False
    while True:
        w0 = k + n_p                # W rows start here; r = A x − θ x is written there (3k rows leave room)
        r = s[w0:w0 + k]
        _combine([s[:k], a_s[:k]], torch.cat([-torch.diag(theta), eye], dim=1), r, ws)
        rnorm = _gram([r], ws=ws).diagonal().clamp_min(0).sqrt()
        active, err, rel, scale = rule.check(theta, theta_all, rnorm)
        n_w = int(active.sum())
        if n_w == 0:
            converged = True
            break
        if op.hvps - start + n_w > max_hvps:
            break
        iterations += 1
        m = w0 + n_w
        # W = unconverged residuals, moved up in order (a row only moves up: nothing unread is overwritten) and
        # rescaled to unit norm so A·w is computed at full relative precision
        for j, i in enumerate(torch.nonzero(active).squeeze(1).tolist()):
            if i != j:
                s[w0 + j].copy_(s[w0 + i])
            s[w0 + j].div_(float(rnorm[i]))
            a_s[w0 + j].copy_(_hvp(op, s[w0 + j], dtype))
        d = _gram([s[:m], a_s[:m]], ws=ws)
        theta, y, theta_all = _rayleigh_ritz(d[:m, :m], d[:m, m:], k)
        # New X = Yᵀ S and P = the part of it outside the old X (Knyazev's implicit conjugate direction), both
        # from one product with [Y, Y with its X rows zeroed], written over the first 2k rows in place.
        y2 = torch.cat([y, y], dim=1)
        y2[:k, k:] = 0
        _combine([s[:m]], y2.T, s[:2 * k], ws)
        _combine([a_s[:m]], y2.T, a_s[:2 * k], ws)
        n_p = k
    x = s[:k].clone()
    del s, a_s
    return _with_operator_error(EigResult(theta.cpu(), x.T, op.hvps - start, converged, iterations, rel.cpu(),
                                          err.cpu()), op, tol, scale)


def _with_operator_error(res: EigResult, op, tol: float, scale) -> EigResult:
    """Add the operator's own error bound (fd HVPs, :func:`probes.hvp.operator_error`) to ``errors``: an eigenvalue
    of Â is within ‖Â − A‖ of one of A, so a solve is not converged when that bound exceeds tol·scale."""
    bound = operator_error(op)
    if bound == 0.0:
        return res
    rel = bound / max(float(scale), torch.finfo(DTYPE).tiny)
    errors = res.errors if res.errors is not None else res.residuals
    res.errors = torch.clamp(errors, min=rel)
    res.converged = res.converged and rel <= tol
    return res


def _known_pairs(known, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(V, AV) as ROWS (j, n): transposed views of the caller's tensors, in their own dtype (read chunk by chunk,
    never copied whole), without zero or non-finite vectors (e.g. a zero gradient)."""
    empty = torch.empty(0, n, dtype=DTYPE, device=device)
    if known is None:
        return empty, empty
    v, av = (t.detach().to(device=device) for t in known)
    v, av = (t[:, None] if t.dim() == 1 else t for t in (v, av))
    if v.shape != av.shape or v.shape[0] != n:
        raise ValueError(f"probes: known vectors {tuple(v.shape)} and images {tuple(av.shape)} must both be (n={n}, j)")
    ok = [bool(v[:, i].norm() > 0) and bool(torch.isfinite(v[:, i]).all()) and bool(torch.isfinite(av[:, i]).all())
          for i in range(v.shape[1])]
    if not all(ok):
        keep = [i for i, good in enumerate(ok) if good]
        v, av = v[:, keep], av[:, keep]
    return v.T, av.T


def _temple_errors(theta, theta_all, rnorm, floor):
    """Bounds on |λ_i − θ_i| for the top-k Ritz pairs: ‖r_i‖²/δ_i where ‖r_i‖ ≤ δ_i/TEMPLE_MARGIN, else ‖r_i‖.

    δ_i = min(θ_{i−1} − θ_i, θ_i − floor_i); floor_i is the running maximum (over iterations) of the (i+1)-th
    Ritz value, a lower bound of λ_{i+1} (Cauchy interlacing), so it only tightens. Returns (bounds, new floor).
    """
    k = theta.shape[0]
    ordered = torch.sort(theta_all, descending=True).values
    below = torch.full((k,), -torch.inf, dtype=DTYPE, device=theta.device)
    n_below = min(k, ordered.shape[0] - 1)   # Ritz values ranked 2..k+1 that exist in this subspace
    below[:n_below] = ordered[1:1 + n_below]
    floor = torch.maximum(floor, below)
    gap = theta - floor                                      # +inf where no Ritz value below was seen yet
    if k > 1:
        gap[1:] = torch.minimum(gap[1:], theta[:-1] - theta[1:])
    gap = torch.where(torch.isfinite(gap), gap, torch.zeros_like(gap))   # no neighbour seen yet: no gap known
    temple = rnorm ** 2 / gap.clamp_min(torch.finfo(DTYPE).tiny)
    return torch.where(rnorm * TEMPLE_MARGIN <= gap, torch.minimum(temple, rnorm), rnorm), floor
