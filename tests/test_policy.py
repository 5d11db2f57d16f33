"""LMPolicy: encode masks, log-probs against a per-sequence manual computation, LoRA freezing, generation."""
from __future__ import annotations

import pytest
import torch

from agents.policy import DEFAULT_LORA_TARGETS, LMPolicy, LoRASpec

PROMPTS = ["Q: 12 + 34 = ", "The quick brown", "def add(a, b):"]
COMPLETIONS = ["46 #### 46", " fox", "\n    return a + b"]


@pytest.fixture()
def policy(tiny_model_dir):
    return LMPolicy.from_pretrained(tiny_model_dir)


def test_encode_layout(policy):
    tok = policy.tokenizer
    batch = policy.encode(PROMPTS, COMPLETIONS)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    for i, (p, c) in enumerate(zip(PROMPTS, COMPLETIONS)):
        p_ids = tok(p)["input_ids"]
        c_ids = tok(c, add_special_tokens=False)["input_ids"]
        n = len(p_ids) + len(c_ids) + 1
        assert batch["input_ids"][i, :n].tolist() == p_ids + c_ids + [eos]
        assert batch["input_ids"][i, n:].eq(pad).all()
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
        assert batch["labels"][i, : len(p_ids)].eq(-100).all()
        assert batch["labels"][i, len(p_ids) : n].tolist() == c_ids + [eos]
        assert batch["labels"][i, n:].eq(-100).all()


def test_encode_truncation_keeps_prompt_and_cuts_completion(policy):
    p_len = len(policy.tokenizer(PROMPTS[0])["input_ids"])
    batch = policy.encode(PROMPTS[:1], COMPLETIONS[:1], max_length=p_len + 2)
    assert batch["input_ids"].shape == (1, p_len + 2)
    assert (batch["labels"] != -100).sum().item() == 2
    assert policy.tokenizer.eos_token_id not in batch["labels"][0].tolist()  # truncated: no EOS target
    with pytest.raises(ValueError, match="no room"):
        policy.encode(PROMPTS[:1], COMPLETIONS[:1], max_length=p_len)
    with pytest.raises(ValueError, match="prompts but"):
        policy.encode(PROMPTS, COMPLETIONS[:2])
    with pytest.raises(TypeError):
        policy.encode("a", "b")


def test_token_logprobs_match_manual_per_sequence(policy):
    """Padded batch log-probs == log_softmax of the unpadded single sequence, position by position."""
    batch = policy.encode(PROMPTS, COMPLETIONS)
    logp, mask = policy.token_logprobs(**batch)
    assert logp.shape == mask.shape == (len(PROMPTS), batch["input_ids"].shape[1] - 1)
    with torch.no_grad():
        for i in range(len(PROMPTS)):
            n = int(batch["attention_mask"][i].sum())
            ids = batch["input_ids"][i, :n]
            ref = torch.log_softmax(policy.model(input_ids=ids[None]).logits[0].double(), -1)
            n_prompt = int((batch["labels"][i] == -100)[:n].sum())
            manual = [ref[t, ids[t + 1]].item() for t in range(n_prompt - 1, n - 1)]
            got = logp[i][mask[i]].tolist()
            assert mask[i].sum().item() == n - n_prompt
            assert got == pytest.approx(manual, abs=1e-5)
    assert logp[~mask].eq(0).all()
    # Differentiable: the SFT loss backpropagates into every trainable parameter.
    (-(logp.sum() / mask.sum())).backward()
    assert all(p.grad is not None for p in policy.trainable_parameters().values())


def test_full_finetune_trains_everything(policy):
    params = policy.trainable_parameters()
    assert sum(p.numel() for p in params.values()) == sum(p.numel() for p in policy.model.parameters())


def test_lora_trainable_count_and_frozen_base(tiny_model_dir):
    rank = 4
    policy = LMPolicy.from_pretrained(tiny_model_dir, lora=LoRASpec(rank=rank, alpha=8.0))
    cfg = policy.model.config
    h, L = cfg.hidden_size, cfg.num_hidden_layers
    shapes = {  # (d_in, d_out) of each GPT-NeoX default target
        "query_key_value": (h, 3 * h), "dense": (h, h),
        "dense_h_to_4h": (h, cfg.intermediate_size), "dense_4h_to_h": (cfg.intermediate_size, h),
    }
    assert set(shapes) == set(DEFAULT_LORA_TARGETS["gpt_neox"])
    expected = L * sum(rank * (d_in + d_out) for d_in, d_out in shapes.values())
    params = policy.trainable_parameters()
    assert sum(p.numel() for p in params.values()) == expected
    assert all("lora_" in n for n in params)

    frozen = {n: p.detach().clone() for n, p in policy.model.named_parameters() if not p.requires_grad}
    batch = policy.encode(PROMPTS, COMPLETIONS)
    before = policy.token_logprobs(**batch)[0].detach()
    opt = torch.optim.SGD(params.values(), lr=1.0)
    for _ in range(2):  # two steps: B moves on step 1 (A gets gradient only once B != 0)
        opt.zero_grad()
        logp, mask = policy.token_logprobs(**batch)
        (-(logp.sum() / mask.sum())).backward()
        opt.step()
    after = policy.token_logprobs(**batch)[0].detach()
    assert not torch.equal(before, after)  # the adapters did change the function
    for n, p in policy.model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n  # bit-identical base


def test_generate_deterministic_given_generator(policy):
    a = policy.generate(PROMPTS, max_new_tokens=6, temperature=1.0, generator=torch.Generator().manual_seed(1))
    b = policy.generate(PROMPTS, max_new_tokens=6, temperature=1.0, generator=torch.Generator().manual_seed(1))
    c = policy.generate(PROMPTS, max_new_tokens=6, temperature=1.0, generator=torch.Generator().manual_seed(2))
    assert a.completion_ids == b.completion_ids and a.texts == b.texts
    assert a.completion_ids != c.completion_ids
    for ids, done in zip(a.completion_ids, a.finished):
        eos = policy.tokenizer.eos_token_id
        assert (eos in ids) == done and (not done or ids.index(eos) == len(ids) - 1)
        assert len(ids) <= 6


def test_greedy_matches_hf_generate_and_batching(policy):
    """Left-padded batched greedy decoding == HF generate(do_sample=False) on each prompt alone."""
    policy.model.train()
    gen = policy.generate(PROMPTS, max_new_tokens=8, temperature=0.0)
    assert policy.model.training  # mode restored
    for i, p_ids in enumerate(gen.prompt_ids):
        with torch.no_grad():
            ref = policy.model.eval().generate(
                torch.tensor([p_ids]), attention_mask=torch.ones(1, len(p_ids), dtype=torch.long),
                max_new_tokens=8, do_sample=False, pad_token_id=policy.tokenizer.pad_token_id,
            )[0, len(p_ids):].tolist()
        eos = policy.tokenizer.eos_token_id
        if eos in ref:
            ref = ref[: ref.index(eos) + 1]
        assert gen.completion_ids[i] == ref


def test_generate_stops_at_eos(policy):
    # All-zero output weights -> all logits tie -> argmax is token 0, which is EOS in the embedded tokenizer.
    assert policy.tokenizer.eos_token_id == 0
    with torch.no_grad():
        policy.model.get_output_embeddings().weight.zero_()
    gen = policy.generate(PROMPTS, max_new_tokens=5, temperature=0.0)
    assert gen.completion_ids == [[0]] * 3 and gen.texts == [""] * 3 and gen.finished == [True] * 3


def test_generate_rejects_bad_input(policy):
    with pytest.raises(ValueError, match="temperature"):
        policy.generate(PROMPTS, temperature=-1.0)
    with pytest.raises(ValueError, match="context"):
        policy.generate(PROMPTS, max_new_tokens=10_000)
    with pytest.raises(TypeError):
        policy.generate("one prompt")


@pytest.mark.parametrize("rank", [0, 2])
def test_save_roundtrip(tiny_model_dir, tmp_path, rank):
    policy = LMPolicy.from_pretrained(tiny_model_dir, lora=LoRASpec(rank=rank))
    with torch.no_grad():  # perturb trainable weights so the roundtrip is not trivially the base model
        for p in policy.trainable_parameters().values():
            p.add_(0.01 * torch.randn_like(p))
    batch = policy.encode(PROMPTS, COMPLETIONS)
    ref = policy.token_logprobs(**batch)[0]
    loaded = LMPolicy.from_pretrained(policy.save(tmp_path / "saved"))
    assert torch.equal(loaded.token_logprobs(**batch)[0], ref)
    assert loaded.trainable_parameters().keys() == policy.trainable_parameters().keys()


def test_dtype_resolution(tiny_model_dir):
    assert LMPolicy.from_pretrained(tiny_model_dir, dtype="float64").model.dtype == torch.float64
    with pytest.raises(ValueError, match="unknown dtype"):
        LMPolicy.from_pretrained(tiny_model_dir, dtype="float99")


def test_sampling_follows_tempered_softmax(policy):
    """First-token frequencies over 4000 draws match softmax(logits / T) within 4 standard errors."""
    T, n = 0.5, 4000
    with torch.no_grad():  # sharpen the random-init output layer so temperature visibly matters
        policy.model.get_output_embeddings().weight.mul_(40.0)
    gen = policy.generate([PROMPTS[0]] * n, max_new_tokens=1, temperature=T, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([c[0] for c in gen.completion_ids])
    with torch.no_grad():
        logits = policy.model(input_ids=torch.tensor([gen.prompt_ids[0]])).logits[0, -1].double()
    probs = torch.softmax(logits / T, -1)
    freq = torch.bincount(ids, minlength=probs.numel()).double() / n
    se = (probs * (1 - probs) / n).sqrt()
    assert ((freq - probs).abs() <= 4 * se + 1e-3).all()
    assert probs.max() > 0.05  # peaked enough that T = 1 would be rejected:
    wrong = torch.softmax(logits, -1)
    assert not ((freq - wrong).abs() <= 4 * se + 1e-3).all()


def test_lora_generation_starts_at_the_base_model(tiny_model_dir, policy):
    """LoRA B is zero at init, so the adapted policy generates exactly what the base model does (KV cache and
    position ids pass through the peft wrapper)."""
    lora = LMPolicy.from_pretrained(tiny_model_dir, lora=LoRASpec(rank=4, dropout=0.1))
    g = torch.Generator
    assert (lora.generate(PROMPTS, 8, temperature=1.0, generator=g().manual_seed(3)).completion_ids
            == policy.generate(PROMPTS, 8, temperature=1.0, generator=g().manual_seed(3)).completion_ids)
