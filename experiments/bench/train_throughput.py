"""Training throughput of our loop vs TRL on the same model and data, measured side by side in one run.

  SFT: optimizer steps/s, agents.trainer.Trainer + SFTRegime   vs  trl.SFTTrainer   (prompt/completion rows)
  RL:  completions/s,     agents.trainer.Trainer + PPORegime   vs  trl.GRPOTrainer  (same prompts, group size,
                                                                                      completion length, β = 0)

Same model (a random-init GPT-NeoX built here, or --model PATH), same ArithRLVR-v0 tasks, same batch sizes, plain SGD
in both, eval / checkpoints / logging off in both. Time is CPU time of this process (time.process_time) between
consecutive step ends after ``--warmup`` steps, so other jobs on a shared machine slow the wall clock but not the
measurement; the ratio ours / TRL (goal >= 1.0) is the robust number. TRL on CPU needs bf16=False, use_cpu=True.

    python experiments/bench/train_throughput.py [--steps 12] [--model PATH]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import envs  # noqa: E402
from agents.optim import OptimConfig, build_optimizer  # noqa: E402
from agents.policy import LMPolicy  # noqa: E402
from agents.ppo import PPOConfig, PPORegime  # noqa: E402
from agents.sft import SFTRegime  # noqa: E402
from agents.trainer import Trainer, TrainConfig  # noqa: E402

ENV = "ArithRLVR-v0"


def build_model(path: str) -> str:
    """Random-init 2-layer GPT-NeoX (hidden 64) + BPE tokenizer trained on the env's own text."""
    from agents.embedded import init_model, train_tokenizer

    tasks = envs.load_tasks(ENV, "train", 2000)
    tok = train_tokenizer([t.prompt + t.demonstration for t in tasks], vocab_size=512)
    init_model(tok, n_layer=2, hidden=64, heads=4, context=128, seed=0).save_pretrained(path)
    tok.save_pretrained(path)
    return path


class StepClock:
    """CPU seconds between consecutive step ends, after ``warmup`` steps."""

    def __init__(self, warmup: int):
        self.warmup, self.times = warmup, []

    def tick(self) -> None:
        self.times.append(time.process_time())

    def per_step(self) -> float:
        t = self.times[self.warmup:]
        return (t[-1] - t[0]) / (len(t) - 1)


def ours(model: str, regime_name: str, steps: int, warmup: int, batch: int, ppo: PPOConfig, lr: float) -> float:
    policy = LMPolicy.from_pretrained(model)
    train = envs.load_tasks(ENV, "train", 256)
    score = lambda c, a: envs.score_batch(ENV, c, a)  # noqa: E731
    if regime_name == "sft":
        regime = SFTRegime(train, micro_batch=batch, grad_accum=1, max_length=128)
    else:
        regime = PPORegime(policy, train, score, ppo, micro_batch=ppo.prompts_per_step * ppo.group_size,
                           max_length=128)  # one chunk = the whole buffer, as TRL's single GRPO batch
    opt = build_optimizer(policy.trainable_parameters().values(), OptimConfig(lr=lr, momentum=0.0, weight_decay=0))
    clock = StepClock(warmup)
    cfg = TrainConfig(steps=steps, micro_batch=batch, grad_accum=1, eval_every=0, retention_every=0,
                      checkpoint_every=0, divergence_loss=1e9)
    with tempfile.TemporaryDirectory() as d:
        clock.tick()
        Trainer(policy, regime, opt, cfg, d, log_fn=lambda row: clock.tick(), progress=False).train()
    return clock.per_step()


def trl_run(model: str, regime_name: str, steps: int, warmup: int, batch: int, ppo: PPOConfig, lr: float) -> float:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    clock = StepClock(warmup)

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            clock.tick()

        def on_step_end(self, args, state, control, **kw):
            clock.tick()

    train = envs.load_tasks(ENV, "train", 256)
    lm = AutoModelForCausalLM.from_pretrained(model, attn_implementation="eager")
    tok = AutoTokenizer.from_pretrained(model)
    opt = torch.optim.SGD(lm.parameters(), lr=lr)
    common = dict(output_dir=tempfile.mkdtemp(), max_steps=steps, learning_rate=lr, lr_scheduler_type="constant",
                  bf16=False, use_cpu=True, report_to="none", save_strategy="no", gradient_checkpointing=False,
                  logging_steps=10_000, disable_tqdm=True, dataloader_num_workers=0, seed=0)
    if regime_name == "sft":
        from trl import SFTConfig, SFTTrainer

        data = Dataset.from_list([{"prompt": t.prompt, "completion": t.demonstration} for t in train])
        args = SFTConfig(per_device_train_batch_size=batch, max_length=128, packing=False, **common)
        trainer = SFTTrainer(model=lm, args=args, train_dataset=data, processing_class=tok, optimizers=(opt, None),
                             callbacks=[Clock()])
    else:
        from trl import GRPOConfig, GRPOTrainer

        data = Dataset.from_list([{"prompt": t.prompt, "answer": t.answer} for t in train])
        args = GRPOConfig(per_device_train_batch_size=ppo.prompts_per_step * ppo.group_size,
                          num_generations=ppo.group_size, max_completion_length=ppo.max_new_tokens,
                          temperature=ppo.temperature, beta=0.0, epsilon=ppo.clip_eps, **common)
        trainer = GRPOTrainer(model=lm, reward_funcs=[envs.make_trl_reward(ENV)], args=args,
                              train_dataset=data, processing_class=tok, optimizers=(opt, None), callbacks=[Clock()])
    trainer.train()
    return clock.per_step()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8, help="SFT examples per step")
    ap.add_argument("--model", default=None, help="model dir (default: a tiny random GPT-NeoX built here)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    np.random.seed(0)
    model = args.model or build_model(tempfile.mkdtemp())
    ppo = PPOConfig(prompts_per_step=4, group_size=4, max_new_tokens=16, kl_coef=0.0)
    n = ppo.prompts_per_step * ppo.group_size
    rows = []
    for name in ("sft", "rl"):
        t_ours = ours(model, name, args.steps, args.warmup, args.batch, ppo, lr=0.01)
        t_trl = trl_run(model, name, args.steps, args.warmup, args.batch, ppo, lr=0.01)
        unit, scale = ("steps/s", 1) if name == "sft" else ("completions/s", n)
        rows.append((name, unit, scale / t_ours, scale / t_trl))
    print(f"{'regime':<6} {'unit':<14} {'ours':>10} {'TRL':>10} {'ours/TRL':>9}")
    for name, unit, a, b in rows:
        print(f"{name:<6} {unit:<14} {a:>10.2f} {b:>10.2f} {a / b:>9.2f}")
    print(f"(CPU time per step after {args.warmup} warm-up steps of {args.steps}; SFT batch {args.batch}; "
          f"RL {ppo.prompts_per_step} prompts x {ppo.group_size} completions, {ppo.max_new_tokens} new tokens)")


if __name__ == "__main__":
    main()
