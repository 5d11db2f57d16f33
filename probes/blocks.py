"""Parameter blocks from name patterns, and the Hessian restricted to one block.

A block b is a set of coordinates of the flat parameter vector; its diagonal Hessian block is H_bb = E_bᵀ H E_b
(E_b: the coordinate embedding). Default patterns follow the sharpness-disparity partition (Wang et al. 2025,
Emb / QK / VO / FFN / Norm / head): ``embed``, ``attn_qk`` (query and key weights and biases), ``attn_vo`` (value
weights and biases and the attention output projection), ``mlp``, ``norm``, ``head``, spelled for GPT-NeoX, GPT-2
and Llama names, with LoRA ``lora_A`` / ``lora_B`` matched first.

Fused Q/K/V matrices (GPT-NeoX ``query_key_value``, GPT-2 ``attn.c_attn``) match the block ``attn_qkv``; given the
parameter shapes and the model config, their coordinates are split into ``attn_qk`` and ``attn_vo`` by the layout
the model's forward uses (see ``_fused_qk_mask``). Without a config, or for an unknown layout, they stay in
``attn_qkv``. LoRA adapters on a fused matrix are not split: A is shared by q, k and v, and so are B's columns.
"""
from __future__ import annotations

import re
from typing import Any, Sequence

import torch

from .hvp import REDUCE_DTYPE, LinearOperator

__all__ = ["DEFAULT_BLOCK_PATTERNS", "FUSED_QKV_BLOCK", "parameter_blocks", "block_operator"]

FUSED_QKV_BLOCK = "attn_qkv"

# (block name, regex searched in the parameter name); the first match wins, unmatched names go to "other".
DEFAULT_BLOCK_PATTERNS: tuple[tuple[str, str], ...] = (
    ("lora_A", r"lora_A"),
    ("lora_B", r"lora_B"),
    ("embed", r"embed_in|wte|wpe|embed_tokens"),
    ("head", r"embed_out|lm_head"),
    ("norm", r"layernorm|layer_norm|ln_|norm"),
    (FUSED_QKV_BLOCK, r"query_key_value|c_attn"),
    ("attn_qk", r"q_proj|k_proj|q_attn"),
    ("attn_vo", r"v_proj|o_proj|attention\.dense|attn\.c_proj"),
    ("mlp", r"mlp|dense_h_to_4h|dense_4h_to_h|c_fc"),
)


def _fused_qk_mask(name: str, shape: Sequence[int], config: Any) -> torch.Tensor | None:
    """Bool mask over the row-major flattened fused Q/K/V parameter: True on query/key coordinates, False on value
    coordinates; None when the layout is not known.

    GPT-NeoX: ``query_key_value`` is nn.Linear, weight (3D, D), and its output is viewed as (heads, 3·head_dim)
    then chunked in three, so output row r belongs to head r // (3·head_dim) and is q, k or v as
    (r mod 3·head_dim) // head_dim is 0, 1 or 2. GPT-2: ``c_attn`` is Conv1D, weight (D, 3D), y = x W + b, and
    the output is split into [q | k | v] of D columns each (cross-attention ``crossattention.c_attn`` is [k | v]
    with a separate ``q_attn``; it is left fused).
    """
    kind = getattr(config, "model_type", None)
    if kind == "gpt_neox" and re.search(r"query_key_value(\.base_layer)?\.(weight|bias)$", name):
        heads, hidden = config.num_attention_heads, config.hidden_size
        if tuple(shape[:1]) != (3 * hidden,):
            return None
        part = (torch.arange(3 * hidden) % (3 * hidden // heads)) // (hidden // heads)
        rows = part < 2
        return rows if len(shape) == 1 else rows[:, None].expand(*shape).reshape(-1)
    if kind == "gpt2" and re.search(r"attn\.c_attn(\.base_layer)?\.(weight|bias)$", name):
        hidden = config.hidden_size
        if tuple(shape[-1:]) != (3 * hidden,):
            return None
        cols = torch.arange(3 * hidden) < 2 * hidden
        return cols if len(shape) == 1 else cols[None, :].expand(*shape).reshape(-1)
    return None


def parameter_blocks(names: Sequence[str], numels: Sequence[int],
                     patterns: Sequence[tuple[str, str]] = DEFAULT_BLOCK_PATTERNS, *,
                     shapes: Sequence[Sequence[int]] | None = None, config: Any = None) -> dict[str, torch.Tensor]:
    """Block name -> int64 indices into the flat vector (parameters in ``names`` order). Empty blocks are left out.

    With ``shapes`` and the model ``config`` (``model.config``), a parameter matched to ``attn_qkv`` whose fused
    layout is known is split coordinate-wise into ``attn_qk`` and ``attn_vo``; otherwise whole tensors are assigned.
    """
    if len(names) != len(numels) or (shapes is not None and len(shapes) != len(names)):
        raise ValueError("probes: names, numels and shapes differ in length")
    compiled = [(block, re.compile(rx)) for block, rx in patterns]
    pieces: dict[str, list[torch.Tensor]] = {}
    offset = 0
    for i, (name, numel) in enumerate(zip(names, numels)):
        block = next((b for b, rx in compiled if rx.search(name)), "other")
        index = torch.arange(offset, offset + numel)
        qk = None
        if block == FUSED_QKV_BLOCK and shapes is not None and config is not None:
            qk = _fused_qk_mask(name, shapes[i], config)
            if qk is not None and qk.numel() != numel:
                raise ValueError(f"probes: {name} has {numel} elements, its shape {tuple(shapes[i])} says otherwise")
        if qk is None:
            pieces.setdefault(block, []).append(index)
        else:
            pieces.setdefault("attn_qk", []).append(index[qk])
            pieces.setdefault("attn_vo", []).append(index[~qk])
        offset += numel
    return {b: torch.cat(p) for b, p in pieces.items()}


def block_operator(op, index: torch.Tensor) -> LinearOperator:
    """The operator v_b ↦ (H E_b v_b)_b of the diagonal block H_bb; one HVP of ``op`` per application."""
    index = index.to(op.device)

    dtype = getattr(op, "dtype", REDUCE_DTYPE)   # the solver's vectors stay in the operator's dtype

    def matvec(vb: torch.Tensor) -> torch.Tensor:
        v = torch.zeros(op.dim, dtype=dtype, device=op.device)
        v[index] = vb.to(op.device, dtype)
        return op.matvec(v)[index]

    return LinearOperator(int(index.numel()), matvec, base=op, dtype=dtype)
