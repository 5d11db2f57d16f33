"""Embedded model recipe on a drastically reduced config (seconds): corpus, split, tokenizer, pre-training, cache;
and the retention perplexity against a manual computation."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from agents.embedded import (
    EmbeddedConfig, build_corpus, build_embedded, code_version, embedded_model_path, retention_texts,
    source_code_hash, train_tokenizer,
)
from agents.policy import LMPolicy
from agents.retention import perplexity

TINY = EmbeddedConfig(
    corpus_chars=40_000, vocab_size=400, n_layer=1, hidden=32, heads=2, context=64,
    steps=40, batch_size=8, lr=1e-2, warmup_steps=5, eval_tokens=2048, retention_fraction=0.2, arith_fraction=0.05,
)


def test_corpus_deterministic_disjoint_and_stable():
    a = build_corpus(TINY)
    build_corpus.cache_clear()
    b = build_corpus(TINY)
    assert a == b and a is not b
    train, held = set(a["train"]), set(a["retention"])
    assert held and not train & held
    assert sum(map(len, a["train"])) + sum(map(len, a["retention"])) >= TINY.corpus_chars
    # A document's split does not depend on how many others were collected: the smaller corpus's documents keep
    # their split in a corpus twice as large.
    big = build_corpus(dataclasses.replace(TINY, corpus_chars=80_000))
    assert held <= set(big["retention"])
    assert {d for d in train if "=" not in d or " " in d} <= set(big["train"])
    # Arithmetic (from envs.arith) goes to train only.
    arith = [d for d in a["train"] if all(c in "0123456789+-*=\n" for c in d)]
    assert len(arith) > 0 and not any(all(c in "0123456789+-*=\n" for c in d) for d in held)


def test_tokenizer_roundtrip_and_specials():
    tok = train_tokenizer(build_corpus(TINY)["train"], vocab_size=TINY.vocab_size)
    assert len(tok) == TINY.vocab_size and tok.eos_token_id == 0 and tok.pad_token_id == 1
    for text in list(build_corpus(TINY)["retention"][:5]) + ["héllo wörld ✓ 12+34=46\n\ttab", ""]:
        assert tok.decode(tok(text)["input_ids"]) == text


def test_digits_are_single_tokens():
    texts = list(build_corpus(TINY)["train"]) + ["In 2019, 100 of 1290 years; 1234+56=1290."] * 50
    tok = train_tokenizer(texts, vocab_size=TINY.vocab_size, split_digits=True)
    text = "Compute 1234+56. 2019 was 100 years ago.\n1234+56=1290\nAnswer: 1290"
    pieces = [tok.decode([i]) for i in tok(text)["input_ids"]]
    assert "".join(pieces) == text
    digit_pieces = [p for p in pieces if any(c.isdigit() for c in p)]
    assert digit_pieces and all(len(p) == 1 for p in digit_pieces)  # never " 2", "19" or "100"
    assert [p for p in pieces if p.isdigit()][:6] == ["1", "2", "3", "4", "5", "6"]
    # Without the Digits pre-tokenizer the same corpus merges digit runs (the default before split_digits).
    plain = train_tokenizer(texts, vocab_size=TINY.vocab_size)
    assert any(len(plain.decode([i]).strip()) > 1 and plain.decode([i]).strip().isdigit()
               for i in plain(text)["input_ids"])


def test_pretraining_lowers_retention_loss(tmp_path):
    manifest = build_embedded(TINY, tmp_path, progress=False)
    # Random init starts near ln(vocab); a few dozen AdamW steps must beat it clearly on held-out text.
    assert manifest["retention_loss_init"] == pytest.approx(math.log(TINY.vocab_size), abs=0.3)
    assert manifest["retention_loss"] < manifest["retention_loss_init"] - 1.0
    policy = LMPolicy.from_pretrained(tmp_path)
    texts = json.loads((tmp_path / "retention.json").read_text())
    assert texts == list(build_corpus(TINY)["retention"])
    assert math.log(perplexity(policy.model, policy.tokenizer, texts, max_tokens=10**9)) < manifest[
        "retention_loss_init"
    ] - 1.0


def test_cache_reuse(tmp_path, monkeypatch):
    cfg = dataclasses.replace(TINY, steps=3)
    monkeypatch.setenv("EOSLAB_HOME", str(tmp_path))
    path = embedded_model_path(cfg, progress=False)
    assert path.parent == tmp_path and path.name == f"embedded-{cfg.key()}"
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert embedded_model_path(cfg, progress=False) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]  # atomic: no leftovers
    assert retention_texts(cfg) == list(build_corpus(cfg)["retention"])
    assert dataclasses.replace(cfg, seed=1).key() != cfg.key()


def test_build_is_bitwise_deterministic(tmp_path):
    """Same config, same process, same thread count -> identical tokenizer and weights (what the cache assumes)."""
    from safetensors.torch import load_file

    cfg = dataclasses.replace(TINY, steps=6)
    a, b = build_embedded(cfg, tmp_path / "a", progress=False), build_embedded(cfg, tmp_path / "b", progress=False)
    assert a["retention_loss"] == b["retention_loss"] and a["torch_threads"] == torch.get_num_threads()
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    wa, wb = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_cache_key_tracks_the_code(monkeypatch):
    src = "def f(x):\n    \"\"\"Doc.\"\"\"\n    return x + 1  # one\n"
    assert source_code_hash(src) == source_code_hash(src.replace("Doc.", "Other doc.").replace("# one", "# two"))
    assert source_code_hash(src) == source_code_hash("def f(x):\n    return (x\n            + 1)\n")
    assert source_code_hash(src) != source_code_hash(src.replace("x + 1", "x + 2"))
    # A change of the arithmetic generator's output (an edit in envs) changes the key; the config alone does not.
    import envs.arith

    key = TINY.key()
    real = envs.arith.arithmetic_corpus
    edited = lambda n, seed=0, **kw: [line.replace("=", " = ") for line in real(n, seed, **kw)]  # noqa: E731
    monkeypatch.setattr(envs.arith, "arithmetic_corpus", edited)
    code_version.cache_clear()
    try:
        assert TINY.key() != key
    finally:
        monkeypatch.undo()
        code_version.cache_clear()
    assert TINY.key() == key


def test_config_validation():
    with pytest.raises(ValueError, match="divisible"):
        EmbeddedConfig(hidden=130, heads=4)
    with pytest.raises(ValueError, match="retention_fraction"):
        EmbeddedConfig(retention_fraction=1.5)
    with pytest.raises(ValueError, match="split"):
        retention_texts(TINY, split="test")
    with pytest.raises(TypeError, match="by keyword"):
        retention_texts("retention")


def test_perplexity_matches_manual(tiny_model_dir):
    """exp(Σ NLL / Σ tokens) over texts of different lengths, computed one unpadded text at a time."""
    policy = LMPolicy.from_pretrained(tiny_model_dir)
    model, tok = policy.model, policy.tokenizer
    texts = ["The quick brown fox jumps over the lazy dog.", "12 + 34 = 46", "def add(a, b): return a + b"]
    nll, n = 0.0, 0
    with torch.no_grad():
        for t in texts:
            ids = torch.tensor([tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
            nll -= logp.gather(-1, ids[0, 1:, None]).sum().item()
            n += ids.shape[1] - 1
    model.train()
    got = perplexity(model, tok, texts, max_tokens=10_000, batch_size=2)
    assert got == pytest.approx(math.exp(nll / n), rel=1e-5)
    assert model.training  # mode restored
    # max_tokens truncates the token budget: first text only (its tokens alone exceed the budget of 5).
    few = perplexity(model, tok, texts, max_tokens=5)
    ids = torch.tensor([tok(texts[0], add_special_tokens=False)["input_ids"][:6]])
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1).gather(-1, ids[0, 1:, None])
    assert few == pytest.approx(math.exp(-lp.mean().item()), rel=1e-5)
    with pytest.raises(ValueError, match="no texts"):
        perplexity(model, tok, [], max_tokens=10)
