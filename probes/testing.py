"""Small problems with known curvature, shared by the probe tests and experiments/bench/probe_speed.py.

Each builder returns (model, named trainable params, loss_fn(chunk), chunks) with chunk losses that SUM to the
batch loss (token-mean CE over the whole batch, or mean squared error), matching ``ProbeContext``.
"""
from __future__ import annotations

import torch

__all__ = ["tiny_neox", "neox_batch", "neox_loss_fn", "mlp_problem"]


def tiny_neox(hidden: int = 32, layers: int = 2, vocab: int = 50, heads: int = 4, intermediate: int | None = None,
              attn: str = "sdpa", dtype: torch.dtype = torch.float32, seed: int = 0, lora_rank: int = 0):
    """A randomly initialised GPT-NeoX (transformers) — optionally with peft LoRA on query_key_value and dense."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    torch.manual_seed(seed)
    cfg = GPTNeoXConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=intermediate or 4 * hidden, max_position_embeddings=64,
                        attn_implementation=attn, hidden_dropout=0.0, attention_dropout=0.0)
    model = GPTNeoXForCausalLM(cfg).to(dtype)
    if lora_rank:
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0,
                                                 target_modules=["query_key_value", "dense"], init_lora_weights=False))
        model = model.to(dtype)
    return model


def neox_batch(batch: int = 8, seq: int = 12, vocab: int = 50, chunk: int = 4, seed: int = 1) -> list[dict]:
    """Random token batch split into chunks; each chunk carries the batch's total target-token count."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    labels = ids.clone()
    labels[:, : seq // 3] = -100  # a "prompt" that carries no loss, as in SFT
    n_tokens = int((labels[:, 1:] != -100).sum())
    return [{"input_ids": ids[i:i + chunk], "labels": labels[i:i + chunk], "n_tokens": n_tokens}
            for i in range(0, batch, chunk)]


def neox_loss_fn(model):
    """Token-sum CE of a chunk divided by the batch's token count, so chunk losses sum to the token-mean CE."""
    def loss_fn(chunk):
        logits = model(input_ids=chunk["input_ids"]).logits[:, :-1]
        target = chunk["labels"][:, 1:]
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).to(torch.promote_types(logits.dtype, torch.float32)), target.reshape(-1),
                                               ignore_index=-100, reduction="sum")
        return ce / chunk["n_tokens"]
    return loss_fn


def mlp_problem(n: int = 128, d: int = 6, width: int = 16, chunk: int = 64, dtype=torch.float64, seed: int = 0):
    """Tanh MLP regression; mean squared error over n points, split into chunks."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    y = torch.sin(x.sum(1, keepdim=True))
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(d, width), torch.nn.Tanh(), torch.nn.Linear(width, width),
                                torch.nn.Tanh(), torch.nn.Linear(width, 1)).to(dtype)
    chunks = [(x[i:i + chunk], y[i:i + chunk]) for i in range(0, n, chunk)]

    def loss_fn(c):
        return ((model(c[0]) - c[1]) ** 2).sum() / n
    return model, dict(model.named_parameters()), loss_fn, chunks
