"""RLVR learning-rate sweep: PPO with a group baseline on verifiable instruction tasks (InstructRLVR-v0), SGD
(momentum 0.9, weight decay 1e-4) as in the SFT sweeps; the probes measure the PPO surrogate on each step's frozen
rollout buffer. RL starts from a short SFT warm start (as in SFT-then-RL pipelines): the embedded base model
almost never earns a reward (4 of 1600 samples on ArithRLVR-v0, README), so nearly every group would have zero reward
variance, hence zero policy gradient. Its warm start is SGD, like the sweep, unlike experiments.run.warm_start_config
(AdamW), which the RL default was measured from."""

from agents.optim import OptimConfig
from agents.ppo import PPOConfig
from agents.trainer import TrainConfig
from experiments.run import EnvConfig, ModelConfig, RunConfig, replace
from experiments.sweep import WARM_START, Sweep, grid
from probes import ProbeConfig

WARM = RunConfig(
    regime="sft",
    env=EnvConfig(env_id="InstructRLVR-v0", n_train=1024, n_eval=64),
    optim=OptimConfig(name="sgd", lr=1e-2, momentum=0.9, weight_decay=1e-4),
    train=TrainConfig(steps=300, micro_batch=4, grad_accum=4, eval_every=100, retention_every=100),
    probe=ProbeConfig(every=0),
    name="warm-start-sft",
)
BASE = replace(WARM, regime="rl", model=ModelConfig(name=WARM_START), name=None,
               probe=ProbeConfig(every=20, batch_sharpness_every=100),  # denser than the default: λ is the study
               ppo=PPOConfig(prompts_per_step=8, group_size=4),
               train={"steps": 300, "micro_batch": 8, "grad_accum": 1, "eval_every": 50, "retention_every": 50})
SWEEP = Sweep("rl_lr", grid(BASE, lrs=(1e-4, 3e-4, 1e-3, 3e-3, 1e-2)), __doc__, warm_start=WARM)
