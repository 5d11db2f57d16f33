"""Parameter blocks: the fused Q/K/V split checked against the models' own forward, the partition, and per-block
λ_max / trace against principal submatrices of dense float64 Hessians."""
import math

import pytest
import torch

from probes import (HessianOperator, ProbeConfig, ProbeContext, Prober, block_lambda_max, block_operator,
                    hutchinson_trace, parameter_blocks)
from probes.testing import mlp_problem, neox_batch, neox_loss_fn, tiny_neox

D = torch.float64


def model_blocks(model, with_config=True):
    named = dict(model.named_parameters())
    return named, parameter_blocks(list(named), [p.numel() for p in named.values()],
                                   shapes=[p.shape for p in named.values()],
                                   config=model.config if with_config else None)


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=20, n_embd=16, n_layer=1, n_head=2, n_positions=16, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager")
    return GPT2LMHeadModel(cfg).eval()


def fused_range(named, suffix):
    """Flat indices of the parameters whose names end with ``suffix`` (the fused weight and bias)."""
    out, offset = [], 0
    for name, p in named.items():
        if name.endswith(suffix + ".weight") or name.endswith(suffix + ".bias"):
            out.append(torch.arange(offset, offset + p.numel()))
        offset += p.numel()
    return torch.cat(out)


def capture_qkv(monkeypatch, module, model, ids):
    """(query, key, value) exactly as the model's attention receives them: wrap the real eager attention."""
    seen = {}
    real = module.eager_attention_forward

    def spy(mod, query, key, value, *args, **kwargs):
        seen.update(q=query.detach().clone(), k=key.detach().clone(), v=value.detach().clone())
        return real(mod, query, key, value, *args, **kwargs)

    monkeypatch.setattr(module, "eager_attention_forward", spy)
    with torch.no_grad():
        model(input_ids=ids)
    monkeypatch.setattr(module, "eager_attention_forward", real)
    return seen


@pytest.mark.parametrize("arch", ["gpt_neox", "gpt2"])
def test_fused_split_matches_the_models_own_qkv(monkeypatch, arch):
    if arch == "gpt_neox":
        from transformers.models.gpt_neox import modeling_gpt_neox as module
        model, fused = tiny_neox(hidden=16, layers=1, heads=2, vocab=20, attn="eager").eval(), "query_key_value"
    else:
        from transformers.models.gpt2 import modeling_gpt2 as module
        model, fused = tiny_gpt2(), "attn.c_attn"
    named, blocks = model_blocks(model)
    qkv = fused_range(named, fused)
    in_fused = torch.zeros(sum(p.numel() for p in named.values()), dtype=torch.bool)
    in_fused[qkv] = True
    qk, v = blocks["attn_qk"][in_fused[blocks["attn_qk"]]], blocks["attn_vo"][in_fused[blocks["attn_vo"]]]
    assert len(qk) == 2 * len(v) and len(qk) + len(v) == len(qkv) and "attn_qkv" not in blocks
    ids = torch.randint(0, 20, (2, 7), generator=torch.Generator().manual_seed(0))
    base = capture_qkv(monkeypatch, module, model, ids)
    params = list(named.values())
    theta = torch.nn.utils.parameters_to_vector(params).detach()

    def perturbed(index):
        t = theta.clone()
        t[index] += 0.5 * torch.randn(len(index), generator=torch.Generator().manual_seed(1))
        torch.nn.utils.vector_to_parameters(t, params)
        out = capture_qkv(monkeypatch, module, model, ids)
        torch.nn.utils.vector_to_parameters(theta, params)
        return out

    # Moving only the "query/key" coordinates moves q and k and leaves v bit for bit; and the converse.
    a = perturbed(qk)
    assert torch.equal(a["v"], base["v"]) and not torch.allclose(a["q"], base["q"])
    assert not torch.allclose(a["k"], base["k"])
    b = perturbed(v)
    assert torch.equal(b["q"], base["q"]) and torch.equal(b["k"], base["k"])
    assert not torch.allclose(b["v"], base["v"])


@pytest.mark.parametrize("build", ["neox", "neox_lora", "gpt2"])
def test_blocks_partition_every_coordinate(build):
    model = {"neox": lambda: tiny_neox(hidden=16, layers=2, heads=2, vocab=20),
             "neox_lora": lambda: tiny_neox(hidden=16, layers=1, heads=2, vocab=20, lora_rank=2),
             "gpt2": tiny_gpt2}[build]()
    named, blocks = model_blocks(model)
    n = sum(p.numel() for p in named.values())
    assert sum(len(i) for i in blocks.values()) == n
    assert torch.equal(torch.sort(torch.cat(list(blocks.values()))).values, torch.arange(n))
    expected = {"embed", "norm", "attn_qk", "attn_vo", "mlp"}
    expected |= {"lora_A", "lora_B"} if "lora" in build else set()
    expected |= set() if build == "gpt2" else {"head"}     # GPT-2 ties lm_head to wte: one parameter, "embed"
    assert set(blocks) == expected
    if build == "neox_lora":   # the frozen fused base weight is split; its adapters are not
        qkv_base = fused_range(named, "query_key_value.base_layer")
        assert torch.isin(qkv_base, blocks["attn_qk"]).sum() == 2 * len(qkv_base) // 3
    # without a config the fused matrix is one block, as before
    _, plain = model_blocks(model, with_config=False)
    assert "attn_qkv" in plain and len(plain["attn_qkv"]) + len(plain["attn_vo"]) == len(blocks["attn_qk"]) + len(
        blocks["attn_vo"])


def test_default_blocks_by_name():
    names = ["gpt_neox.embed_in.weight", "gpt_neox.layers.0.input_layernorm.weight",
             "gpt_neox.layers.0.attention.query_key_value.weight", "gpt_neox.layers.0.attention.dense.weight",
             "gpt_neox.layers.0.mlp.dense_h_to_4h.weight", "gpt_neox.final_layer_norm.bias", "embed_out.weight",
             "base_model.model.gpt_neox.layers.0.attention.query_key_value.lora_A.default.weight",
             "base_model.model.gpt_neox.layers.0.attention.dense.lora_B.default.weight",
             "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
             "model.layers.0.self_attn.v_proj.weight", "model.layers.0.self_attn.o_proj.weight",
             "model.layers.0.mlp.gate_proj.weight", "model.norm.weight", "lm_head.weight",
             "transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.weight",
             "transformer.h.0.mlp.c_proj.weight", "transformer.wte.weight"]
    blocks = parameter_blocks(names, [1] * len(names))
    got = {int(i): b for b, idx in blocks.items() for i in idx}
    assert [got[i] for i in range(len(names))] == [
        "embed", "norm", "attn_qkv", "attn_vo", "mlp", "norm", "head", "lora_A", "lora_B",
        "attn_qk", "attn_qk", "attn_vo", "attn_vo", "mlp", "norm", "head", "attn_qkv", "attn_vo", "mlp", "embed"]


def test_block_lambda_max_against_dense_blocks_on_mlp():
    model, params, loss_fn, chunks = mlp_problem()
    op = HessianOperator(params, loss_fn, chunks)
    h = op.dense()
    blocks = parameter_blocks(list(params), [p.numel() for p in params.values()], (("first", r"^0\."),
                                                                                    ("last", r"^4\.")))
    assert set(blocks) == {"first", "last", "other"}
    res = block_lambda_max(op, blocks, tol=1e-8, max_hvps=300)
    for name, idx in blocks.items():
        truth = torch.linalg.eigvalsh(h[idx][:, idx])[-1]
        assert math.isclose(float(res[name].values[0]), float(truth), rel_tol=1e-6)


@pytest.fixture(scope="module")
def neox64():
    """Float64 tiny NeoX, trainable: first layer norm and attention; the dense Hessian over those (≈1.1k HVPs)."""
    model = tiny_neox(hidden=16, layers=1, heads=2, vocab=20, dtype=D).eval()
    params = {n: p for n, p in model.named_parameters() if "attention" in n or "input_layernorm" in n}
    chunks = neox_batch(batch=4, seq=8, vocab=20, chunk=2)
    loss_fn = neox_loss_fn(model)
    h = HessianOperator(params, loss_fn, chunks).dense()
    blocks = parameter_blocks(list(params), [p.numel() for p in params.values()],
                              shapes=[p.shape for p in params.values()], config=model.config)
    assert set(blocks) == {"norm", "attn_qk", "attn_vo"}
    return model, params, loss_fn, chunks, h, blocks


def test_qk_vo_lambda_max_and_trace_against_dense_submatrices(neox64):
    model, params, loss_fn, chunks, h, blocks = neox64
    op = HessianOperator(params, loss_fn, chunks)
    res = block_lambda_max(op, blocks, tol=1e-9, max_hvps=600)
    for b, idx in blocks.items():
        hbb = h[idx][:, idx]
        truth = float(torch.linalg.eigvalsh(hbb)[-1])
        assert math.isclose(float(res[b].values[0]), truth, rel_tol=1e-6), b
        vb = torch.randn(len(idx), 2, generator=torch.Generator().manual_seed(2), dtype=D)
        torch.testing.assert_close(block_operator(op, idx).matvec(vb), hbb @ vb, rtol=1e-9, atol=1e-12)
    # Hutchinson per block: z_bᵀ(Hz)_b is unbiased for tr(H_bb) with variance Σ_{i<j} (H_ij (m_i + m_j))²
    n = 64
    tr = hutchinson_trace(op, torch.Generator().manual_seed(0), max_probes=n, min_probes=n, blocks=blocks)
    assert math.isclose(sum(tr.blocks.values()), tr.trace, rel_tol=1e-9, abs_tol=1e-12)
    for b, idx in blocks.items():
        m = torch.zeros(h.shape[0], dtype=D)
        m[idx] = 1
        c = h * (m[:, None] + m[None, :])
        c.fill_diagonal_(0)
        sd = math.sqrt(float((c ** 2).sum()) / 2 / n)
        assert abs(tr.blocks[b] - float(h[idx, idx].sum())) <= 5 * sd, b


def test_prober_emits_qk_and_vo_lambda_max(neox64):
    model, params, loss_fn, chunks, h, blocks = neox64
    cfg = ProbeConfig(every=1, blocks_every=1, tol=1e-9, max_hvps=600, stop="residual", step_sharpness=False,
                      update_sharpness=False, adam=False, batch_sharpness_every=0, trace_every=0)
    out = Prober(cfg)(ProbeContext(params, loss_fn, chunks, lr=0.1, step=0, model=model))
    for b in ("attn_qk", "attn_vo", "norm"):
        idx = blocks[b]
        truth = float(torch.linalg.eigvalsh(h[idx][:, idx])[-1])
        assert math.isclose(out[f"probe/block/{b}/lambda_max"], truth, rel_tol=1e-6), b
    # without the model the fused matrix stays one block
    plain = Prober(cfg)(ProbeContext(params, loss_fn, chunks, lr=0.1, step=0))
    assert "probe/block/attn_qkv/lambda_max" in plain and "probe/block/attn_qk/lambda_max" not in plain
    qkv = fused_range(params, "query_key_value")
    assert len(qkv) == 16 * 48 + 48
    truth = float(torch.linalg.eigvalsh(h[qkv][:, qkv])[-1])
    assert math.isclose(plain["probe/block/attn_qkv/lambda_max"], truth, rel_tol=1e-6)
