"""TRL bridge: probes inside a real TRL SFTTrainer (value vs a dense Hessian, no effect on the trajectory) and the
env verifier as a TRL reward function."""
from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("trl")
from trl import GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer  # noqa: E402

from agents.policy import LMPolicy, LoRASpec  # noqa: E402
from agents.trl_bridge import (  # noqa: E402
    ProbeCallback, attach_probes, env_dataset, env_reward_function, env_rows, sft_probe_batches, token_ce_loss_fn,
)
from probes import ProbeConfig  # noqa: E402

ENV = "ArithRLVR-v0"
LR = 0.05


def _sft_args(tmp_path, **kw):
    return SFTConfig(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=LR, optim="sgd",
        lr_scheduler_type="constant", bf16=False, use_cpu=True, report_to="none", save_strategy="no",
        gradient_checkpointing=False, logging_steps=1, seed=0, max_length=64, dataloader_num_workers=0, **kw,
    )


def _train(tiny_model_dir, tmp_path, probes: bool):
    # LoRA rank 1 on query_key_value only: 2 layers × (32 + 96) = 256 trainable parameters, so the dense
    # Hessian is cheap ground truth for λ_max.
    torch.manual_seed(0)   # the LoRA init draws from the global RNG: both runs must start from the same adapters
    policy = LMPolicy.from_pretrained(tiny_model_dir, lora=LoRASpec(rank=1, alpha=1.0, targets=("query_key_value",)))
    rows = env_rows(ENV, n=8)
    trainer = SFTTrainer(
        model=policy.model, args=_sft_args(tmp_path), processing_class=policy.tokenizer,
        train_dataset=env_dataset(ENV, n=8),
    )
    batches = sft_probe_batches(policy.model, policy.tokenizer, [r["prompt"] for r in rows],
                                [r["completion"] for r in rows], chunk_size=4)
    callback = None
    if probes:
        callback = attach_probes(trainer, batches, ProbeConfig(every=1, tol=1e-4, max_hvps=60,
                                                               batch_sharpness_every=0))
    trainer.train()
    return policy, trainer, callback, batches


def test_probe_callback_in_sft_trainer(tiny_model_dir, tmp_path):
    policy, trainer, callback, batches = _train(tiny_model_dir, tmp_path / "a", probes=True)
    params = policy.trainable_parameters()
    assert sum(p.numel() for p in params.values()) == 256
    assert [h["step"] for h in callback.history] == [1, 2]
    logged = [e for e in trainer.state.log_history if "probe/lambda_max" in e]
    assert [e["step"] for e in logged] == [1, 2]  # went through trainer.log
    last = callback.history[-1]
    assert math.isfinite(last["probe/lambda_max"])
    assert last["probe/two_over_eta"] == pytest.approx(2 / LR)

    # Ground truth at the final parameters: the dense Hessian of the same probe loss (one double-backward row per
    # parameter), largest algebraic eigenvalue.
    policy.model.eval()
    plist = list(params.values())
    loss_fn = token_ce_loss_fn(batches, policy.model)
    grads = torch.autograd.grad(sum(loss_fn(b) for b in batches), plist, create_graph=True)
    g = torch.cat([x.reshape(-1) for x in grads])
    rows = [torch.cat([r.reshape(-1) for r in torch.autograd.grad(g[i], plist, retain_graph=True)])
            for i in range(g.numel())]
    hessian = torch.stack(rows).double()
    top = torch.linalg.eigvalsh(0.5 * (hessian + hessian.T)).max().item()
    assert last["probe/lambda_max"] == pytest.approx(top, rel=1e-3)


def test_probes_do_not_change_the_trajectory(tiny_model_dir, tmp_path):
    with_probes = _train(tiny_model_dir, tmp_path / "a", probes=True)[0].trainable_parameters()
    without = _train(tiny_model_dir, tmp_path / "b", probes=False)[0].trainable_parameters()
    for n in without:
        assert torch.equal(with_probes[n], without[n]), n


def test_probe_callback_rejects_empty_batches():
    with pytest.raises(ValueError, match="at least one probe batch"):
        ProbeCallback([])


def test_env_reward_function_scores_demonstrations():
    reward = env_reward_function(ENV)
    rows = env_rows(ENV, n=6)
    answers = [r["answer"] for r in rows]
    assert reward(prompts=None, completions=[r["completion"] for r in rows], answer=answers) == [1.0] * 6
    garbage = ["garbage", "", "Answer: banana", None, 7, "Answer:"]
    assert reward(prompts=None, completions=garbage, answer=answers) == [0.0] * 6
    chat = [[{"role": "assistant", "content": r["completion"]}] for r in rows]
    assert reward(prompts=None, completions=chat, answer=answers) == [1.0] * 6
    with pytest.raises(TypeError, match="answer"):
        reward(prompts=None, completions=["x"])


def test_env_reward_function_in_grpo_trainer(tiny_model_dir, tmp_path):
    """The reward plugs into GRPOTrainer: one step, reward logged under the function's name."""
    policy = LMPolicy.from_pretrained(tiny_model_dir)
    args = GRPOConfig(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, num_generations=4,
        max_completion_length=8, bf16=False, use_cpu=True, report_to="none", save_strategy="no",
        gradient_checkpointing=False, logging_steps=1, seed=0,
    )
    reward = env_reward_function(ENV)
    trainer = GRPOTrainer(model=policy.model, reward_funcs=[reward], args=args, processing_class=policy.tokenizer,
                          train_dataset=env_dataset(ENV, n=8))
    trainer.train()
    key = f"rewards/{reward.__name__}/mean"
    values = [e[key] for e in trainer.state.log_history if key in e]
    assert len(values) == 1 and 0.0 <= values[0] <= 1.0


def _trainer_logs(tiny_model_dir, tmp_path, every: int) -> tuple[list[dict], list[dict]]:
    """(the trainer's own log entries, the probe entries) of 20 SFT steps logged every 5 steps."""
    torch.manual_seed(0)
    policy = LMPolicy.from_pretrained(tiny_model_dir, lora=LoRASpec(rank=1, alpha=1.0, targets=("query_key_value",)))
    rows = env_rows(ENV, n=8)
    args = _sft_args(tmp_path)
    args.max_steps, args.logging_steps = 20, 5
    trainer = SFTTrainer(model=policy.model, args=args, processing_class=policy.tokenizer,
                         train_dataset=env_dataset(ENV, n=8))
    if every:
        batches = sft_probe_batches(policy.model, policy.tokenizer, [r["prompt"] for r in rows],
                                    [r["completion"] for r in rows], chunk_size=4)
        attach_probes(trainer, batches, ProbeConfig(every=every, tol=1e-2, max_hvps=8, batch_sharpness_every=0))
    trainer.train()
    timing = ("train_runtime", "train_samples_per_second", "train_steps_per_second")
    own = [{k: v for k, v in e.items() if k not in timing} for e in trainer.state.log_history
           if not any(k.startswith("probe/") for k in e)]
    return own, [e for e in trainer.state.log_history if "probe/lambda_max" in e]


def test_probes_do_not_change_what_the_trainer_logs(tiny_model_dir, tmp_path):
    # on_log resets control.should_log: probing at a logging step dropped the trainer's loss entry there, and the
    # next entry averaged over the skipped window; TRL's log() also handed its accumulated metrics to the probe entry
    reference, _ = _trainer_logs(tiny_model_dir, tmp_path / "none", every=0)
    assert [e["step"] for e in reference if "loss" in e] == [5, 10, 15, 20]
    for every in (5, 3):
        own, probed = _trainer_logs(tiny_model_dir, tmp_path / f"every{every}", every=every)
        assert own == reference, every
        assert [e["step"] for e in probed] == list(range(every, 21, every))
