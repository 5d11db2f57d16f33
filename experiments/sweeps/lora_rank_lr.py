"""LoRA rank × learning-rate sweep on the SFT setup of ``sft_lr`` (same data, optimizer and batch): only the
adapters train, so the probes measure the Hessian restricted to the adapter parameters."""

from experiments.sweep import Sweep, grid
from experiments.sweeps.sft_lr import BASE

SWEEP = Sweep("lora_rank_lr", grid(BASE, lrs=(1e-3, 3e-3, 1e-2, 3e-2), ranks=(2, 8, 32)), __doc__)
