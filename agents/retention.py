"""Retention: perplexity of held-out pre-training text, to measure forgetting during post-training.

    PPL = exp( Σ_i Σ_t −log p_θ(x_{i,t} | x_{i,<t}) / Σ_i (len(x_i) − 1) )      (token-weighted, nats → ratio)

Each text is tokenized without special tokens and followed by EOS; texts longer than the model context are cut into
consecutive context-sized chunks, each scored from its own start. ``retention/loss`` in the run metrics is
log(PPL).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from agents.tokens import IGNORE, context_length, pad, token_stats


def perplexity(
    model: torch.nn.Module, tokenizer, texts: Sequence[str], max_tokens: int = 16_384, batch_size: int = 8
) -> float:
    """Token-weighted exp(mean NLL) over the first ``max_tokens`` predicted tokens of ``texts`` (in order).

    Cost: ≈ max_tokens / (batch_size · context) forward passes; no gradients; the model's train/eval mode is
    restored."""
    if isinstance(texts, str):
        raise TypeError("perplexity takes a list of texts, not a single string")
    if not texts:
        raise ValueError("perplexity needs at least one text (got no texts)")
    if max_tokens < 1 or batch_size < 1:
        raise ValueError(f"max_tokens and batch_size must be >= 1, got {max_tokens}, {batch_size}")
    context = context_length(model) or 1024
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token")

    chunks: list[list[int]] = []
    budget = max_tokens  # predicted tokens still to take
    for text in texts:
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"]) + [eos]
        for start in range(0, len(ids), context):
            chunk = ids[start : start + context][: budget + 1]
            if len(chunk) >= 2:  # a 1-token chunk predicts nothing
                chunks.append(chunk)
                budget -= len(chunk) - 1
            if budget <= 0:
                break
        if budget <= 0:
            break

    if not chunks:
        raise ValueError("texts yield no predictable tokens")
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    nll, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i in range(0, len(chunks), batch_size):
                ids, mask = pad(chunks[i : i + batch_size], pad_id)
                labels = ids.masked_fill(mask == 0, IGNORE)
                stats = token_stats(model, ids.to(device), mask.to(device), labels.to(device))
                token_nll, valid = -stats.logp, stats.mask
                nll += token_nll[valid].double().sum().item()
                count += int(valid.sum())
    finally:
        model.train(was_training)
    return math.exp(nll / count)
