"""The contract between ``agents.trainer.Trainer`` and a training regime (SFT, PPO): what the loop calls, and when.

A regime owns the data (which examples or rollouts make step t's batch), the objective (the exact loss the optimizer
steps on, which the probes also differentiate) and whatever state a resume needs. The trainer owns everything else
(optimizer, eval, probes, checkpoints, the run dir).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

Chunk = Any  # one micro-batch, as the regime's loss reads it (SFT, PPO: a dict of tensors)


class Regime(Protocol):
    """What the trainer relies on; ``SFTRegime`` and ``PPORegime`` implement every method."""

    def next_batch(self, policy, step: int) -> tuple[list[Chunk], dict[str, float]]:
        """Step ``step``'s effective batch as chunks whose losses sum to the batch loss, and metrics of drawing it
        (rollout rewards, token counts). Advances the data-order state."""

    def loss(self, policy, chunk: Chunk) -> torch.Tensor:
        """The chunk's share of the batch objective (a scalar); what the probes differentiate."""

    def loss_and_stats(self, policy, chunk: Chunk) -> tuple[torch.Tensor, dict[str, float]]:
        """``loss`` and diagnostics normalised like it (they sum over chunks to batch values); what the
        optimizer's gradient is accumulated from. The loss must equal ``loss(policy, chunk)``."""

    def sample_batch(self, policy, generator: torch.Generator) -> list[Chunk]:
        """A fresh training minibatch drawn with ``generator`` only (batch sharpness); no state changes."""

    def probe_set(self, policy, size: int, seed: int, chunk: int = 0) -> list[Chunk] | None:
        """The fixed probe set of ``probe/lambda_max`` as chunks (of ``chunk`` examples; 0 = the training
        micro-batch) whose losses sum to its mean loss: the same ``size`` examples for a given ``seed`` at every
        call (a pure function, so resumes see the same set).
        None: the current batch is the probe set (full-batch GD's batch is the training set; PPO has no fixed
        set, its objective is the surrogate on the current rollout buffer)."""

    def extra_parameters(self) -> dict[str, torch.Tensor]:
        """Trainable tensors the regime owns besides the policy's (PPO's value head); {} when none."""

    def state_dict(self) -> dict:
        """JSON-able data-order state (saved in each checkpoint's state.json)."""

    def load_state_dict(self, state: dict) -> None: ...

    def extra_state(self) -> dict | None:
        """Tensor state a resume needs beyond ``state_dict`` (PPO's live rollout buffer), or None."""

    def load_extra_state(self, state: dict) -> None: ...
