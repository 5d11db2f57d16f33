"""Bridge to TRL / HF trainers: our sharpness probes as a ``TrainerCallback`` and our env verifiers as TRL reward
functions, so TRL users get both without adopting our trainers.

ProbeCallback measures, after the optimizer steps that ``Prober.due`` selects, the Hessian of the probe loss

    L(θ) = Σ_chunks Σ_tokens −log p_θ(y_t | y_<t) / N_tokens        (completion tokens of the frozen probe batch)

which is SFTTrainer's token-mean cross-entropy evaluated on a fixed batch. Probe metrics (``probe/lambda_max``,
``probe/two_over_eta``, ...) go through ``transformers.Trainer.log`` when the callback is attached with
``attach_probes`` (so every reporting integration sees them) and otherwise straight into ``state.log_history``.
Probes have no side effects, so a run with the callback follows the same trajectory as one without, and it logs
the same entries besides the probe ones (see :meth:`ProbeCallback._log`).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from transformers import Trainer, TrainerCallback

import envs
from agents.policy import LMPolicy, token_logprobs
from agents.sft import make_chunks
from envs import make_trl_reward
from probes import ProbeConfig, ProbeContext, Prober


def sft_probe_batches(
    model: torch.nn.Module, tokenizer, prompts: Sequence[str], completions: Sequence[str], chunk_size: int = 8,
    max_length: int | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Frozen probe chunks {input_ids, attention_mask, labels, ...} built exactly as the SFT regime builds its
    micro-batches (``agents.sft.make_chunks``)."""
    if len(prompts) == 0:
        raise ValueError("sft_probe_batches needs at least one prompt")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return make_chunks(LMPolicy(model, tokenizer), list(prompts), list(completions), chunk_size, max_length)


def token_ce_loss_fn(batches: Sequence[dict[str, torch.Tensor]], model: torch.nn.Module) -> Callable:
    """loss_fn(chunk) = Σ_tokens NLL(chunk) / N, N = completion tokens over *all* batches, so chunk losses sum to
    the token-mean CE of the whole probe batch (the ProbeContext contract); per-token NLL as in SFT training."""
    total = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    if total == 0:
        raise ValueError("probe batches contain no completion tokens (all labels are -100)")

    def loss_fn(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        device = next(model.parameters()).device
        ids, mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
        logp, _ = token_logprobs(model, ids, mask, labels)
        return -logp.sum() / total

    return loss_fn


class ProbeCallback(TrainerCallback):
    """Runs ``Prober(config)`` on a frozen probe batch at the end of due optimizer steps of a HF/TRL Trainer.

    batches: frozen chunks (e.g. from ``sft_probe_batches``); loss_fn: loss of one chunk, chunk losses summing to
    the probe-batch loss (default: token-mean CE, ``token_ce_loss_fn``); sample_batch: optional fresh-minibatch
    sampler for batch sharpness. η is the first param group's lr after the step; the update Δθ of a due step is
    recorded (one parameter copy, only on due steps) for ``probe/update_sharpness``. ``history`` keeps every
    measurement as {"step": ..., "probe/...": ...}."""

    def __init__(
        self,
        batches: Sequence[Any],
        config: ProbeConfig = ProbeConfig(),
        loss_fn: Callable[[Any], torch.Tensor] | None = None,
        sample_batch: Callable[[torch.Generator], Sequence[Any]] | None = None,
        trainer=None,
    ) -> None:
        if not batches:
            raise ValueError("ProbeCallback needs at least one probe batch")
        self.batches = list(batches)
        self.prober = Prober(config)
        self.loss_fn = loss_fn
        self.sample_batch = sample_batch
        self.trainer = trainer
        self.history: list[dict[str, float]] = []
        self._before: dict[str, torch.Tensor] | None = None

    @staticmethod
    def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {n: p for n, p in model.named_parameters() if p.requires_grad}

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        # Keep θ_before only when the coming step will be probed (global_step is incremented after the step).
        if model is not None and self.prober.due(state.global_step + 1):
            self._before = {n: p.detach().clone() for n, p in self._params(model).items()}
        return control

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        step = state.global_step
        if model is None or not self.prober.due(step):
            return control
        params = self._params(model)
        inner = getattr(optimizer, "optimizer", optimizer)  # unwrap accelerate's AcceleratedOptimizer
        lr = float(inner.param_groups[0]["lr"]) if inner is not None else float(args.learning_rate)
        update = None
        if self._before is not None and self._before.keys() == params.keys():
            update = {n: (p.detach() - self._before[n]) for n, p in params.items()}
        self._before = None
        ctx = ProbeContext(
            params=params,
            loss_fn=self.loss_fn or token_ce_loss_fn(self.batches, model),
            batches=self.batches,
            lr=lr,
            step=step,
            optimizer=inner,
            model=model,
            sample_batch=self.sample_batch,
            update=update,
        )
        metrics = self.prober(ctx)
        if metrics:
            self.history.append({"step": step, **metrics})
            if self.trainer is not None:
                control = self._log(dict(metrics), control)
            else:
                state.log_history.append({**metrics, "step": step})
        return control

    def _log(self, metrics: dict[str, float], control):
        """Log probe metrics without changing the trainer's own logs.

        The base ``Trainer.log``, not the trainer's: TRL's ``SFTTrainer.log``/``GRPOTrainer.log`` fold their
        accumulated train metrics (token accuracy, rewards, ...) into whatever is logged and clear them, so a probe
        entry would take them from the next loss entry. And ``control.should_log`` is put back: the callback
        handler's ``on_log`` resets it, which made the trainer skip its own loss entry at every probed logging step
        (and average the next one over the skipped window).
        """
        should_log = control.should_log
        Trainer.log(self.trainer, metrics)
        control = self.trainer.control  # log() rebinds it to what the on_log callbacks returned
        control.should_log = should_log
        return control


def attach_probes(trainer, batches: Sequence[Any], config: ProbeConfig = ProbeConfig(), **kwargs) -> ProbeCallback:
    """Create a ProbeCallback bound to ``trainer`` (metrics go through trainer.log) and add it; returns it."""
    callback = ProbeCallback(batches, config, trainer=trainer, **kwargs)
    trainer.add_callback(callback)
    return callback


# ------------------------------------------------------------------------------------------------ rewards
def env_reward_function(env_id: str, **env_kwargs: Any) -> Callable[..., list[float]]:
    """TRL reward function (GRPOTrainer / RLOOTrainer ``reward_funcs``) scoring completions with ``env_id``'s
    verifier against the dataset column ``answer`` (TRL passes extra columns as list kwargs; keep
    ``remove_unused_columns=False``, the GRPOConfig default). Rewards in [0, 1]; malformed completions score 0.
    This is ``envs.make_trl_reward``, re-exported so TRL users find rewards next to the probe callback."""
    return make_trl_reward(env_id, **env_kwargs)


def env_rows(env_id: str, split: str = "train", n: int | None = None) -> list[dict[str, str]]:
    """Dataset rows {prompt, completion, answer, task_id} of an env: SFTTrainer trains on prompt/completion
    (completion-only loss), GRPOTrainer samples from prompt and rewards with env_reward_function via answer."""
    return [
        {"prompt": t.prompt, "completion": t.demonstration, "answer": t.answer, "task_id": t.task_id}
        for t in envs.load_tasks(env_id, split=split, n=n)
    ]


def env_dataset(env_id: str, split: str = "train", n: int | None = None):
    """``datasets.Dataset`` of env_rows (TRL trainers take a Dataset)."""
    from datasets import Dataset  # optional: only TRL users need it

    return Dataset.from_list(env_rows(env_id, split, n))
