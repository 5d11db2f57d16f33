"""Parameter blocks from name patterns, and the Hessian restricted to one block.

A block b is a set of coordinates of the flat parameter vector; its diagonal Hessian block is H_bb = E_bᵀ H E_b
(E_b: the coordinate embedding). Default patterns follow the sharpness-disparity partition (Wang et al. 2025,
Emb / QK / VO / FFN / Norm / head) spelled for GPT-NeoX, GPT-2 and Llama names, with LoRA A/B matched first.
GPT-NeoX fuses Q, K and V into one ``query_key_value`` matrix, so its QK and V share the block ``attn_qkv``.
"""
from __future__ import annotations

import re
from typing import Sequence

import torch

from .hvp import REDUCE_DTYPE, LinearOperator

__all__ = ["DEFAULT_BLOCK_PATTERNS", "parameter_blocks", "block_operator"]

# (block name, regex searched in the parameter name); the first match wins, unmatched names go to "other".
DEFAULT_BLOCK_PATTERNS: tuple[tuple[str, str], ...] = (
    ("lora_A", r"lora_A"),
    ("lora_B", r"lora_B"),
    ("embed", r"embed_in|wte|wpe|embed_tokens"),
    ("head", r"embed_out|lm_head"),
    ("norm", r"layernorm|layer_norm|ln_|norm"),
    ("attn_qkv", r"query_key_value|q_proj|k_proj|v_proj|c_attn"),
    ("attn_out", r"attention\.dense|o_proj|attn\.c_proj"),
    ("mlp", r"mlp|dense_h_to_4h|dense_4h_to_h|c_fc"),
)


def parameter_blocks(names: Sequence[str], numels: Sequence[int],
                     patterns: Sequence[tuple[str, str]] = DEFAULT_BLOCK_PATTERNS) -> dict[str, torch.Tensor]:
    """Block name -> int64 indices into the flat vector (parameters in ``names`` order). Empty blocks are left out."""
    if len(names) != len(numels):
        raise ValueError("probes: names and numels differ in length")
    compiled = [(block, re.compile(rx)) for block, rx in patterns]
    pieces: dict[str, list[torch.Tensor]] = {}
    offset = 0
    for name, numel in zip(names, numels):
        block = next((b for b, rx in compiled if rx.search(name)), "other")
        pieces.setdefault(block, []).append(torch.arange(offset, offset + numel))
        offset += numel
    return {b: torch.cat(p) for b, p in pieces.items()}


def block_operator(op, index: torch.Tensor) -> LinearOperator:
    """The operator v_b ↦ (H E_b v_b)_b of the diagonal block H_bb; one HVP of ``op`` per application."""
    index = index.to(op.device)

    def matvec(vb: torch.Tensor) -> torch.Tensor:
        v = torch.zeros(op.dim, dtype=REDUCE_DTYPE, device=op.device)
        v[index] = vb.to(op.device)
        return op.matvec(v)[index]

    return LinearOperator(int(index.numel()), matvec, base=op)
