"""The lean solver: fp32 n-vectors against fp64 ground truth, HVP counts against the solver it replaced
(experiments/bench/reference_eigs.py), and the parameter-sized tensors it keeps alive."""
import copy
import gc
import weakref

import pytest
import torch

import probes.eigs
from experiments.bench.reference_eigs import top_eigenvalues as reference_top_eigenvalues
from probes import HessianOperator, LinearOperator, ProbeConfig, ProbeContext, Prober, top_eigenvalues
from probes.testing import mlp_problem

D, F = torch.float64, torch.float32


def spectrum_matrix(eigs, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=g, dtype=D))
    return q @ torch.diag(torch.as_tensor(eigs, dtype=D)) @ q.T


def spectra(n=400):
    """Hessian-like spectra: outliers over a bulk, negative eigenvalues of larger magnitude than λ_max, and a
    near-degenerate top pair (10, 9.99)."""
    bulk = torch.linspace(-0.5, 0.5, n - 6, dtype=D)
    return {
        "outliers": spectrum_matrix(torch.cat([torch.tensor([10.0, 6.0, 4.0, 3.0, -12.0, -20.0], dtype=D), bulk])),
        "near_pair": spectrum_matrix(torch.cat([torch.tensor([10.0, 9.99, 5.0, 1.0, -15.0, -30.0], dtype=D), bulk]),
                                     seed=2),
        "power_law": spectrum_matrix(torch.cat([50.0 / torch.arange(1, 41, dtype=D),
                                                -torch.linspace(0.0, 80.0, n - 40, dtype=D)]), seed=3),
    }


def fp32_operator(a):
    """The matrix rounded to fp32, applied in fp32 (an fp32 HVP); its exact spectrum is that of the rounded matrix."""
    a32 = a.to(F)
    return LinearOperator(a.shape[0], lambda v: a32 @ v, dtype=F), torch.linalg.eigvalsh(a32.to(D)).flip(0)


def as_main_operator(op):
    """What the reference solver saw on main: fp64 vectors in and out around the same fp32 HVP."""
    return op if op.dtype == D else LinearOperator(op.dim, lambda v: op.matvec(v.to(F)).to(D))


@pytest.mark.parametrize("name", ["outliers", "near_pair", "power_law"])
@pytest.mark.parametrize("k", [1, 3])
def test_fp32_operator_meets_tol_against_exact_spectrum(name, k):
    op, truth = fp32_operator(spectra()[name])
    for stop in ("residual", "eigenvalue"):
        if name == "near_pair" and stop == "eigenvalue":
            continue   # the documented blind spot of the eigenvalue estimate (probes/eigs.py): partner not resolved
        for seed in range(3):
            res = top_eigenvalues(op, k=k, tol=1e-3, stop=stop, max_hvps=300,
                                  generator=torch.Generator().manual_seed(seed))
            assert res.converged and res.vectors.dtype == F and res.values.dtype == D
            err = (res.values - truth[:k]).abs()
            assert float(err.max()) <= 1e-3 * float(truth.abs().max()), (stop, seed, res.values, truth[:k])
            if stop == "residual":   # λ to ~‖r‖²/gap, and Ritz vectors orthonormal to fp32 precision
                assert float((err / truth[:k].abs()).max()) <= 1e-3
                gram = res.vectors.to(D).T @ res.vectors.to(D)
                torch.testing.assert_close(gram, torch.eye(k, dtype=D), atol=1e-5, rtol=0)


def test_fp32_tiny_net_hessian_matches_dense_fp64():
    """A tanh MLP in fp32 against the dense Hessian of the same (fp32-rounded) weights and data in fp64."""
    model64, params64, loss64, chunks64 = mlp_problem(chunk=64)
    with torch.no_grad():
        for p in params64.values():
            p.copy_(p.to(F).to(D))
    chunks64 = [(x.to(F).to(D), y.to(F).to(D)) for x, y in chunks64]
    truth = torch.linalg.eigvalsh(HessianOperator(params64, loss64, chunks64, mode="recompute").dense()).flip(0)
    model32 = copy.deepcopy(model64).to(F)
    chunks32 = [(x.to(F), y.to(F)) for x, y in chunks64]
    n_pts = sum(x.shape[0] for x, _ in chunks32)

    def loss32(c):
        return ((model32(c[0]) - c[1]) ** 2).sum() / n_pts
    op = HessianOperator(dict(model32.named_parameters()), loss32, chunks32)
    assert op.dtype == F
    cold = top_eigenvalues(op, k=1, tol=1e-3)
    assert cold.converged and cold.vectors.dtype == F
    assert abs(float(cold.values[0]) - float(truth[0])) <= 1e-3 * abs(float(truth[0]))
    three = top_eigenvalues(op, k=3, tol=1e-4, max_hvps=300)
    torch.testing.assert_close(three.values, truth[:3], rtol=1e-4, atol=0)
    # the same answer as the fp64 reference solver, which takes no fewer HVPs
    ref = reference_top_eigenvalues(op, k=1, tol=1e-3)
    assert abs(float(ref.values[0]) - float(cold.values[0])) <= 1e-3 * abs(float(truth[0]))
    assert cold.hvps <= ref.hvps + 1
    # warm start at the same operator: 1 HVP
    assert top_eigenvalues(op, k=1, tol=1e-3, init=top_eigenvalues(op, k=1, tol=1e-6).vectors).hvps == 1


@pytest.mark.parametrize("stop", ["residual", "eigenvalue"])
def test_hvps_not_worse_than_the_reference_solver(stop):
    """Same problems, same start vectors: per solve at most 1 HVP more than the fp64 solver it replaced (fp32
    rounding can shift a stop by one iteration either way), and no more in total; warm starts still cut HVPs."""
    total, total_ref = 0, 0
    for name, a in spectra().items():
        for make in (LinearOperator.from_matrix, lambda m: fp32_operator(m)[0]):
            op = make(a)
            for k in (1, 3):
                if name == "near_pair" and stop == "eigenvalue":
                    continue
                for seed in range(3):
                    x0 = torch.randn(a.shape[0], k, generator=torch.Generator().manual_seed(seed), dtype=D)
                    new = top_eigenvalues(op, k=k, tol=1e-3, stop=stop, max_hvps=300, init=x0)
                    ref = reference_top_eigenvalues(as_main_operator(op), k=k, tol=1e-3, stop=stop, max_hvps=300,
                                                    init=x0)
                    assert new.hvps <= ref.hvps + 1, (name, k, seed, new.hvps, ref.hvps)
                    total, total_ref = total + new.hvps, total_ref + ref.hvps
    assert total <= total_ref
    op, _ = fp32_operator(spectra()["outliers"])
    cold = top_eigenvalues(op, k=1, tol=1e-3, stop=stop)
    b = spectra()["outliers"] + 1e-3 * spectrum_matrix(torch.linspace(-1, 1, 400, dtype=D), seed=5)
    warm = top_eigenvalues(fp32_operator(b)[0], k=1, tol=1e-3, stop=stop, init=cold.vectors)
    assert warm.converged and warm.hvps <= 4 < cold.hvps


class CountingOperator:
    """A = diag(d) + U Uᵀ in fp32 (n large, no n×n matrix); at every matvec it counts the bytes of the
    parameter-sized tensors alive in the process (gc: every torch.Tensor object; storages counted once, however
    many views) that were not alive at ``baseline()`` (called just before the solve: its own d, U, the caller's
    tensors and whatever else the process holds, kept referenced so that no new tensor can reuse their memory),
    in units of one n-vector of ``dtype``: ``held`` when the solver calls it (its state, the input included),
    ``peak`` with the image it returns."""

    def __init__(self, n=200_000, dtype=F, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.dim, self.dtype, self.hvps = n, dtype, 0
        self.d = torch.linspace(-2.0, 1.0, n, dtype=dtype)[torch.randperm(n, generator=g)]
        self.u = torch.randn(n, 3, generator=g, dtype=dtype) * torch.tensor([1.0, 0.7, 0.5], dtype=dtype) / n ** 0.5 * 3
        self.held, self.peak, self.before = [], [], []

    def _large(self) -> list[torch.Tensor]:
        return [obj for obj in gc.get_objects()    # type(), not isinstance: no __class__ lookups on odd objects
                if issubclass(type(obj), torch.Tensor) and obj.untyped_storage().nbytes() >= self.dim * 4]

    def baseline(self) -> None:
        self.held, self.peak = [], []
        self.before = self._large()

    def _count(self) -> float:
        old = {t.untyped_storage().data_ptr() for t in self.before}
        sizes = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in self._large()}
        return sum(b for ptr, b in sizes.items() if ptr not in old) / (self.dim * torch.finfo(self.dtype).bits // 8)

    def matvec(self, v):
        self.held.append(self._count())
        self.hvps += 1
        out = self.d * v + self.u @ (self.u.T @ v)
        self.peak.append(self._count())
        return out


@pytest.mark.parametrize("stop", ["residual", "eigenvalue"])
def test_k1_solver_holds_at_most_4_fp32_vectors(monkeypatch, stop):
    """The λ_max solve: 4 fp32 n-vectors held when it calls the operator, 5 with the image just returned, at every
    HVP (a growing basis, or any fp64 n-vector, would exceed it); the caller's init and known pairs are not
    copied. CHUNK is lowered so that the chunked fp64 temporaries are far below an n-vector here, as on a model."""
    monkeypatch.setattr(probes.eigs, "CHUNK", 1024)
    op = CountingOperator()
    op.baseline()
    res = top_eigenvalues(op, k=1, tol=1e-6, stop=stop, max_hvps=80)
    assert res.converged and res.hvps >= 5 and res.vectors.dtype == F
    assert max(op.held) <= 4.0 + 1e-9 and max(op.peak) <= 5.0 + 1e-9, (op.held, op.peak)
    # warm start with known pairs (as the Prober solves): the caller's tensors are read in place, not copied
    init = res.vectors
    g = torch.randn(op.dim, generator=torch.Generator().manual_seed(1), dtype=F)
    hg = op.matvec(g)
    op.baseline()
    warm = top_eigenvalues(op, k=1, tol=1e-3, stop=stop, init=init, known=(g, hg))
    assert warm.converged and max(op.held) <= 4.0 + 1e-9 and max(op.peak) <= 5.0 + 1e-9, (op.held, op.peak)


def test_block_solver_holds_6k_vectors_and_the_reference_held_more(monkeypatch):
    monkeypatch.setattr(probes.eigs, "CHUNK", 1024)
    op = CountingOperator(n=100_000)
    op.baseline()
    res = top_eigenvalues(op, k=3, tol=1e-5, max_hvps=200)
    assert res.converged and max(op.held) <= 18.0 + 1e-9 and max(op.peak) <= 19.0 + 1e-9
    # the solver this replaced, on the same operator: 12k fp64 n-vectors at least (24k in fp32 units) for k = 3,
    # and 12 fp64 for k = 1 -- the count would catch a return to it
    op = CountingOperator(n=100_000, dtype=D)
    op.baseline()
    reference_top_eigenvalues(op, k=1, tol=1e-5, max_hvps=40)
    assert max(op.held) >= 12.0   # fp64 n-vectors


def test_dot64_accumulates_in_float64_without_a_float64_copy(monkeypatch):
    monkeypatch.setattr(probes.eigs, "CHUNK", 2)   # the cancellation spans chunks
    a = torch.tensor([1e8, 1.0, -1e8, 3.0, 0.5], dtype=F)
    b = torch.ones(5, dtype=F)
    assert float(a @ b) != 4.5                     # float32 accumulation loses the 1 under 1e8
    assert probes.eigs.dot64(a, b) == 4.5 and probes.eigs.dot64(b) == 5.0


class GradientCountingOperator(CountingOperator):
    """CountingOperator with a gradient, returned as a copy (as HessianOperator.gradient does)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.g = torch.randn(self.dim, generator=torch.Generator().manual_seed(7), dtype=self.dtype)
        self.device = self.g.device

    def gradient(self):
        return self.g.clone()


def test_rayleigh_step_and_alignment_keep_fp32_vectors_and_fp64_accuracy(monkeypatch):
    """The cheap probes between solves on an fp32 operator: no float64 n-vector (the Rayleigh quotient holds
    nothing of its own at its HVP, step sharpness only its copy of g), and values equal to the float64 formulas."""
    from probes.sharpness import alignment, rayleigh_pair, step_pair
    monkeypatch.setattr(probes.eigs, "CHUNK", 1024)
    op = GradientCountingOperator()
    u = torch.randn(op.dim, generator=torch.Generator().manual_seed(3), dtype=F)
    a64 = lambda v: op.d.to(D) * v + op.u.to(D) @ (op.u.to(D).T @ v)   # noqa: E731 (the same A in float64)
    op.baseline()
    value, u_out, hu = rayleigh_pair(op, u)
    assert max(op.held) <= 1e-9 and max(op.peak) <= 1.0 + 1e-9, (op.held, op.peak)
    assert u_out.dtype == hu.dtype == F and u_out.data_ptr() == u.data_ptr()
    u64 = u.to(D)
    assert abs(value - float(u64 @ a64(u64) / (u64 @ u64))) <= 1e-6 * abs(value)
    op.baseline()
    value, g, hg = step_pair(op)
    assert max(op.held) <= 1.0 + 1e-9 and max(op.peak) <= 2.0 + 1e-9, (op.held, op.peak)
    g64 = op.g.to(D)
    assert g.dtype == F and abs(value - float(g64 @ a64(g64) / (g64 @ g64))) <= 1e-6 * abs(value)
    cos = alignment(op, u)
    assert abs(cos - abs(float(u64 @ g64)) / float(u64.norm() * g64.norm())) <= 1e-6


def storage_ref(t: torch.Tensor) -> weakref.ref:
    """A weak reference to ``t``'s storage, alive while any tensor (a view or detached alias too) uses it: torch
    keeps one Python object per live storage."""
    return weakref.ref(t.untyped_storage())


class WatchingOperator(CountingOperator):
    """CountingOperator that records, at every matvec, which of the watched tensors' storages are still alive."""

    def watch(self, *tensors) -> None:
        self.refs, self.alive = [storage_ref(t) for t in tensors], []

    def matvec(self, v):
        self.alive.append([r() is not None for r in self.refs])
        return super().matvec(v)


@pytest.mark.parametrize("k", [1, 3])
def test_solver_lets_go_of_init_and_known_pairs_after_the_first_rayleigh_ritz(k):
    """Handed over (no reference kept by the caller), the warm start and the known pair are freed once the first
    Rayleigh–Ritz has read them: from the second round of HVPs on, none of them is alive."""
    op = WatchingOperator(n=20_000)
    gen = torch.Generator().manual_seed(2)

    def handed():
        init, g = torch.randn(op.dim, k, generator=gen), torch.randn(op.dim, generator=gen)
        op.watch(init, g)
        return [init, (g, op.matvec(g))]

    args = handed()
    res = top_eigenvalues(op, k=k, tol=1e-6, known=args.pop(), init=args.pop(), max_hvps=200)
    assert res.converged and len(op.alive) > 2 * k + 1
    first = 1 + k   # the pair's own image, then the k start vectors' images (before the first Rayleigh–Ritz)
    assert all(all(a) for a in op.alive[:first]) and not any(any(a) for a in op.alive[first:]), op.alive


@pytest.mark.parametrize("key", ["H", "adam"])
def test_prober_hands_its_stored_eigenvector_to_the_solve(key):
    """A solve's warm start leaves the Prober's store when the solve takes it: at the last HVP of the call's last
    solve (λ_max, or the Adam λ_max after it; a recomputed HVP calls the loss) the previous eigenvector is gone,
    not kept beside the solver's vectors."""
    model, params, loss_fn, chunks = mlp_problem(chunk=64)
    adam = key == "adam"
    opt = torch.optim.Adam(params.values(), lr=0.01) if adam else torch.optim.SGD(params.values(), lr=0.05)
    cfg = ProbeConfig(every=1, mode="recompute", adam=adam, critical_every=0, alignment_every=0,
                      update_sharpness=False, tol=1e-8)
    prober = Prober(cfg)
    sum(loss_fn(c) for c in chunks).backward()   # Adam needs state before its λ_max is defined
    opt.step()
    opt.zero_grad()
    prober(ProbeContext(params, loss_fn, chunks, lr=0.05, step=0, optimizer=opt, model=model))
    old = storage_ref(prober.state_dict()[f"warm.{key}"])
    sum(loss_fn(c) for c in chunks).backward()
    opt.step()
    opt.zero_grad()
    seen = []

    def watching_loss(c):
        seen.append(old() is not None)
        return loss_fn(c)
    out = prober(ProbeContext(params, watching_loss, chunks, lr=0.05, step=1, optimizer=opt, model=model))
    assert out["probe/hvps"] >= 3 and seen[0] and not seen[-1], (out["probe/hvps"], seen)
    assert old() is None
