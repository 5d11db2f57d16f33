"""Per-token log-probabilities through the LM head without vocabulary-sized tensors in the autograd graph.

For final hidden states h_t ∈ R^d, the head's weight W ∈ R^{V×d} and targets y_t:
    logp_t = z_t[y_t] − logsumexp(z_t),   z_t = W h_t.
The plain path (``model(...).logits`` then log-softmax) keeps the N×V logits for its backward, and a gradient taken
with ``create_graph=True`` (every cached-graph HVP, probes.hvp) adds about four more N×V tensors (the softmax, the
logit gradient, their products) — 85 % of a chunk's graph on a 50k vocabulary (2×128 model, 16×50 tokens: 608 of
713 MB). Here the logits exist only ``chunk`` tokens at a time, in every pass: the graph holds h, W, y and logz (N
floats), and each backward recomputes z chunk by chunk (one more head matmul, 2·N·d·V FLOPs, per pass).

Derivatives, per token with upstream gradient g_t of logp_t, p = softmax(z), r = g (e_y − p):
    ∂/∂h = Wᵀr,  ∂/∂W = Σ_t r_t h_tᵀ                                   (first backward)
and, for the gradient of ⟨a, ∂/∂h⟩ + ⟨A, ∂/∂W⟩ (the double backward of an HVP), with q = W a + A h:
    ∂/∂g = q_y − ⟨p, q⟩,  ∂/∂h = Aᵀr + Wᵀs,  ∂/∂W = Σ_t r_t a_tᵀ + s_t h_tᵀ,  s = −g p ⊙ (q − ⟨p, q⟩).
Exact to rounding (tests/test_fused_head.py: gradcheck and gradgradcheck in float64, HVPs against the plain head);
twice differentiable, which is what an HVP needs.
"""
from __future__ import annotations

import torch

__all__ = ["linear_logp", "DEFAULT_CHUNK"]

DEFAULT_CHUNK = 1024   # tokens per logits block: 1024 × 50k fp32 logits ≈ 200 MB


def linear_logp(h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """logp [N] of ``target`` [N] under softmax(weight @ h_t) for h [N, d], weight [V, d], in blocks of ``chunk``
    tokens; twice differentiable in h and weight."""
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1] or target.shape != h.shape[:1]:
        raise ValueError(f"linear_logp: need h [N, d], weight [V, d], target [N]; got {tuple(h.shape)}, "
                         f"{tuple(weight.shape)}, {tuple(target.shape)}")
    if chunk < 1:
        raise ValueError(f"linear_logp: chunk must be >= 1, got {chunk}")
    return _LinearLogp.apply(h, weight, target, chunk)


def _blocks(n: int, chunk: int):
    return [slice(i, min(i + chunk, n)) for i in range(0, n, chunk)]


def _softmax_block(h: torch.Tensor, weight: torch.Tensor, logz: torch.Tensor) -> torch.Tensor:
    return torch.exp(h @ weight.T - logz[:, None])


class _LinearLogp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, target, chunk):
        logz = torch.empty(h.shape[0], dtype=h.dtype, device=h.device)
        picked = (h * weight[target]).sum(-1)
        for b in _blocks(h.shape[0], chunk):
            logz[b] = torch.logsumexp(h[b] @ weight.T, dim=-1)
        ctx.save_for_backward(h, weight, target, logz)
        ctx.chunk = chunk
        return picked - logz

    @staticmethod
    def backward(ctx, g):
        h, weight, target, logz = ctx.saved_tensors
        # a Function of its own, so that a create_graph backward records it (and not N×V tensors) in the graph
        grad_h, grad_w = _LinearLogpBackward.apply(g, h, weight, target, logz, ctx.chunk)
        return grad_h, grad_w, None, None


class _LinearLogpBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, h, weight, target, logz, chunk):
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros_like(weight)
        for b in _blocks(h.shape[0], chunk):
            r = -g[b, None] * _softmax_block(h[b], weight, logz[b])         # r = g (e_y − p), without e_y
            r[torch.arange(r.shape[0], device=r.device), target[b]] += g[b]
            grad_h[b] = r @ weight
            grad_w += r.T @ h[b]
        ctx.save_for_backward(g, h, weight, target, logz)
        ctx.chunk = chunk
        return grad_h, grad_w

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, a, big_a):
        g, h, weight, target, logz = ctx.saved_tensors
        n = h.shape[0]
        a = torch.zeros_like(h) if a is None else a
        big_a = torch.zeros_like(weight) if big_a is None else big_a
        d_g, d_h, d_w = torch.empty_like(g), torch.empty_like(h), torch.zeros_like(weight)
        for b in _blocks(n, ctx.chunk):
            rows = torch.arange(b.stop - b.start, device=h.device)
            p = _softmax_block(h[b], weight, logz[b])
            q = a[b] @ weight.T + h[b] @ big_a.T                      # q_t = W a_t + A h_t      [c, V]
            pq = (p * q).sum(-1)
            d_g[b] = q[rows, target[b]] - pq
            r = -g[b, None] * p
            r[rows, target[b]] += g[b]
            s = -g[b, None] * p * (q - pq[:, None])
            d_h[b] = r @ big_a + s @ weight
            d_w += r.T @ a[b] + s.T @ h[b]
        return d_g, d_h, d_w, None, None, None
