"""The training loop shared by every regime: accumulation, eval, retention, probes, run-dir I/O, checkpoints.

Row ``step = t`` of metrics.jsonl holds quantities measured at θ_t, the parameters after t optimizer steps:
``train/loss`` and ``train/grad_norm`` of the effective batch that the (t+1)-th update steps on, probes at θ_t on that
same batch, eval / retention at θ_t. The last row (``step = steps``) holds the final eval and retention only.

Step t:  batch_t = regime.next_batch(θ_t)  ->  [probe(θ_t, batch_t, Δθ_{t-1})]  ->  g = Σ_c ∇L_c(θ_t)
         -> divergence check -> θ_{t+1} = optimizer(θ_t, g) -> row -> [checkpoint step_{t+1}]

Determinism: the model runs in eval mode (no dropout), so the objective is a deterministic function of θ and the
batch, which is also what the probes assume; data order is a pure function of (seed, cursor); rollouts draw from
generators seeded per step. Probes use only a generator of their own and are side-effect free, so a run with probes
on is bitwise identical to the run with probes off. Checkpoint ``step_N`` stores θ_N (trainable parameters, as
safetensors), optimizer + scheduler state, every RNG state and the regime's data-order state, so resuming at N
replays steps N.. exactly (bitwise on CPU).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from agents.optim import accumulate_gradients

STATUS_RUNNING, STATUS_COMPLETED, STATUS_DIVERGED, STATUS_FAILED = "running", "completed", "diverged", "failed"
FINAL_MODEL = "checkpoints/final_model"  # save_pretrained of the final policy: a model.name for a later run
LINEAGE_FILE = "eoslab_lineage.json"  # in FINAL_MODEL: where the policy came from (see experiments.run)


@dataclass(frozen=True)
class TrainConfig:
    """Loop settings. Effective batch = micro_batch * grad_accum examples (SFT) unless full_batch (all n_train)."""

    steps: int = 1000               # optimizer steps (default probe cadence: λ_max every 250, batch sharpness every 1000)
    micro_batch: int = 4
    grad_accum: int = 4
    full_batch: bool = False        # every step = exact full-batch GD over the training set (chunked)
    seed: int = 0
    eval_every: int = 100           # greedy accuracy on the eval tasks (0 = only at start and end)
    retention_every: int = 100      # held-out pre-training perplexity (0 = only at start and end)
    retention_tokens: int = 8192    # predicted tokens per perplexity measurement (0 = no retention)
    checkpoint_every: int = 250     # 0 = only at the end
    divergence_loss: float = 50.0   # loss above this (or non-finite) ends the run as "diverged"
    max_length: int = 128
    eval_max_new_tokens: int = 32
    n_samples: int = 6              # eval prompts shown base vs fine-tuned in samples.json
    save_model: bool = True         # save_pretrained the final policy to <run>/checkpoints/final_model


# ---------------------------------------------------------------------------------------------------- small I/O
def _finite_or_none(x: Any) -> Any:
    if isinstance(x, (np.generic, torch.Tensor)):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None  # strict JSON has no NaN/Infinity
    return x


def write_json(path: Path, obj: Any) -> None:
    """Atomic JSON write (tmp file + os.replace), so readers never see a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def read_metrics(run_dir: Path | str) -> list[dict]:
    """Rows of metrics.jsonl (empty list when absent)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dirs(run_dir: Path | str) -> list[tuple[int, Path]]:
    """Complete checkpoints (state.json present: it is written last) sorted by step."""
    root = Path(run_dir) / "checkpoints"
    out = []
    if root.is_dir():
        for d in root.iterdir():
            if d.is_dir() and d.name.startswith("step_") and (d / "state.json").exists():
                try:
                    out.append((int(d.name[len("step_"):]), d))
                except ValueError:
                    continue
    return sorted(out)


def latest_checkpoint(run_dir: Path | str) -> tuple[int, Path] | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


# ---------------------------------------------------------------------------------------------------- eval
def greedy_eval(policy, tasks: Sequence[Any], score_fn: Callable[[list[str], list[str]], Sequence[float]],
                max_new_tokens: int, batch_size: int = 32) -> tuple[float, list[dict]]:
    """Greedy (temperature 0) completions on ``tasks``; accuracy = mean over tasks of [score == 1]."""
    rows = []
    for i in range(0, len(tasks), batch_size):
        part = tasks[i:i + batch_size]
        gen = policy.generate([t.prompt for t in part], max_new_tokens=max_new_tokens, temperature=0.0)
        scores = score_fn(gen.texts, [t.answer for t in part])
        for t, text, s in zip(part, gen.texts, scores):
            rows.append({"prompt": t.prompt, "answer": t.answer, "completion": text, "score": float(s),
                         "correct": bool(float(s) >= 1.0)})
    acc = float(np.mean([r["correct"] for r in rows])) if rows else float("nan")
    return acc, rows


# ---------------------------------------------------------------------------------------------------- trainer
class Trainer:
    """Runs ``config.steps`` optimizer steps of ``regime`` on ``policy`` and writes the run directory.

    Regime interface (SFTRegime, PPORegime): ``next_batch(policy, step) -> (chunks, metrics)``,
    ``loss(policy, chunk) -> scalar`` (chunk losses sum to the batch loss), optional
    ``loss_and_stats(policy, chunk) -> (scalar, {key: float})`` with stats normalised like the loss,
    ``sample_batch(policy, generator) -> chunks``, ``state_dict()/load_state_dict()`` (JSON-able data-order state),
    optional ``extra_state()/load_extra_state()`` (tensors) and ``extra_parameters() -> {name: tensor}``.
    """

    def __init__(self, policy, regime, optimizer: torch.optim.Optimizer, config: TrainConfig, run_dir: Path | str,
                 scheduler: torch.optim.lr_scheduler.LRScheduler | None = None, prober=None,
                 eval_tasks: Sequence[Any] = (), score_fn: Callable | None = None,
                 retention_fn: Callable[[Any], dict[str, float]] | None = None,
                 log_fn: Callable[[dict], None] | None = None, grad_clip: float | None = None,
                 progress: bool = True, lineage: dict | None = None) -> None:
        self.lineage = lineage  # JSON written as FINAL_MODEL/LINEAGE_FILE next to the saved policy
        self.policy, self.regime, self.optimizer, self.scheduler = policy, regime, optimizer, scheduler
        self.config, self.run_dir, self.prober = config, Path(run_dir), prober
        self.eval_tasks, self.score_fn, self.retention_fn = list(eval_tasks), score_fn, retention_fn
        self.log_fn, self.grad_clip, self.progress = log_fn, grad_clip, progress
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.last_update: dict[str, torch.Tensor] | None = None

    # ------------------------------------------------------------------ parameters
    def parameters(self) -> dict[str, torch.Tensor]:
        """Everything the optimizer updates: the policy's trainable parameters + the regime's own (value head)."""
        params = dict(self.policy.trainable_parameters())
        extra = getattr(self.regime, "extra_parameters", None)
        if extra is not None:
            params.update({f"regime.{k}": v for k, v in extra().items()})
        return params

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, step: int) -> Path:
        """checkpoints/step_<step>/: model.safetensors, optimizer.pt, rng.pt, [regime.pt], state.json (last)."""
        from safetensors.torch import save_file

        final = self.run_dir / "checkpoints" / f"step_{step}"
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.parameters().items()},
                  str(tmp / "model.safetensors"))
        torch.save({"optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None},
                   tmp / "optimizer.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        extra = getattr(self.regime, "extra_state", None)
        if extra is not None and extra() is not None:
            torch.save(extra(), tmp / "regime.pt")
        write_json(tmp / "state.json", {"step": step, "regime": self.regime.state_dict(),
                                        "lr": self.optimizer.param_groups[0]["lr"], "time": time.time()})
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        return final

    def load_checkpoint(self, path: Path) -> int:
        """Restore θ, optimizer, scheduler, RNG and data order from ``path``; returns its step.

        Optimizer hyper-parameters (lr, momentum, weight decay, betas...) are taken from the *current* optimizer,
        not from the checkpoint, so a resume with a changed LR continues from the saved state with the new LR."""
        from safetensors.torch import load_file

        tensors = load_file(str(path / "model.safetensors"))
        params = self.parameters()
        missing = set(params) ^ set(tensors)
        if missing:
            raise ValueError(f"checkpoint {path} does not match the model's trainable parameters: "
                             f"{sorted(missing)[:5]}")
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(tensors[k])
        fresh = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        opt = torch.load(path / "optimizer.pt", weights_only=False)
        self.optimizer.load_state_dict(opt["optimizer"])
        for group, hp in zip(self.optimizer.param_groups, fresh):
            group.update(hp)
        if self.scheduler is not None and opt["scheduler"] is not None:
            base = [hp.get("initial_lr", hp["lr"]) for hp in fresh]
            self.scheduler.load_state_dict(opt["scheduler"])
            self.scheduler.base_lrs = base
            factors = [f(self.scheduler.last_epoch) for f in self.scheduler.lr_lambdas]
            for group, b, f in zip(self.optimizer.param_groups, base, factors):
                group["initial_lr"], group["lr"] = b, b * f
        set_rng_state(torch.load(path / "rng.pt", weights_only=False))
        state = json.loads((path / "state.json").read_text())
        self.regime.load_state_dict(state["regime"])
        if (path / "regime.pt").exists():
            self.regime.load_extra_state(torch.load(path / "regime.pt", weights_only=False))
        return int(state["step"])

    # ------------------------------------------------------------------ status / metrics
    def write_status(self, status: str, step: int, reason: str = "") -> None:
        write_json(self.run_dir / "status.json", {"status": status, "step": step, "reason": reason})

    def _append(self, row: dict) -> None:
        row = {k: _finite_or_none(v) for k, v in row.items()}
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
        if self.log_fn is not None:
            self.log_fn(row)

    def _truncate_metrics(self, start: int) -> None:
        """Drop rows logged after the checkpoint we resume from (they will be recomputed identically)."""
        path = self.run_dir / "metrics.jsonl"
        if path.exists():
            keep = [r for r in read_metrics(self.run_dir) if r["step"] < start]
            path.write_text("".join(json.dumps(r) + "\n" for r in keep))

    # ------------------------------------------------------------------ measurements
    def _measure(self, step: int, final: bool = False) -> dict:
        """Eval accuracy and retention at θ_step on their cadences (always at step 0 and at the end)."""
        cfg, row = self.config, {}
        if self.eval_tasks and self.score_fn is not None and (
                final or step == 0 or (cfg.eval_every and step % cfg.eval_every == 0)):
            acc, rows = greedy_eval(self.policy, self.eval_tasks, self.score_fn, cfg.eval_max_new_tokens)
            row["eval/accuracy"] = acc
            if step == 0 or final:
                self._record_samples(step, rows[:cfg.n_samples], final)
        if self.retention_fn is not None and (
                final or step == 0 or (cfg.retention_every and step % cfg.retention_every == 0)):
            row.update(self.retention_fn(self.policy))
        return row

    def _record_samples(self, step: int, rows: list[dict], final: bool) -> None:
        """samples.json: base (step 0) vs fine-tuned (final) greedy completions on the first eval prompts."""
        path = self.run_dir / "samples.json"
        data = json.loads(path.read_text()) if path.exists() else {"base_step": None, "final_step": None, "rows": []}
        if not final:
            data["base_step"] = step
            data["rows"] = [{"prompt": r["prompt"], "answer": r["answer"], "base": r["completion"],
                             "base_correct": r["correct"]} for r in rows]
        else:
            data["final_step"] = step
            by_prompt = {r["prompt"]: r for r in data["rows"]}
            data["rows"] = [{**by_prompt.get(r["prompt"], {"prompt": r["prompt"], "answer": r["answer"]}),
                             "final": r["completion"], "final_correct": r["correct"]} for r in rows]
        write_json(path, data)

    def _probe(self, step: int, chunks: list) -> dict:
        from probes import ProbeContext

        ctx = ProbeContext(
            params=dict(self.policy.trainable_parameters()),
            loss_fn=lambda chunk: self.regime.loss(self.policy, chunk),
            batches=chunks,
            lr=float(self.optimizer.param_groups[0]["lr"]),
            step=step,
            optimizer=self.optimizer,
            model=self.policy.model,
            sample_batch=lambda gen: self.regime.sample_batch(self.policy, gen),
            update=self.last_update,
        )
        return dict(self.prober(ctx))

    def _loss_fn(self, chunk):
        with_stats = getattr(self.regime, "loss_and_stats", None)
        if with_stats is not None:
            return with_stats(self.policy, chunk)
        return self.regime.loss(self.policy, chunk)

    # ------------------------------------------------------------------ the loop
    def train(self, resume: bool = True) -> str:
        """Run (or resume) to ``config.steps``; returns the final status ("completed" or "diverged")."""
        cfg = self.config
        self.policy.model.eval()  # deterministic objective: no dropout (see module docstring)
        start = 0
        ckpt = latest_checkpoint(self.run_dir) if resume else None
        if ckpt is not None:
            start = self.load_checkpoint(ckpt[1])
            if start > cfg.steps:
                raise ValueError(f"{ckpt[1]} is at step {start}, beyond steps={cfg.steps}; "
                                 "raise steps or start a new run")
        self._truncate_metrics(start)
        self.write_status(STATUS_RUNNING, start)
        params = self.parameters()
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.steps, initial=start, desc=self.run_dir.name, disable=None, leave=False)
        step = start
        try:
            for step in range(start, cfg.steps):
                row = {"step": step, **self._measure(step)}
                chunks, batch_metrics = self.regime.next_batch(self.policy, step)
                row.update(batch_metrics)
                if self.prober is not None and self.prober.due(step):
                    row.update(self._probe(step, chunks))
                self.optimizer.zero_grad(set_to_none=True)
                loss, stats = accumulate_gradients(self._loss_fn, chunks)
                grads = [p.grad for p in params.values() if p.grad is not None]
                grad_norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
                loss = float(loss)
                row.update({"train/loss": loss, "train/lr": float(self.optimizer.param_groups[0]["lr"]),
                            "train/grad_norm": grad_norm, **stats})
                if not math.isfinite(loss) or loss > cfg.divergence_loss or not math.isfinite(grad_norm):
                    self._append(row)
                    reason = f"train/loss={loss:.4g}, grad_norm={grad_norm:.4g} at step {step}"
                    self._finish(STATUS_DIVERGED, step, reason)
                    return STATUS_DIVERGED
                want_update = self.prober is not None and self.prober.due(step + 1)
                before = {k: p.detach().clone() for k, p in self.policy.trainable_parameters().items()} \
                    if want_update else None
                if self.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(list(params.values()), self.grad_clip)
                self.optimizer.step()
                if self.scheduler is not None:
                    self.scheduler.step()
                self.last_update = None if before is None else {
                    k: p.detach() - before[k] for k, p in self.policy.trainable_parameters().items()}
                self._append(row)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}")
                if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
                    self.save_checkpoint(step + 1)
                    self.write_status(STATUS_RUNNING, step + 1)
            final_row = self._measure(cfg.steps, final=True)
            if final_row:
                self._append({"step": cfg.steps, **final_row})
            self.save_checkpoint(cfg.steps)
            if cfg.save_model:
                # under checkpoints/ so that run-dir discovery (a dir holding config.json) never mistakes it for a run
                self.policy.save(self.run_dir / FINAL_MODEL)
                if self.lineage is not None:
                    write_json(self.run_dir / FINAL_MODEL / LINEAGE_FILE, self.lineage)
            self._finish(STATUS_COMPLETED, cfg.steps)
            return STATUS_COMPLETED
        except BaseException as e:
            self.write_status(STATUS_FAILED, step, f"{type(e).__name__}: {e}")
            raise
        finally:
            if bar is not None:
                bar.close()

    def _finish(self, status: str, step: int, reason: str = "") -> None:
        self.write_status(status, step, reason)
        (self.run_dir / "DONE").write_text((self.run_dir / "status.json").read_text())
