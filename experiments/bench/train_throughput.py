"""Training throughput of our loop vs TRL on the same model and data, measured side by side, interleaved, in one run.

  SFT: optimizer steps/s, agents.trainer.Trainer + SFTRegime   vs  trl.SFTTrainer   (prompt/completion rows)
  RL:  completions/s,     agents.trainer.Trainer + PPORegime   vs  trl.GRPOTrainer  (same prompts, group size,
                                                                                      completion length, β = 0)

Same model (a random-init GPT-NeoX built here, or --model PATH), same attention kernel in both (``--attn``, eager by
default: our probes need its double backward), same ArithRLVR-v0 tasks, same batch sizes, plain SGD in both, eval /
checkpoints / logging off in both. Each regime runs ``--repeats`` rounds of both peers, round-robin with every other
round reversed (ours TRL, TRL ours, ...), each run a fresh trainer from the same weights for ``--warmup`` untimed
steps then ``--steps`` timed ones. Time is CPU time of this process (time.process_time) between consecutive step
ends, so other jobs on a shared machine slow the wall clock more than the measurement (not to nothing: they share
caches and memory bandwidth). Printed: every run's rate, then per regime the median [min–max] over the rounds of the
ratio ours / TRL (goal >= 1.0), each round's pair measured back to back.

TRL gets its cheapest configuration in TRL 1.16 (checked in its source): ``max_grad_norm=0`` (no clipping; the
Trainer still computes the gradient norm each step, as ours does for its metrics), ``logging_steps`` past the run,
no eval, no saving, no tqdm, no reporting; GRPO with ``beta=0`` (no reference model), ``num_iterations=1`` and one
generation per step (no old-policy log-probs), ``log_completions`` off. Per-step work TRL does that no setting turns
off, printed beside the ratio: its fused, tiled LM head (``add_fused_lm_head``, always patched in), which in SFT also
computes the per-token entropy and top-1 accuracy for its ``entropy`` / ``mean_token_accuracy`` metrics, and in GRPO
the per-token entropy (``compute_entropy=True`` in its loss) plus clip-ratio, completion-length and reward metrics.
TRL on CPU needs bf16=False, use_cpu=True.

    python experiments/bench/train_throughput.py [--steps 40] [--warmup 3] [--repeats 4] [--model PATH]
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

try:
    from experiments.bench.spread import abba, paired_ratios, spread  # noqa: E402
except ImportError:   # run as a script: python experiments/bench/train_throughput.py
    from spread import abba, paired_ratios, spread  # noqa: E402

ENV = "ArithRLVR-v0"
EXTRA = {"sft": "TRL extra per step: fused tiled LM head computing per-token entropy + top-1 accuracy (no switch)",
         "rl": "TRL extra per step: fused tiled LM head computing per-token entropy (no switch); clip-ratio, "
               "completion-length, reward metrics"}
TRL_SETTINGS = "TRL settings: max_grad_norm=0, logging_steps > run, no eval/save/tqdm/report; GRPO beta=0, " \
               "num_iterations=1, log_completions off"


def build_model(path: str) -> str:
    """Random-init 2-layer GPT-NeoX (hidden 64) + BPE tokenizer trained on the env's own text."""
    from agents.embedded import init_model, train_tokenizer

    tasks = envs.load_tasks(ENV, "train", 2000)
    tok = train_tokenizer([t.prompt + t.demonstration for t in tasks], vocab_size=512)
    init_model(tok, n_layer=2, hidden=64, heads=4, context=128, seed=0).save_pretrained(path)
    tok.save_pretrained(path)
    return path


class StepClock:
    """CPU seconds per step between consecutive step ends, after ``warmup`` steps."""

    def __init__(self, warmup: int):
        self.warmup, self.times = warmup, []

    def tick(self) -> None:
        self.times.append(time.process_time())

    def per_step(self) -> float:
        t = self.times[self.warmup:]
        return (t[-1] - t[0]) / (len(t) - 1)


def ours(model: str, regime_name: str, steps: int, warmup: int, batch: int, ppo: PPOConfig, lr: float,
         attn: str = "eager") -> float:
    """CPU seconds per step of ``steps`` timed steps after ``warmup`` untimed ones."""
    steps += warmup
    policy = LMPolicy.from_pretrained(model, attn_implementation=attn)
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


def trl_run(model: str, regime_name: str, steps: int, warmup: int, batch: int, ppo: PPOConfig, lr: float,
            attn: str = "eager") -> float:
    """As ``ours``, for TRL's trainer in its cheapest configuration (module docstring)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    steps += warmup
    clock = StepClock(warmup)

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            clock.tick()

        def on_step_end(self, args, state, control, **kw):
            clock.tick()

    train = envs.load_tasks(ENV, "train", 256)
    lm = AutoModelForCausalLM.from_pretrained(model, attn_implementation=attn)
    tok = AutoTokenizer.from_pretrained(model)
    opt = torch.optim.SGD(lm.parameters(), lr=lr)
    common = dict(output_dir=tempfile.mkdtemp(), max_steps=steps, learning_rate=lr, lr_scheduler_type="constant",
                  bf16=False, use_cpu=True, report_to="none", save_strategy="no", gradient_checkpointing=False,
                  logging_steps=10_000, disable_tqdm=True, dataloader_num_workers=0, seed=0,
                  max_grad_norm=0.0, eval_strategy="no")
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
                          temperature=ppo.temperature, beta=0.0, epsilon=ppo.clip_eps, num_iterations=1,
                          log_completions=False, **common)
        trainer = GRPOTrainer(model=lm, reward_funcs=[envs.make_trl_reward(ENV)], args=args,
                              train_dataset=data, processing_class=tok, optimizers=(opt, None), callbacks=[Clock()])
    trainer.remove_callback(PrinterCallback)   # its end-of-run metrics dict (disable_tqdm installs it)
    trainer.train()
    return clock.per_step()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40, help="timed steps per run, after the warm-up")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of every run")
    ap.add_argument("--repeats", type=int, default=4, help="interleaved rounds of both peers per regime")
    ap.add_argument("--batch", type=int, default=8, help="SFT examples per step")
    ap.add_argument("--regimes", nargs="+", default=["sft", "rl"], choices=["sft", "rl"])
    ap.add_argument("--attn", default="eager", help="attention implementation for both peers (eager, sdpa)")
    ap.add_argument("--model", default=None, help="model dir (default: a tiny random GPT-NeoX built here)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    np.random.seed(0)
    model = args.model or build_model(tempfile.mkdtemp())
    ppo = PPOConfig(prompts_per_step=4, group_size=4, max_new_tokens=16, kl_coef=0.0)
    n = ppo.prompts_per_step * ppo.group_size
    peers = {"ours": ours, "TRL": trl_run}
    print(f"{args.repeats} rounds per regime, order {' '.join(abba(list(peers), args.repeats))}; {args.warmup} "
          f"warm-up + {args.steps} timed steps per run; attention {args.attn}; 1 thread")
    print(f"{'regime':<6} {'round':>5} {'peer':<5} {'unit':<14} {'rate':>9}")
    rows = []
    for name in args.regimes:
        unit, scale = ("steps/s", 1) if name == "sft" else ("completions/s", n)
        rates: dict[str, list[float]] = {p: [] for p in peers}
        for i, peer in enumerate(abba(list(peers), args.repeats)):
            per_step = peers[peer](model, name, args.steps, args.warmup, args.batch, ppo, lr=0.01, attn=args.attn)
            rates[peer].append(scale / per_step)
            print(f"{name:<6} {i // len(peers):>5d} {peer:<5} {unit:<14} {rates[peer][-1]:>9.2f}", flush=True)
        rows.append((name, unit, spread(rates["ours"]), spread(rates["TRL"]),
                     paired_ratios(rates["ours"], rates["TRL"])))
    print(f"\nmedian [min–max] over {args.repeats} rounds (ratio paired by round):")
    print(f"{'regime':<6} {'unit':<14} {'ours':>26} {'TRL':>26}   ours/TRL")
    for name, unit, a, b, r in rows:
        print(f"{name:<6} {unit:<14} {a.fmt('.2f'):>26} {b.fmt('.2f'):>26}   {r.fmt('.2f', 'x')}")
        print(f"{'':<6} {EXTRA[name]}")
    print(TRL_SETTINGS)
    print(f"(CPU time per step over {args.steps} timed steps after {args.warmup} warm-up steps per run; SFT batch "
          f"{args.batch}; RL {ppo.prompts_per_step} prompts x {ppo.group_size} completions, {ppo.max_new_tokens} new "
          "tokens)")


if __name__ == "__main__":
    main()
