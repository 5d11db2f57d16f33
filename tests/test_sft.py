import pytest
import torch
import torch.nn.functional as F

import envs
from agents.optim import OptimConfig, accumulate_gradients, build_optimizer
from agents.policy import LMPolicy, LoRASpec
from agents.sft import SFTRegime, make_chunks, stream_indices
from conftest import build_tiny_model


@pytest.fixture(scope="module")
def tasks():
    return envs.load_tasks("ArithRLVR-v0", "train", 12)


def _policy(tiny_model_dir, rank=0):
    return LMPolicy.from_pretrained(tiny_model_dir, lora=LoRASpec(rank=rank, alpha=8.0))


def _manual_token_mean_ce(model, tokenizer, tasks):
    """Token-mean CE over completion (+EOS) tokens, one sequence at a time, no padding: ground truth."""
    total, count = 0.0, 0
    for t in tasks:
        p = tokenizer(t.prompt)["input_ids"]
        c = tokenizer(t.demonstration, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = torch.tensor([p + c])
        logits = model(input_ids=ids).logits[0, len(p) - 1:-1]
        total = total + F.cross_entropy(logits.float(), torch.tensor(c), reduction="sum")
        count += len(c)
    return total / count


def test_chunk_losses_sum_to_manual_token_mean_ce(tiny_model_dir, tasks):
    policy = _policy(tiny_model_dir)
    regime = SFTRegime(tasks, micro_batch=2)
    batch = tasks[:5]
    chunks = make_chunks(policy, [t.prompt for t in batch], [t.demonstration for t in batch], 2, 128)
    assert [len(c["input_ids"]) for c in chunks] == [2, 2, 1]
    with torch.no_grad():
        ours = sum(regime.loss(policy, c) for c in chunks)
        truth = _manual_token_mean_ce(policy.model, policy.tokenizer, batch)
    assert ours.item() == pytest.approx(truth.item(), rel=1e-5)
    assert chunks[0]["normalizer"] == sum(c["n_tokens"] for c in chunks)


def test_accumulated_gradient_equals_one_shot_gradient(tiny_model_dir, tasks):
    policy = _policy(tiny_model_dir)
    regime = SFTRegime(tasks)
    params = list(policy.trainable_parameters().values())
    batch = tasks[:7]
    args = ([t.prompt for t in batch], [t.demonstration for t in batch])
    one = make_chunks(policy, *args, micro_batch=7, max_length=128)
    loss_one, _ = accumulate_gradients(lambda c: regime.loss(policy, c), one)
    g_one = [p.grad.clone() for p in params]
    policy.model.zero_grad(set_to_none=True)
    loss_acc, _ = accumulate_gradients(lambda c: regime.loss(policy, c), make_chunks(policy, *args, 3, 128))
    g_acc = [p.grad.clone() for p in params]
    assert loss_acc.item() == pytest.approx(loss_one.item(), rel=1e-6)
    num = sum(((a - b) ** 2).sum() for a, b in zip(g_acc, g_one)).sqrt()
    den = sum((b ** 2).sum() for b in g_one).sqrt()
    assert num / den < 1e-5 and den > 0


def test_one_sft_sgd_step_is_theta_minus_lr_grad(tiny_model_dir, tasks):
    policy = _policy(tiny_model_dir)
    regime = SFTRegime(tasks, micro_batch=2, grad_accum=2, seed=3)
    params = policy.trainable_parameters()
    opt = build_optimizer(params.values(), OptimConfig(name="sgd", lr=0.5, momentum=0.0, weight_decay=0.0))
    chunks, metrics = regime.next_batch(policy, 0)
    assert regime.cursor == 4 and metrics["train/tokens"] == chunks[0]["normalizer"]
    before = {k: p.detach().clone() for k, p in params.items()}
    loss0, _ = accumulate_gradients(lambda c: regime.loss(policy, c), chunks)
    grads = {k: p.grad.clone() for k, p in params.items()}
    opt.step()
    for k, p in params.items():
        assert torch.equal(p.detach(), before[k] - 0.5 * grads[k])
    with torch.no_grad():
        loss1 = sum(regime.loss(policy, c) for c in chunks)
    assert loss1 < loss0.item()


def test_sft_lora_step_moves_adapters_only(tiny_model_dir, tasks):
    policy = _policy(tiny_model_dir, rank=4)
    trainable = policy.trainable_parameters()
    assert trainable and all("lora_" in k for k in trainable)
    frozen = {k: p.detach().clone() for k, p in policy.model.named_parameters() if not p.requires_grad}
    lora_before = {k: p.detach().clone() for k, p in trainable.items()}
    regime = SFTRegime(tasks, micro_batch=4, grad_accum=1)
    opt = build_optimizer(trainable.values(), OptimConfig(name="adam", lr=1e-2, weight_decay=0.0))
    losses = []
    for step in range(3):
        chunks, _ = regime.next_batch(policy, step)
        regime.cursor = 0  # same batch each step, so the loss must fall
        opt.zero_grad()
        loss, _ = accumulate_gradients(lambda c: regime.loss(policy, c), chunks)
        losses.append(loss.item())
        opt.step()
    assert losses[2] < losses[0]
    for k, p in policy.model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p.detach(), frozen[k]), k
    assert any(not torch.equal(trainable[k].detach(), v) for k, v in lora_before.items())


def test_full_batch_uses_every_task_every_step(tiny_model_dir, tasks):
    policy = _policy(tiny_model_dir)
    regime = SFTRegime(tasks, micro_batch=5, full_batch=True)
    c0, _ = regime.next_batch(policy, 0)
    c1, _ = regime.next_batch(policy, 1)
    assert c0 is c1 and sum(len(c["input_ids"]) for c in c0) == len(tasks)
    assert regime.batch_size == len(tasks)


def test_data_stream_is_epoch_permutations_and_resumable():
    s = stream_indices(10, seed=1, start=0, count=25)
    assert sorted(s[:10]) == list(range(10)) and sorted(s[10:20]) == list(range(10))
    assert s[:10] != s[10:20]
    assert stream_indices(10, 1, 0, 13) + stream_indices(10, 1, 13, 12) == s
    assert stream_indices(10, 2, 0, 10) != s[:10]


def test_sample_batch_uses_only_the_given_generator(tiny_model_dir, tasks):
    policy = _policy(tiny_model_dir)
    regime = SFTRegime(tasks, micro_batch=2, grad_accum=3)
    state = torch.get_rng_state()
    a = regime.sample_batch(policy, torch.Generator().manual_seed(5))
    b = regime.sample_batch(policy, torch.Generator().manual_seed(5))
    assert torch.equal(torch.get_rng_state(), state)
    assert len(a) == 3 and all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))
    assert regime.cursor == 0


def test_probe_set_is_a_fixed_seeded_subset_whose_chunks_sum_to_its_mean_ce(tiny_model_dir, tasks):
    policy = _policy(tiny_model_dir)
    regime = SFTRegime(tasks, micro_batch=2, grad_accum=2)
    a = regime.probe_set(policy, 5, seed=3)
    regime.next_batch(policy, 0)                       # training moves on; the probe set does not
    assert regime.probe_set(policy, 5, seed=3) is a
    b = SFTRegime(tasks, micro_batch=2, grad_accum=2, seed=9).probe_set(policy, 5, seed=3)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))   # a function of (size, seed)
    idx = sorted(torch.randperm(len(tasks), generator=torch.Generator().manual_seed(3))[:5].tolist())
    with torch.no_grad():
        chunked = sum(regime.loss(policy, c) for c in a)
        manual = _manual_token_mean_ce(policy.model, policy.tokenizer, [tasks[i] for i in idx])
    torch.testing.assert_close(chunked, manual, rtol=1e-5, atol=1e-6)
    assert sum(len(c["input_ids"]) for c in regime.probe_set(policy, 100, seed=3)) == len(tasks)   # whole set
    assert regime.probe_set(policy, 0, seed=3) is None
    assert SFTRegime(tasks, full_batch=True).probe_set(policy, 5, seed=3) is None   # GD: the batch is the set
    # probe chunks are independent of the training micro-batch: 5 examples in chunks of 1 are the same examples and
    # the same objective, so the same loss and gradient
    one = regime.probe_set(policy, 5, seed=3, chunk=1)
    assert [len(c["input_ids"]) for c in one] == [1] * 5 and [len(c["input_ids"]) for c in a] == [2, 2, 1]
    params = list(policy.trainable_parameters().values())

    def grad(chunks):
        g = torch.autograd.grad(sum(regime.loss(policy, c) for c in chunks), params)
        return torch.cat([x.flatten() for x in g])
    torch.testing.assert_close(grad(one), grad(a), rtol=1e-5, atol=1e-7)


def _manual_multi_turn_ce(model, tokenizer, segments):
    """Token-mean CE over the policy's tokens (+ EOS) of one multi-turn episode, each segment tokenized on its own:
    env tokens (prompt, tool replies) are inputs only. Ground truth for the masked SFT loss."""
    ids, targets = [], []
    for i, (text, is_env) in enumerate(segments):
        t = tokenizer(text, add_special_tokens=i == 0)["input_ids"]
        ids += t
        targets += [not is_env] * len(t)
    ids, targets = ids + [tokenizer.eos_token_id], targets + [True]
    logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
    picked = [j for j in range(1, len(ids)) if targets[j]]
    ce = F.cross_entropy(logits[[j - 1 for j in picked]].float(), torch.tensor([ids[j] for j in picked]),
                         reduction="sum")
    return ce / len(picked), picked, ids


def test_multi_turn_demonstration_trains_on_policy_turns_only(tmp_path):
    """SFT on a tool-use episode: the calculator's reply is context, never a target (the policy must not learn to
    write tool results itself); the loss is the token-mean CE over the policy's turns and EOS."""
    env = envs.make_unwrapped("ArithToolRLVR-v0")
    tasks = [t for t in env.tasks("train", 20) if len(env.demonstration_segments(t)) == 4][:3]
    assert len(tasks) == 3  # prompt, <calc>...</calc>, <result>...</result>, Answer: ...
    policy = LMPolicy.from_pretrained(build_tiny_model(tmp_path, context=512))  # the tool prompt is ~160 tokens
    regime = SFTRegime(tasks, micro_batch=2, segments=env.demonstration_segments, max_length=512)
    chunks = regime.chunks_for(policy, range(3))
    tok = policy.tokenizer
    for i, task in enumerate(tasks):
        c = chunks[i // 2]
        row, labels = c["input_ids"][i % 2], c["labels"][i % 2]
        segments = env.demonstration_segments(task)
        want, picked, ids = _manual_multi_turn_ce(policy.model, tok, segments)
        assert row[: len(ids)].tolist() == ids
        assert (labels != -100).nonzero().flatten().tolist() == picked  # exactly the policy's tokens (+ EOS)
        targets = tok.decode(row[labels != -100])
        assert "<result>" not in targets and targets.startswith(segments[1][0]) and segments[3][0] in targets
    with torch.no_grad():
        ours = sum(regime.loss(policy, c) for c in chunks)
        wants = [_manual_multi_turn_ce(policy.model, tok, env.demonstration_segments(t)) for t in tasks]
    n = [len(w[1]) for w in wants]
    assert float(ours) == pytest.approx(float(sum(w[0] * k for w, k in zip(wants, n)) / sum(n)), rel=1e-5)
    # a one-turn env's segments are the plain demonstration: the same chunks as without segments
    one = envs.make_unwrapped("ArithRLVR-v0")
    plain = envs.load_tasks("ArithRLVR-v0", "train", 4)
    a = SFTRegime(plain, micro_batch=2).chunks_for(policy, range(4))
    b = SFTRegime(plain, micro_batch=2, segments=one.demonstration_segments).chunks_for(policy, range(4))
    assert all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in ("input_ids", "labels"))


def test_a_policy_improves_on_the_multi_turn_env(tmp_path):
    """SFT on a tool-use demonstration (the calculator's reply masked), then greedy evaluation that plays the
    episode against the env: reward 0 before, 1 after. The policy writes the call and the answer; the result in its
    transcript is the env's (play appends it after the turn ends at </calc>)."""
    from agents.episodes import TurnProtocol
    from agents.optim import OptimConfig, accumulate_gradients, build_optimizer
    from agents.trainer import greedy_eval

    torch.manual_seed(0)
    env = envs.make_unwrapped("ArithToolRLVR-v0")
    task = next(t for t in env.tasks("train", 20) if len(env.demonstration_segments(t)) == 4)
    policy = LMPolicy.from_pretrained(build_tiny_model(tmp_path, hidden=64, context=512))
    regime = SFTRegime([task], micro_batch=1, grad_accum=1, segments=env.demonstration_segments, max_length=512)
    opt = build_optimizer([{"params": list(policy.trainable_parameters().values())}],
                          OptimConfig(name="adam", lr=1e-2, weight_decay=0.0))

    def score(completions, answers):
        return envs.score_batch(env, completions, answers)

    protocol = TurnProtocol.of(env)
    assert protocol is not None and protocol.max_turns == env.max_turns
    assert greedy_eval(policy, [task], score, 40, protocol=protocol)[0] == 0.0
    for step in range(60):
        chunks, _ = regime.next_batch(policy, step)
        opt.zero_grad()
        accumulate_gradients(lambda c: regime.loss(policy, c), chunks)
        opt.step()
    acc, rows = greedy_eval(policy, [task], score, 40, protocol=protocol)
    call, reply, answer = (text for text, _ in env.demonstration_segments(task)[1:])
    assert acc == 1.0 and rows[0]["completion"] == call + reply + answer
