"""Token statistics of a causal LM on a padded batch: the one place where log p(label) is computed.

For logits z = f_θ(x)[b, t] at position t, which predicts ``labels[b, t+1]``:

    logp[b, t] = z[y] − logsumexp(z)                      (log softmax by gather − logsumexp, no second [B,T,V])
    H[b, t]    = logsumexp(z) − Σ_v softmax(z)_v z_v      (entropy of the next-token distribution)
    mask[b, t] = labels[b, t+1] != -100                   (prompt and padding carry label -100)

SFT's cross-entropy, PPO's ratio / KL / entropy, retention perplexity and the TRL bridge's probe loss all read
these numbers, so a change here changes all of them together. Also here: the padding of token rows into a batch
and the model's context length, which every batch builder needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

IGNORE = -100  # label of a position that no loss counts (prompt, padding): the Hugging Face convention


@dataclass
class TokenStats:
    """Per-position statistics [B, T-1] of one forward pass (see the module docstring)."""

    logp: torch.Tensor                  # log p(label), 0 where mask is False
    mask: torch.Tensor                  # bool: the position has a label
    entropy: torch.Tensor | None = None  # only when asked for (a softmax over the vocabulary)
    hidden: torch.Tensor | None = None   # last layer's hidden state [B, T-1, d], only when asked for


def token_stats(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor, entropy: bool = False, hidden: bool = False,
                temperature: float = 1.0, head_chunk: int = 0) -> TokenStats:
    """One forward pass of ``model`` -> TokenStats of the policy softmax(logits / temperature). Differentiable (no
    no_grad here); logits in float32 (float64 for a float64 model). ``head_chunk`` > 0: logp through
    agents.fused_head (the head's logits built that many tokens at a time, none kept in the graph: the same numbers
    to rounding, far less memory on a large vocabulary); needs a plain linear head without bias and no entropy."""
    if head_chunk:
        return _fused_token_stats(model, input_ids, attention_mask, labels, hidden, temperature, head_chunk,
                                  entropy)
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, output_hidden_states=hidden)
    logits = out.logits[:, :-1]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))   # bf16/fp16 up to fp32, fp64 stays
    if temperature != 1.0:
        logits = logits / temperature
    target = labels[:, 1:]
    mask = target != IGNORE
    logz = torch.logsumexp(logits, dim=-1)
    picked = logits.gather(-1, target.masked_fill(~mask, 0).unsqueeze(-1)).squeeze(-1)
    logp = (picked - logz) * mask
    ent = logz - (torch.softmax(logits, dim=-1) * logits).sum(-1) if entropy else None
    last = out.hidden_states[-1][:, :-1] if hidden else None
    return TokenStats(logp, mask, ent, last)


def _fused_token_stats(model, input_ids, attention_mask, labels, hidden: bool, temperature: float, chunk: int,
                       entropy: bool) -> TokenStats:
    """token_stats through agents.fused_head: the causal LM's trunk (its ``base_model``, whose last hidden state is
    what the head reads: after the final norm) and then linear_logp with the output embedding's weight."""
    from agents.fused_head import linear_logp

    if entropy:
        raise ValueError("token_stats: head_chunk computes log p(label) only; the entropy needs the full softmax")
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model   # peft: the wrapped LM
    head = causal.get_output_embeddings()
    if type(head) is not torch.nn.Linear or head.bias is not None:
        raise ValueError(f"token_stats: head_chunk needs a bias-free torch.nn.Linear head, got {type(head).__name__}"
                         " (a LoRA-adapted or biased head): use head_chunk=0")
    out = causal.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    last = out.last_hidden_state[:, :-1]
    dtype = torch.promote_types(last.dtype, torch.float32)
    h = last.to(dtype) / temperature if temperature != 1.0 else last.to(dtype)
    target = labels[:, 1:]
    mask = target != IGNORE
    logp = linear_logp(h.reshape(-1, h.shape[-1]), head.weight.to(dtype), target.masked_fill(~mask, 0).reshape(-1),
                       chunk).view(target.shape) * mask
    return TokenStats(logp, mask, None, last if hidden else None)


def pad(rows: Sequence[Sequence[int]], pad_id: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows -> (input_ids, attention_mask) [B, max len], long, on CPU; right padding unless ``left``."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        cols = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, cols] = torch.tensor(list(r), dtype=torch.long)
        mask[i, cols] = 1
    return ids, mask


def context_length(model: torch.nn.Module) -> int | None:
    """The model's context in tokens (``max_position_embeddings`` or GPT-2's ``n_positions``); None if unknown."""
    cfg = getattr(model, "config", None)
    return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
