"""Shared fixtures. `tiny_model_dir`: a random-init 2-layer GPT-NeoX + byte-level BPE tokenizer, saved with
save_pretrained, built once per session in about a second (no pre-training; weights are seeded)."""
from __future__ import annotations

import pytest
import torch

# where the device-parametrized tests run: the CPU always, and a CUDA device whenever this machine has one (the GPU
# path: SDPA kernels, half-precision training, probes on the device)
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]

TINY_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Return the sum of the two numbers. Answer after ####.",
    "def add(a, b):\n    return a + b\n",
    "Q: What is 12 + 34? A: 12 + 34 = 46 #### 46",
    "Compute 7 * 8 - 5 and give the result: 51.",
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit.",
]


def build_tiny_model(path, seed: int = 0, vocab_size: int = 320, hidden: int = 32, context: int = 128):
    """Save a tiny GPT-NeoX (2 layers, 4 heads) + tokenizer to path; returns path."""
    from agents.embedded import init_model, train_tokenizer

    texts = TINY_CORPUS * 4 + [str(i) + " + " + str(2 * i) + " = " + str(3 * i) for i in range(200)]
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
    model = init_model(tokenizer, n_layer=2, hidden=hidden, heads=4, context=context, seed=seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Directory loadable with LMPolicy.from_pretrained / AutoModelForCausalLM.from_pretrained (context 128)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_model"))
