"""Hessian-vector products of a chunked loss over a chosen set of parameters.

The operator is H = ∇²_θ Σ_c L_c(θ), the Hessian of the SUM of chunk losses over the parameters given (LoRA
adapters only under LoRA, so its dimension is the trainable-parameter count). Each chunk loss is already weighted
so that the chunks sum to the full probe-batch loss, which makes the chunked HVP exact.

Modes (cost in G = one gradient of the probe batch on CPU, on a tanh MLP and on the 1.8M-parameter GPT-NeoX of
experiments/bench/probe_speed.py):
- ``cache``: one forward + ``grad(create_graph=True)`` per chunk (≈1.3 G), graphs kept; each HVP is one extra
  backward through them (MLP ≈1.6 G, GPT-NeoX ≈2.0–2.2 G: 6 matmuls per linear layer, the minimum for an exact
  HVP, plus the elementwise double backward of GELU/LayerNorm/softmax/CE). The graphs are rebuilt when a parameter's
  ``_version`` changes (an in-place update), and hold the activations of every chunk. ``cache_mb`` > 0 bounds them:
  chunks are kept in order while their bytes (what their graphs saved, counted by saved-tensor hooks at the build,
  the parameters excluded, plus the chunk's own gradient) stay within it; every later chunk is recomputed at each
  HVP, as in ``recompute``, from the RNG state it was built with. The results are bit for bit those of the unbounded
  cache (the same operations).
- ``recompute``: every HVP re-runs forward + double backward per chunk (MLP ≈2.8 G, GPT-NeoX ≈3.2–3.7 G), memory
  of one chunk.
- ``fd``: Richardson-extrapolated central differences R = D(t/2) + (D(t/2) − D(t))/3 with
  D(t) = (∇L(θ+tv) − ∇L(θ−tv)) / 2t (4 G): truncation O(t⁴) instead of O(t²). ‖tv‖ = h·(1 + RMS(θ)) with
  h = 0.1·eps^(1/5) of the parameter dtype (4e-3 in fp32, 7e-5 in fp64), the balance of the t⁴ truncation and the
  eps/t rounding, its factor measured on the tiny GPT-NeoX (probes.testing). There, in fp32, Hv is accurate to
  ~3e-5 relative along the top eigenvector and the gradient (~3e-4 along a random direction, whose Hv is small);
  ~1e-10 in fp64 (a plain central difference at ‖tv‖ = eps^(1/3)·(1 + ‖θ‖) is 8 % off along its top
  eigenvector: the step scales with the norm of all n parameters). Every fd HVP also bounds its own error,
  2‖D(t/2) − D(t)‖/‖v‖ (it bounds both the truncation of D(t/2), 3× that of R, and the rounding noise of R, 1.2×
  that of the difference), kept as the running max ``hvp_error``; :func:`probes.eigs.top_eigenvalues` adds it to
  its error bound and does not call a solve converged when it exceeds tol·|λ|. Survives kernels without double
  backward. Parameters are restored bit for bit from a copy, without bumping their ``_version`` (so a cache-mode
  operator on the same parameters keeps its graphs).

Every pass over the chunks (graph build, gradient, recompute HVP, each fd gradient) runs with the global RNG set
to the state it had when the operator was built, and the caller's RNG state is restored after it: the operator
never advances the torch (CPU and CUDA), numpy or python RNG, and a model in train mode (dropout) gives one fixed
operator, the Hessian of the loss under the same dropout masks in every pass and mode.

Why our own operator rather than hessian-eigenthings/PyHessian: neither keeps the first-order graph across chunks
(hessian-eigenthings recomputes it per HVP: 1.6 G vs 2.8 G on an MLP, 2.0–2.2 G vs 3.2–3.7 G on the GPT-NeoX
bench), weights chunks by their share of the loss, or refuses attention kernels without double backward
(:func:`check_model`).

Vectors are flat on the parameter device; the HVP itself runs in the parameter dtype. ``matvec`` returns float32
for a float32 vector (``dtype``, what :func:`probes.eigs.top_eigenvalues` keeps its n-vectors in, is float32 for
float32, bf16 and fp16 parameters: no fp64 copy of a parameter-sized vector) and float64 for a float64 one.
"""
from __future__ import annotations

import contextlib
import functools
import random
import warnings
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

__all__ = ["HessianOperator", "LinearOperator", "hvp_guard", "check_model", "flatten", "as_named_params",
           "rng_state", "fixed_rng", "operator_error"]

MODES = ("cache", "recompute", "fd")
REDUCE_DTYPE = torch.float64
_FLASH = ("flash_attention_2", "flash_attention_3", "flash_attention")


def as_named_params(params: Mapping[str, torch.Tensor] | Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Names -> tensors; a plain iterable gets names "0", "1", ... Every tensor must require grad."""
    named = dict(params) if isinstance(params, Mapping) else {str(i): p for i, p in enumerate(params)}
    if not named:
        raise ValueError("probes: no parameters given (is every parameter frozen?)")
    for name, p in named.items():
        if not isinstance(p, torch.Tensor) or not p.requires_grad:
            raise ValueError(f"probes: parameter {name!r} must be a tensor with requires_grad=True")
    return named


def flatten(tensors: Sequence[torch.Tensor | None], like: Sequence[torch.Tensor], dtype=REDUCE_DTYPE) -> torch.Tensor:
    """Concatenate tensors into one flat vector (None -> zeros shaped like the matching parameter)."""
    return torch.cat([
        (torch.zeros_like(p, dtype=dtype) if t is None else t.detach().to(dtype)).reshape(-1)
        for t, p in zip(tensors, like)
    ])


def check_model(model: torch.nn.Module | None) -> None:
    """Refuse models whose HVP cannot be taken by double backward, with a clear message.

    Flash-attention kernels have no double backward (pytorch #116350); reentrant gradient checkpointing does not
    support ``torch.autograd.grad`` (pytorch #102223). SDPA is handled by :func:`hvp_guard` (math kernel).
    """
    if model is None:
        return
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if impl in _FLASH:
        raise RuntimeError(
            f"probes: the model uses attn_implementation={impl!r}, whose kernel has no double backward, so no "
            "Hessian-vector product can be taken. Load it with attn_implementation='sdpa' (probes switch SDPA to "
            "its math kernel automatically) or 'eager', or use HessianOperator(mode='fd').")
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False) is True:
            func = getattr(module, "_gradient_checkpointing_func", None)
            kwargs = func.keywords if isinstance(func, functools.partial) else {}
            if kwargs.get("use_reentrant", False):
                raise RuntimeError(
                    "probes: reentrant gradient checkpointing is on (use_reentrant=True); it does not support "
                    "torch.autograd.grad, so HVPs are impossible. Enable checkpointing with "
                    "gradient_checkpointing_kwargs={'use_reentrant': False}, or disable it.")


@contextlib.contextmanager
def hvp_guard():
    """Run the enclosed autograd through SDPA's math kernel (the fused CPU/flash/efficient kernels have no double
    backward) and turn the reentrant-checkpoint autograd error into an explanation."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    except RuntimeError as err:
        msg = str(err)
        if "checkpoint" in msg and ("autograd.grad" in msg or "reentrant" in msg):
            raise RuntimeError(
                "probes: HVPs need torch.autograd.grad, which reentrant gradient checkpointing does not support; "
                "use gradient_checkpointing_kwargs={'use_reentrant': False}. Original error: " + msg) from err
        raise


def rng_state() -> tuple:
    """The global RNG states: torch CPU, torch CUDA (None when CUDA is not initialised), numpy, python."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda, np.random.get_state(), random.getstate()


def _set_rng_state(state: tuple) -> None:
    cpu, cuda, np_state, py_state = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
    np.random.set_state(np_state)
    random.setstate(py_state)


@contextlib.contextmanager
def fixed_rng(state: tuple | None = None):
    """Run the block from the global RNG ``state`` (None: the current one) and restore the caller's state after
    it, so the block's random draws (dropout) neither depend on nor advance the caller's RNG."""
    caller = rng_state()
    if state is not None:
        _set_rng_state(state)
    try:
        yield
    finally:
        _set_rng_state(caller)


def operator_error(op: Any) -> float:
    """Bound on ‖(Â − A)v‖ for unit v of an approximate operator (``hvp_error``, the fd mode), through the
    ``base`` of composed operators times their ``error_gain``; 0.0 for exact ones."""
    gain = 1.0
    while op is not None:
        err = getattr(op, "hvp_error", None)
        if err is not None:
            return gain * float(err)
        gain *= float(getattr(op, "error_gain", 1.0))
        op = getattr(op, "base", None)
    return 0.0


class _SavedBytes:
    """Bytes of the distinct storages that autograd saves inside the block (saved-tensor hooks: the forward's and,
    under ``create_graph``, the backward's), less the given parameters' own: what a kept graph holds."""

    def __init__(self, params: Sequence[torch.Tensor]):
        self._skip = {p.untyped_storage().data_ptr() for p in params}
        self._seen: set[int] = set()
        self.bytes = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self._skip and ptr not in self._seen:
            self._seen.add(ptr)
            self.bytes += storage.nbytes()
        # detached: autograd re-attaches the saved metadata on unpack, but a saved OUTPUT packed with its own
        # grad_fn would hold that grad_fn through the graph, a cycle outside Python's collector that leaked every
        # graph built (+2 GB resident after one 70M probe call; tests/test_probes_hvp.py counts the tensors left)
        return t.detach()

    def __enter__(self) -> "_SavedBytes":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


class HessianOperator:
    """v ↦ H v for H = ∇²_θ Σ_c loss_fn(batches[c]) over ``params``; counts HVPs in ``.hvps``.

    ``matvec`` takes a flat vector (n,) or a block (n, k) (k HVPs) and returns the same shape, float32 for a
    float32 v and float64 otherwise. ``dtype``: float32, or float64 for float64 parameters (the solver's vectors).
    ``gradient()`` returns the flat gradient Σ_c ∇L_c (free in ``cache`` mode, 1 G otherwise).
    ``hvp_error``: running max of the fd error bound per unit vector (0.0 in the exact modes). ``fd_step``: the h
    of ‖tv‖ = h·(1 + RMS(θ)) (default 0.1·eps^(1/5) of the parameter dtype). ``cache_mb``: bound on the cached
    graphs in MB (cache mode; 0 = none), chunks past it recomputed per HVP; ``cached_chunks`` says how many fit.
    """

    def __init__(self, params: Mapping[str, torch.Tensor] | Iterable[torch.Tensor],
                 loss_fn: Callable[[Any], torch.Tensor], batches: Sequence[Any], mode: str = "cache",
                 model: torch.nn.Module | None = None, fd_step: float | None = None, cache_mb: float = 0.0):
        if mode not in MODES:
            raise ValueError(f"probes: mode must be one of {MODES}, got {mode!r}")
        if len(batches) == 0:
            raise ValueError("probes: batches is empty; the operator needs at least one chunk")
        named = as_named_params(params)
        self.names = list(named)
        self.params = list(named.values())
        self.loss_fn, self.batches, self.mode, self.model = loss_fn, list(batches), mode, model
        self.dim = sum(p.numel() for p in self.params)
        self.device = self.params[0].device
        self.dtype = torch.float64 if self.params[0].dtype == torch.float64 else torch.float32
        self.hvps = 0               # Hessian-vector products taken (columns of every matvec)
        self.gradient_evals = 0     # first-order passes over the probe batch (graph builds, fd, gradient())
        self.fd_step = fd_step
        self.hvp_error = 0.0
        self._rng = rng_state()   # every pass over the chunks runs from this state (fixed dropout masks)
        low = sorted({str(p.dtype) for p in self.params if p.dtype in (torch.bfloat16, torch.float16)})
        if low:
            warnings.warn(f"probes: parameters in {low}: HVPs lose ~3% accuracy in bf16; "
                          "probe a float32 copy for reliable curvature.", stacklevel=2)
        check_model(model)
        if cache_mb < 0:
            raise ValueError(f"probes: cache_mb must be >= 0 (0 = no bound), got {cache_mb}")
        self.cache_mb = cache_mb
        # per chunk: its first-order grads with their graph (cached), or None (recomputed at each HVP)
        self._graph: list[tuple[torch.Tensor, ...] | None] | None = None
        self._chunk_rng: list[tuple] = []   # the RNG state each chunk was built from
        self._versions: tuple[int, ...] | None = None
        self._grad: torch.Tensor | None = None

    # ---- helpers -------------------------------------------------------------------------------------------
    def _split(self, v: torch.Tensor) -> list[torch.Tensor]:
        out, i = [], 0
        for p in self.params:
            out.append(v[i:i + p.numel()].view_as(p).to(p.dtype))
            i += p.numel()
        return out

    def _flat(self, tensors, dtype=REDUCE_DTYPE) -> torch.Tensor:
        return flatten(tensors, self.params, dtype)

    def _versions_now(self) -> tuple[int, ...]:
        return tuple(p._version for p in self.params)

    def _chunk_grad(self, batch, create_graph: bool) -> tuple[torch.Tensor, ...]:
        loss = self.loss_fn(batch)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise ValueError("probes: loss_fn(batch) must return a scalar tensor")
        return torch.autograd.grad(loss, self.params, create_graph=create_graph, allow_unused=True)

    def _build_graph(self) -> None:
        graph, states, grad, kept, full = [], [], None, 0, False
        bounded = self.cache_mb > 0
        self._graph = None   # a stale graph is not kept alive beside the new one
        with hvp_guard(), fixed_rng(self._rng):
            for batch in self.batches:
                states.append(rng_state())
                with _SavedBytes(self.params) if bounded else contextlib.nullcontext() as saved:
                    grads = self._chunk_grad(batch, create_graph=True)
                flat = self._flat(grads, self.dtype)
                grad = flat if grad is None else grad.add_(flat)
                if bounded:   # kept in order while within the budget; from the first that does not fit, none is
                    # a kept chunk holds what its graph saved and its own gradient (parameter-sized)
                    size = saved.bytes + sum(g.numel() * g.element_size() for g in grads if g is not None)
                    full = full or kept + size > self.cache_mb * 2 ** 20
                    kept += 0 if full else size
                graph.append(None if full else grads)
                del grads   # an uncached chunk's graph goes now, before the next chunk's is built
        self.gradient_evals += 1
        self._graph, self._chunk_rng = graph, states
        self._versions = self._versions_now()
        self._grad = grad

    @property
    def cached_chunks(self) -> int:
        """Chunks whose graph the current build keeps (all of them when cache_mb is 0; none once released)."""
        return sum(g is not None for g in self._graph or ())

    def _graph_valid(self) -> bool:
        return self._graph is not None and self._versions == self._versions_now()

    def release(self) -> None:
        """Drop the cached graphs (frees activation memory)."""
        self._graph, self._grad, self._versions, self._chunk_rng = None, None, None, []

    # ---- public --------------------------------------------------------------------------------------------
    def gradient(self) -> torch.Tensor:
        """Flat gradient Σ_c ∇L_c at the current parameters, in the operator's dtype (float32 for float32
        parameters: a float64 copy is 2 parameter-sized float32 vectors; reduce it with probes.eigs.dot64)."""
        if self.mode == "cache":
            if not self._graph_valid():
                self._build_graph()
            return self._grad.clone()
        if self._grad is not None and self._versions == self._versions_now():
            return self._grad.clone()
        total = self._full_gradient(self.dtype)
        self._grad, self._versions = total, self._versions_now()
        return total.clone()

    def _full_gradient(self, dtype=REDUCE_DTYPE) -> torch.Tensor:
        # float64 for the fd mode's differences of gradients; the operator's dtype for gradient()
        total = torch.zeros(self.dim, dtype=dtype, device=self.device)
        with hvp_guard(), fixed_rng(self._rng):
            for batch in self.batches:
                total += self._flat(self._chunk_grad(batch, create_graph=False), dtype)
        self.gradient_evals += 1
        return total

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """H v for v of shape (n,) or (n, k); float32 for a float32 v, else float64. Costs k HVPs."""
        if v.dim() == 2:
            return torch.stack([self.matvec(v[:, j]) for j in range(v.shape[1])], dim=1)
        if v.shape != (self.dim,):
            raise ValueError(f"probes: vector has shape {tuple(v.shape)}, operator dimension is {self.dim}")
        dtype = torch.float32 if v.dtype == torch.float32 else REDUCE_DTYPE
        v = v.to(device=self.device, dtype=dtype).contiguous()
        self.hvps += 1
        if self.mode == "fd":   # differences of gradients need fp64 accumulation
            return self._fd(v.to(REDUCE_DTYPE)).to(dtype)
        parts = self._split(v)
        # Written by the first chunk, accumulated by the others: no zero-fill pass over n (per-HVP overhead).
        out = torch.empty(self.dim, dtype=dtype, device=self.device)
        with hvp_guard():
            if self.mode == "cache":
                if not self._graph_valid():
                    self._build_graph()
                for c, grads in enumerate(self._graph):
                    cached = grads is not None
                    if not cached:   # beyond cache_mb: forward + double backward again, as it was built
                        with fixed_rng(self._chunk_rng[c]):
                            grads = self._chunk_grad(self.batches[c], create_graph=True)
                    self._hvp_from_grads(grads, parts, out, retain=cached, first=c == 0)
            else:
                with fixed_rng(self._rng):
                    for c, batch in enumerate(self.batches):
                        self._hvp_from_grads(self._chunk_grad(batch, create_graph=True), parts, out, retain=False,
                                             first=c == 0)
        return out

    __matmul__ = matvec

    def _hvp_from_grads(self, grads, parts, out: torch.Tensor, retain: bool, first: bool) -> None:
        """out (=, if first, else +=) ∂(grads·parts)/∂θ, slice by slice (no flat temporary)."""
        # Only entries with a graph take part; an unused parameter has a zero Hessian row.
        idx = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        hv = torch.autograd.grad([grads[i] for i in idx], self.params, grad_outputs=[parts[i] for i in idx],
                                 retain_graph=retain, allow_unused=True) if idx else [None] * len(self.params)
        offset = 0
        for h, p in zip(hv, self.params):
            piece = out[offset:offset + p.numel()]
            if h is not None and first:
                piece.copy_(h.reshape(-1))
            elif h is not None:
                piece.add_(h.reshape(-1))
            elif first:
                piece.zero_()
            offset += p.numel()

    def _fd(self, v: torch.Tensor) -> torch.Tensor:
        vnorm = float(v.norm())
        if vnorm == 0.0:
            return torch.zeros_like(v)
        dtype = self.params[0].dtype
        rms = float(torch.sqrt(sum((p.detach().to(REDUCE_DTYPE) ** 2).sum() for p in self.params) / self.dim))
        h = self.fd_step if self.fd_step is not None else 0.1 * torch.finfo(dtype).eps ** 0.2
        t = h * (1.0 + rms) / vnorm
        saved = [p.detach().clone() for p in self.params]
        parts = self._split(v)

        def grad_at(shift: float) -> torch.Tensor:
            with torch.no_grad():
                for p, s, d in zip(self.params, saved, parts):
                    p.data.copy_(s + shift * d)
            return self._full_gradient()

        # Perturb and restore through .data, which does not bump p._version: θ comes back bit for bit, so graphs
        # cached on these parameters (a cache-mode operator, the caller's own) stay valid and are not rebuilt.
        try:
            d_t = (grad_at(t) - grad_at(-t)) / (2 * t)
            d_half = (grad_at(t / 2) - grad_at(-t / 2)) / t
        finally:
            with torch.no_grad():
                for p, s in zip(self.params, saved):
                    p.data.copy_(s)
        diff = d_half - d_t
        self.hvp_error = max(self.hvp_error, 2.0 * float(diff.norm()) / vnorm)
        return d_half + diff / 3.0

    def dense(self) -> torch.Tensor:
        """The full n×n Hessian by n HVPs (tests and tiny problems only)."""
        return self.matvec(torch.eye(self.dim, dtype=REDUCE_DTYPE, device=self.device))


class LinearOperator:
    """A symmetric operator from a function: ``LinearOperator(dim, fn)`` with fn((n,) ``dtype``) -> (n,).
    ``dtype`` (default float64) is the dtype of the vectors fn gets and of the solver's vectors on it.

    Used for operators composed on top of an HVP (preconditioned, block-restricted) and for explicit matrices in
    tests; ``.hvps`` counts the HVPs of the wrapped operator where there is one.
    """

    def __init__(self, dim: int, fn: Callable[[torch.Tensor], torch.Tensor], base: Any = None,
                 device: torch.device | str = "cpu", error_gain: float = 1.0, dtype: torch.dtype = REDUCE_DTYPE):
        self.dim, self._fn, self.base, self.dtype = dim, fn, base, dtype
        self.error_gain = error_gain   # its error ≤ error_gain · the base's (operator_error)
        self.device = torch.device(getattr(base, "device", device))
        self._own_hvps = 0

    @classmethod
    def from_matrix(cls, a: torch.Tensor) -> "LinearOperator":
        a = a.to(REDUCE_DTYPE)
        return cls(a.shape[0], lambda v: a @ v, device=a.device)

    @property
    def hvps(self) -> int:
        return self.base.hvps if self.base is not None else self._own_hvps

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        if v.dim() == 2:
            return torch.stack([self.matvec(v[:, j]) for j in range(v.shape[1])], dim=1)
        if self.base is None:
            self._own_hvps += 1
        return self._fn(v.to(self.dtype))

    __matmul__ = matvec
