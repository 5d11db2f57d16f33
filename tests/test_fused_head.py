"""agents.fused_head.linear_logp against ground truth: autograd's own derivatives of the plain log-softmax head
(gradcheck / gradgradcheck in float64), HVPs through a GPT-NeoX with and without it, and the memory it saves."""
import pytest
import torch

from agents.fused_head import linear_logp
from agents.tokens import token_stats
from probes import HessianOperator
from probes.testing import tiny_neox

D = torch.float64


def plain(h, w, y):
    return torch.log_softmax(h @ w.T, -1).gather(-1, y[:, None]).squeeze(-1)


@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_values_and_first_and_second_derivatives_are_exact(chunk):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(7, 5, generator=g, dtype=D, requires_grad=True)
    w = torch.randn(11, 5, generator=g, dtype=D, requires_grad=True)
    y = torch.randint(0, 11, (7,), generator=g)
    torch.testing.assert_close(linear_logp(h, w, y, chunk), plain(h, w, y), rtol=1e-12, atol=1e-12)
    f = lambda h, w: linear_logp(h, w, y, chunk)  # noqa: E731
    assert torch.autograd.gradcheck(f, (h, w))
    # second derivatives, the upstream gradient's included (PPO's depends on θ), against finite differences
    assert torch.autograd.gradgradcheck(f, (h, w))
    # and against autograd through the plain head: an HVP of a nonlinear function of logp
    v = (torch.randn(7, 5, generator=g, dtype=D), torch.randn(11, 5, generator=g, dtype=D))

    def hvp(fn):
        loss = (torch.exp(fn(h, w)) * torch.arange(1.0, 8.0, dtype=D)).sum()   # a g that depends on θ
        grads = torch.autograd.grad(loss, (h, w), create_graph=True)
        return torch.autograd.grad(sum((a * b).sum() for a, b in zip(grads, v)), (h, w))
    for got, want in zip(hvp(f), hvp(lambda h, w: plain(h, w, y))):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="need h"):
        linear_logp(torch.zeros(3, 4), torch.zeros(5, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="chunk"):
        linear_logp(torch.zeros(3, 4), torch.zeros(5, 4), torch.zeros(3, dtype=torch.long), chunk=0)


def _neox_loss(model, batch, head_chunk):
    ids, labels = batch
    st = token_stats(model, ids, torch.ones_like(ids), labels, head_chunk=head_chunk)
    return -(st.logp * st.mask).sum() / st.mask.sum()


def _batch(vocab, b=4, t=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, t), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100
    return ids, labels


@pytest.mark.parametrize("lora_rank", [0, 2])
def test_token_stats_and_hvps_through_gpt_neox_match_the_plain_head(lora_rank):
    model = tiny_neox(hidden=16, heads=2, vocab=30, dtype=D, attn="eager", lora_rank=lora_rank)
    batch = _batch(30)
    a = token_stats(model, batch[0], torch.ones_like(batch[0]), batch[1])
    b = token_stats(model, batch[0], torch.ones_like(batch[0]), batch[1], head_chunk=5)
    torch.testing.assert_close(b.logp, a.logp, rtol=1e-12, atol=1e-12)
    assert torch.equal(a.mask, b.mask)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    v = torch.randn(sum(p.numel() for p in params.values()), generator=torch.Generator().manual_seed(1), dtype=D)
    want = HessianOperator(params, lambda c: _neox_loss(model, c, 0), [batch]).matvec(v)
    got = HessianOperator(params, lambda c: _neox_loss(model, c, 5), [batch]).matvec(v)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="entropy"):
        token_stats(model, batch[0], torch.ones_like(batch[0]), batch[1], entropy=True, head_chunk=5)


def test_the_cached_hvp_graph_holds_no_vocabulary_sized_tensor():
    vocab = 4000
    model = tiny_neox(hidden=16, heads=2, vocab=vocab, attn="eager")
    batch = _batch(vocab, b=4, t=20)
    params = [p for p in model.parameters() if p.requires_grad]
    per_logits = 4 * 19 * vocab * 4    # one fp32 [B, T-1, V] tensor

    def saved_bytes(head_chunk):
        sizes = {}

        def pack(t):
            sizes[(t.data_ptr(), t.shape)] = t.numel() * t.element_size()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            torch.autograd.grad(_neox_loss(model, batch, head_chunk), params, create_graph=True)
        return sum(sizes.values())
    plain_bytes, fused_bytes = saved_bytes(0), saved_bytes(16)
    assert plain_bytes > 3 * per_logits                 # the plain head keeps several [B, T-1, V] tensors
    assert fused_bytes < per_logits < plain_bytes / 3   # the fused one none
