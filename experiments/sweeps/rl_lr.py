"""RLVR learning-rate sweep: PPO with a group baseline on verifiable arithmetic (ArithRLVR-v0) from the embedded
model, SGD (momentum 0.9, weight decay 1e-4) as in the SFT sweeps; the probes measure the PPO surrogate on each
step's frozen rollout buffer."""

from agents.optim import OptimConfig
from agents.ppo import PPOConfig
from agents.trainer import TrainConfig
from experiments.run import EnvConfig, RunConfig
from experiments.sweep import Sweep, grid

BASE = RunConfig(
    regime="rl",
    env=EnvConfig(env_id="ArithRLVR-v0", n_train=1024, n_eval=64),
    optim=OptimConfig(name="sgd", momentum=0.9, weight_decay=1e-4),
    ppo=PPOConfig(prompts_per_step=8, group_size=4),
    train=TrainConfig(steps=300, micro_batch=8, eval_every=50, retention_every=50, checkpoint_every=100),
)
SWEEP = Sweep("rl_lr", grid(BASE, lrs=(1e-4, 3e-4, 1e-3, 3e-3, 1e-2)), __doc__)
