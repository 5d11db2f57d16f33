"""Full-batch gradient descent on a fixed SFT set (no momentum, no weight decay): Cohen et al. 2021's protocol
on the language model, where the 2/η threshold applies to λ_max exactly (no minibatch noise).

Measured on the embedded model (100 steps, η = 0.1 and 0.3): λ_max starts at 78, far above 2/η, falls to ≈ 2/η
within 10-20 steps and then oscillates at 0.9-2.3 × 2/η while the loss keeps decreasing non-monotonically
(an edge reached from above, not by progressive sharpening). About 2.5 s per step with probes on a loaded core."""

from agents.optim import OptimConfig
from agents.trainer import TrainConfig
from experiments.run import EnvConfig, RunConfig
from experiments.sweep import Sweep, grid
from probes import ProbeConfig

BASE = RunConfig(
    regime="sft",
    env=EnvConfig(env_id="ArithRLVR-v0", n_train=64, n_eval=64),
    optim=OptimConfig(name="sgd", momentum=0.0, weight_decay=0.0),
    train=TrainConfig(steps=500, micro_batch=16, full_batch=True, eval_every=100, retention_every=100,
                      checkpoint_every=250),
    # denser than ProbeConfig's default (every 250): the study is the λ trajectory itself
    probe=ProbeConfig(every=10, batch_sharpness_every=0),
)
SWEEP = Sweep("sft_gd_lr", grid(BASE, lrs=(0.03, 0.1, 0.3)), __doc__)
