"""SFT learning-rate sweep in the user's setup: full fine-tuning on verifiable instruction tasks (InstructRLVR-v0,
the offline stand-in for Alpaca: 9000 generated train tasks, so accuracy is measurable), SGD (momentum 0.9, L2 weight
decay 1e-4), effective batch 16 = 4 micro-batches of 4, η from 1e-4 (used in practice) to 1e-2."""

from agents.optim import OptimConfig
from agents.trainer import TrainConfig
from experiments.run import EnvConfig, RunConfig
from experiments.sweep import Sweep, grid
from probes import ProbeConfig

BASE = RunConfig(
    regime="sft",
    env=EnvConfig(env_id="InstructRLVR-v0", n_train=1024, n_eval=64),
    optim=OptimConfig(name="sgd", momentum=0.9, weight_decay=1e-4),
    train=TrainConfig(steps=1000, micro_batch=4, grad_accum=4, eval_every=100, retention_every=100,
                      checkpoint_every=250),
    # denser than ProbeConfig's default (every 500): the study is the λ trajectory itself
    probe=ProbeConfig(every=20, batch_sharpness_every=100),
)
SWEEP = Sweep("sft_lr", grid(BASE, lrs=(1e-4, 3e-4, 1e-3, 3e-3, 1e-2)), __doc__)
