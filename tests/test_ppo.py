import pytest
import torch

import envs
from agents.optim import OptimConfig, accumulate_gradients, build_optimizer
from agents.policy import LMPolicy, LoRASpec
from agents.episodes import TurnProtocol, play
from agents.ppo import PPOConfig, PPORegime, config_errors, gae, group_advantages


def digit_fraction(completions, answers):
    """Partial-credit reward that varies within a group even for a random model (the arith verifier gives 0)."""
    return [sum(ch.isdigit() for ch in c) / max(1, len(c)) for c in completions]


@pytest.fixture(scope="module")
def tasks():
    return envs.load_tasks("ArithRLVR-v0", "train", 6)


def _regime(policy, tasks, **kw):
    cfg = PPOConfig(**{"prompts_per_step": 2, "group_size": 4, "max_new_tokens": 8, **kw})
    return PPORegime(policy, tasks, digit_fraction, cfg, micro_batch=3, seed=1)


def _by_hand(policy, chunks, old=None, ref=None, temperature=1.0):
    """Per-sequence, unpadded recomputation under the tempered policy softmax(logits / τ): sum over the buffer of
    (logp, entropy, A, ratio terms)."""
    rows = []
    for c in chunks:
        for b in range(len(c["input_ids"])):
            keep = c["attention_mask"][b].bool()
            ids = c["input_ids"][b][keep][None]
            lab = c["labels"][b][keep]
            pos = (lab[1:] != -100).nonzero().flatten()
            logits = policy.model(input_ids=ids).logits[0, :-1].float()[pos] / temperature
            logq = torch.log_softmax(logits, -1)
            logp = logq.gather(-1, lab[1:][pos][:, None]).squeeze(-1)
            ent = -(logq.exp() * logq).sum(-1)
            adv = c["advantages"][b][c["labels"][b][1:] != -100]
            rows.append(dict(logp=logp, ent=ent, adv=adv,
                             old=c["old_logp"][b][c["labels"][b][1:] != -100],
                             ref=None if c["ref_logp"] is None else c["ref_logp"][b][c["labels"][b][1:] != -100]))
    return rows


def test_group_advantages_and_gae_by_hand():
    r = torch.tensor([1.0, 0.0, 0.5, 0.5, 0.2, 0.2, 0.2, 0.2])
    assert torch.allclose(group_advantages(r, 4), torch.tensor([0.5, -0.5, 0, 0, 0, 0, 0, 0.0]))
    scaled = group_advantages(r, 4, scale_by_std=True)
    assert scaled[0].item() == pytest.approx(0.5 / r[:4].std().item(), rel=1e-4)
    mask = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 0]], dtype=torch.bool)
    values = torch.tensor([[0.0, 0.2, 0.4, 0.6], [0.0, 0.0, 0.3, 0.0]]) * mask
    adv, ret = gae(torch.tensor([1.0, 0.0]), values, mask, gamma=1.0, lam=0.5)
    d3 = 1.0 - 0.6
    d2 = 0.6 - 0.4
    d1 = 0.4 - 0.2
    assert torch.allclose(adv[0, 1:], torch.tensor([d1 + 0.5 * (d2 + 0.5 * d3), d2 + 0.5 * d3, d3]))
    assert adv[1, 2].item() == pytest.approx(-0.3) and adv[0, 0] == 0 and adv[1, 3] == 0
    assert torch.allclose(ret, (adv + values) * mask)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_loss_at_ratio_one_equals_policy_gradient_objective_by_hand(tiny_model_dir, tasks, temperature):
    """On-policy: the trained policy is the sampling policy softmax(logits / τ), so old log-probs, the gradient
    and the entropy are all of the tempered policy."""
    torch.manual_seed(0)
    policy = LMPolicy.from_pretrained(tiny_model_dir)
    regime = _regime(policy, tasks, kl_coef=0.1, entropy_coef=0.01, temperature=temperature)
    rng = torch.get_rng_state()
    chunks, metrics = regime.next_batch(policy, 0)
    assert torch.equal(torch.get_rng_state(), rng)  # rollouts draw from their own generator only
    assert [len(c["input_ids"]) for c in chunks] == [3, 3, 2]  # groups of 4 straddle chunk boundaries
    rewards = torch.cat([c["rewards"] for c in chunks])
    texts = sum((c["texts"] for c in chunks), [])
    assert torch.allclose(rewards, torch.tensor(digit_fraction(texts, None), dtype=torch.float32))
    assert rewards.std() > 0, "the test needs rewards that vary"
    assert metrics["env/reward_mean"] == pytest.approx(rewards.mean().item())
    expected_adv = rewards - rewards.view(2, 4).mean(1).repeat_interleave(4)

    params = list(policy.trainable_parameters().values())
    loss, stats = accumulate_gradients(lambda c: regime.loss_and_stats(policy, c), chunks)
    ours = [p.grad.clone() for p in params]
    policy.model.zero_grad(set_to_none=True)

    rows = _by_hand(policy, chunks, temperature=temperature)
    n = sum(len(r["logp"]) for r in rows)
    assert n == chunks[0]["normalizer"]
    for r, a in zip(rows, expected_adv):
        assert torch.allclose(r["adv"], a.expand_as(r["adv"]))
        assert torch.allclose(r["logp"].detach(), r["old"], atol=1e-5)  # ratio 1
    pg = sum(-(r["adv"] * r["logp"]).sum() for r in rows) / n
    ent = sum(r["ent"].sum() for r in rows) / n
    hand = pg - 0.01 * ent  # + 0.1 * k3, which is 0 with value and gradient 0 at θ = θ_ref
    hand.backward()
    # at ρ = 1 the loss value is -mean(Â) - c_H H (the ratio's value is 1, its gradient is ∇ log π)
    value_at_one = -sum((r["adv"]).sum() for r in rows) / n - 0.01 * ent
    assert loss.item() == pytest.approx(value_at_one.item(), abs=1e-5)
    assert stats["rl/kl"] == pytest.approx(0.0, abs=1e-6) and stats["rl/clip_frac"] == 0.0
    assert stats["rl/entropy"] == pytest.approx(ent.item(), rel=1e-4)
    num = sum(((a - p.grad) ** 2).sum() for a, p in zip(ours, params)).sqrt()
    den = sum((p.grad ** 2).sum() for p in params).sqrt()
    assert den > 0 and num / den < 1e-4


def test_clipped_surrogate_and_kl_after_a_step_by_hand(tiny_model_dir, tasks):
    policy = LMPolicy.from_pretrained(tiny_model_dir)
    regime = _regime(policy, tasks, kl_coef=0.2, clip_eps=0.1, ppo_epochs=2)
    opt = build_optimizer(policy.trainable_parameters().values(), OptimConfig(lr=3.0, momentum=0.0, weight_decay=0))
    chunks, _ = regime.next_batch(policy, 0)
    accumulate_gradients(lambda c: regime.loss(policy, c), chunks)
    opt.step()
    again, m = regime.next_batch(policy, 1)
    assert again is chunks and m == {}  # second epoch on the same buffer
    with torch.no_grad():
        parts = [regime.loss_and_stats(policy, c) for c in chunks]
        loss = sum(p[0] for p in parts)
        stats = {k: sum(p[1][k] for p in parts) for k in parts[0][1]}
        rows = _by_hand(policy, chunks)
    n = sum(len(r["logp"]) for r in rows)
    surr = kl = clipped = 0.0
    for r in rows:
        ratio = torch.exp(r["logp"] - r["old"])
        surr += -torch.minimum(ratio * r["adv"], ratio.clamp(0.9, 1.1) * r["adv"]).sum()
        d = r["ref"] - r["logp"]
        kl += (d.exp() - d - 1).sum()
        clipped += ((ratio - 1).abs() > 0.1).sum()
    assert clipped > 0 and stats["rl/clip_frac"] == pytest.approx(float(clipped) / n)
    assert stats["rl/kl"] == pytest.approx(float(kl) / n, rel=1e-4) and stats["rl/kl"] > 0
    assert loss.item() == pytest.approx(float(surr + 0.2 * kl) / n, rel=1e-4, abs=1e-6)


def test_ppo_lora_reference_is_base_and_base_stays_bit_identical(tiny_model_dir, tasks):
    policy = LMPolicy.from_pretrained(tiny_model_dir, lora=LoRASpec(rank=4, alpha=8.0))
    base = LMPolicy.from_pretrained(tiny_model_dir)
    frozen = {k: p.detach().clone() for k, p in policy.model.named_parameters() if not p.requires_grad}
    regime = _regime(policy, tasks, kl_coef=0.1)
    assert regime.reference is None  # no copy under LoRA
    opt = build_optimizer(policy.trainable_parameters().values(), OptimConfig(name="adam", lr=0.05, weight_decay=0))
    for step in range(2):
        chunks, _ = regime.next_batch(policy, step)
        opt.zero_grad()
        loss, stats = accumulate_gradients(lambda c: regime.loss_and_stats(policy, c), chunks)
        opt.step()
    for k, p in policy.model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p.detach(), frozen[k]), k
    with torch.no_grad():
        c = chunks[0]
        ref_now = regime._reference_logprobs(policy, c)
        base_logp, _ = base.token_logprobs(c["input_ids"], c["attention_mask"], c["labels"])
        pol_logp, _ = policy.token_logprobs(c["input_ids"], c["attention_mask"], c["labels"])
    assert torch.allclose(ref_now, base_logp, atol=1e-6) and torch.allclose(c["ref_logp"], base_logp, atol=1e-6)
    assert not torch.allclose(pol_logp, base_logp, atol=1e-4)  # adapters moved the policy
    assert stats["rl/kl"] > 0


def test_value_head_fits_returns_without_touching_the_policy_gradient(tiny_model_dir, tasks):
    policy = LMPolicy.from_pretrained(tiny_model_dir)
    params = list(policy.trainable_parameters().values())
    grads = {}
    for vf in (0.0, 1.0):
        regime = _regime(policy, tasks, advantage="value", vf_coef=vf, kl_coef=0.0)
        chunks, _ = regime.next_batch(policy, 0)
        policy.model.zero_grad(set_to_none=True)
        accumulate_gradients(lambda c: regime.loss(policy, c), chunks)
        grads[vf] = [p.grad.clone() for p in params]
    assert all(torch.equal(a, b) for a, b in zip(grads[0.0], grads[1.0]))
    head = regime.value_head
    opt = torch.optim.SGD(head.parameters(), lr=0.02)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        _, stats = accumulate_gradients(lambda c: regime.loss_and_stats(policy, c), chunks)
        losses.append(stats["rl/value_loss"])
        opt.step()
    assert losses[-1] < losses[0]
    # with V = 0 at init and γ = 1, the GAE advantage of every token is λ^(steps to the end) · r
    c = chunks[0]
    first = (c["labels"][0, 1:] != -100).nonzero().flatten()
    r = c["rewards"][0].item()
    assert c["advantages"][0, first[-1]].item() == pytest.approx(r)
    assert c["advantages"][0, first[0]].item() == pytest.approx(r * 0.95 ** (len(first) - 1), rel=1e-5)


def test_rollouts_are_reproducible_and_config_is_checked(tiny_model_dir, tasks):
    policy = LMPolicy.from_pretrained(tiny_model_dir)
    a, _ = _regime(policy, tasks, kl_coef=0.0).next_batch(policy, 3)
    b, _ = _regime(policy, tasks, kl_coef=0.0).next_batch(policy, 3)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))
    assert config_errors(PPOConfig()) == []
    assert any("group_size" in e for e in config_errors(PPOConfig(group_size=1)))
    assert any("advantage" in e for e in config_errors(PPOConfig(advantage="td")))
    with pytest.raises(ValueError, match="temperature"):
        PPORegime(policy, tasks, digit_fraction, PPOConfig(temperature=0.0))


def test_curriculum_moves_the_level_and_rollouts_draw_from_it(tiny_model_dir):
    """Rollouts draw their prompts from the curriculum's current level and report their rewards to it: all
    rewarded -> one level harder per full block (4 episodes = one rollout here), never past the top; the level
    played, the level after and the block's success are logged; state_dict resumes the same stream bitwise."""
    from envs.curriculum import Curriculum

    policy = LMPolicy.from_pretrained(tiny_model_dir)
    levels = [envs.load_tasks("ArithRLVR-v0", "train", 3, max_digits=d) for d in (1, 2, 3)]
    cfg = PPOConfig(prompts_per_step=2, group_size=2, max_new_tokens=4)

    def regime(score):
        return PPORegime(policy, levels[1], lambda c, a: [score] * len(c), cfg, micro_batch=4, seed=1,
                         levels=levels, curriculum=Curriculum(n_levels=3, window=4))

    up = regime(1.0)
    played = []
    for step in range(4):
        chunks, m = up.next_batch(policy, step)
        prompts = {policy.tokenizer.decode(ids, skip_special_tokens=True) for c in chunks for ids in c["input_ids"]}
        assert all(any(p.startswith(t.prompt) for t in levels[int(m["curriculum/level_played"])]) for p in prompts)
        played.append((m["curriculum/level_played"], m["curriculum/level"], m["curriculum/success"]))
    assert played == [(0, 1, 1.0), (1, 2, 1.0), (2, 2, 1.0), (2, 2, 1.0)]
    down = regime(0.0)
    assert [down.next_batch(policy, s)[1]["curriculum/level"] for s in range(2)] == [0, 0]
    # resume: a fresh regime loaded with the state after step 1 replays steps 2-3 exactly
    a, b = regime(1.0), regime(1.0)
    for step in range(2):
        a.next_batch(policy, step)
    b.load_state_dict(a.state_dict())
    for step in (2, 3):
        ca, ma = a.next_batch(policy, step)
        cb, mb = b.next_batch(policy, step)
        assert ma == mb and all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(ca, cb))
    with pytest.raises(ValueError, match="levels"):
        PPORegime(policy, levels[0], digit_fraction, cfg, levels=levels[:2], curriculum=Curriculum(n_levels=3))


def test_multi_turn_rollout_masks_env_replies_out_of_the_loss(tiny_model_dir, tasks):
    """Episodes of up to 3 turns against a pure reply function: each buffer row is prompt + turn (+ reply + turn
    ...), the env's replies are masked like the prompt (no advantage, no log-prob, not counted in N), the reward
    scores the whole transcript, and the gradient of the chunk losses equals the on-policy policy gradient over the
    policy's tokens alone (computed by hand per sequence)."""
    torch.manual_seed(0)
    policy = LMPolicy.from_pretrained(tiny_model_dir)
    reply = "\n<result>7</result>\n"
    replied = []

    def reply_fn(turn):  # replies to turns of even length (a pure function of the turn, like a calculator)
        replied.append(turn)
        return reply if len(turn) % 2 == 0 else None

    cfg = PPOConfig(prompts_per_step=2, group_size=4, max_new_tokens=6)
    regime = PPORegime(policy, tasks, digit_fraction, cfg, micro_batch=3, seed=1,
                       protocol=TurnProtocol(reply_fn, max_turns=3))
    chunks, metrics = regime.next_batch(policy, 0)
    texts = sum((c["texts"] for c in chunks), [])
    assert any(reply in t for t in texts) and 1 < metrics["rl/turns"] <= 3   # some episodes went on after a reply
    assert torch.allclose(torch.cat([c["rewards"] for c in chunks]),
                          torch.tensor(digit_fraction(texts, None), dtype=torch.float32))
    reply_ids = policy.tokenizer(reply, add_special_tokens=False)["input_ids"]
    n = 0
    for c in chunks:
        for b in range(len(c["input_ids"])):
            ids, labels = c["input_ids"][b].tolist(), c["labels"][b]
            target_text = policy.tokenizer.decode(c["input_ids"][b][labels != -100])
            assert "<result>" not in target_text
            for start in (i for i in range(len(ids)) if ids[i: i + len(reply_ids)] == reply_ids):
                assert (labels[start: start + len(reply_ids)] == -100).all()   # every reply is context only
                assert (c["advantages"][b][start - 1: start - 1 + len(reply_ids)] == 0).all()
            n += int((labels[1:] != -100).sum())
    assert n == chunks[0]["normalizer"]
    params = [p for p in policy.model.parameters() if p.requires_grad]
    ours = [g.clone() for g in torch.autograd.grad(sum(regime.loss(policy, c) for c in chunks), params)]
    rows = _by_hand(policy, chunks)
    hand = sum(-(r["adv"] * r["logp"]).sum() for r in rows) / n
    grads = torch.autograd.grad(hand, params)
    num = sum(((a - g) ** 2).sum() for a, g in zip(ours, grads)).sqrt()
    den = sum((g ** 2).sum() for g in grads).sqrt()
    assert den > 0 and num / den < 1e-4
    # greedy evaluation plays the same episodes (temperature 0): its completions are whole transcripts
    from agents.trainer import greedy_eval
    acc, rows = greedy_eval(policy, tasks[:3], digit_fraction, 6, protocol=TurnProtocol(reply_fn, max_turns=3))
    assert [r["completion"] for r in rows] == play(policy, [t.prompt for t in tasks[:3]],
                                                   TurnProtocol(reply_fn, max_turns=3), 6, 0.0).texts
