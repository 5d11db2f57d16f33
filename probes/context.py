"""What a probe measures: :class:`ProbeContext`, filled by the trainer, and :func:`preserved_state`, the guard
that keeps probing free of side effects.

The trainer fills a ProbeContext (trainable params, the exact loss it steps on, the current batch's frozen chunks,
the fixed probe set's chunks, optimizer, η);
probes measure without side effects: parameter values, ``.grad``, optimizer state, the torch/numpy/python RNG
states and every module's train/eval flag are as before.
"""
from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

__all__ = ["ProbeContext", "preserved_state"]


@dataclass
class ProbeContext:
    """Everything a probe step measures: the objective the optimizer steps on, at the current weights."""
    params: dict[str, torch.Tensor]        # named parameters being optimised (LoRA adapters only under LoRA)
    loss_fn: Callable[[Any], torch.Tensor] # loss of one chunk; chunk losses SUM to the loss of the set they cut
    batches: Sequence[Any]                 # frozen chunks of the current training batch (PPO: one rollout buffer)
    lr: float                              # η of the optimizer step (first param group)
    step: int = 0                          # optimizer steps taken (the probe cadence and its generator use it)
    optimizer: torch.optim.Optimizer | None = None   # momentum / Adam preconditioner are read from it
    model: torch.nn.Module | None = None             # for train/eval mode and attention-kernel handling
    sample_batch: Callable[[torch.Generator], Sequence[Any]] | None = None
    # draws a fresh training minibatch (list of chunks summing to that minibatch's loss) for batch sharpness; must
    # use only the generator it is given (training RNG is never touched)
    update: dict[str, torch.Tensor] | None = None     # last optimizer update Δθ, for update/critical sharpness
    probe_set: Sequence[Any] | None = None
    # frozen chunks of the fixed probe set whose Hessian probe/lambda_max is (chunk losses sum to the mean loss over
    # the set); the same set at every step. None: the probe set is ``batches`` (full-batch GD, where the batch is
    # the training set; PPO, whose objective lives on the current rollout buffer; a caller's fixed probe batch)


@contextlib.contextmanager
def preserved_state(model: torch.nn.Module | None, eval_mode: bool):
    """Save and restore the global RNG states and each module's training flag; enable grad inside."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    np_state, py_state = np.random.get_state(), random.getstate()
    flags = [(m, m.training) for m in model.modules()] if model is not None else []
    try:
        if model is not None and eval_mode:
            model.eval()
        with torch.enable_grad():
            yield
    finally:
        for m, flag in flags:
            m.training = flag
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        np.random.set_state(np_state)
        random.setstate(py_state)
