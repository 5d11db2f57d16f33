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
safetensors), optimizer + scheduler state, every RNG state, the regime's data-order state and the prober's state
(warm-start vectors, the last update Δθ) and the LR controller's state (schedule eos/cdat: η, EMAs, warm vector),
so resuming at N replays steps N.. exactly (bitwise on CPU), probes included.

LR controller (agents.eos_lr, optional): called after the gradient is accumulated (and clipped) and before the
optimizer step; it sets η for that step, so ``train/lr`` and ``optim/lr`` of row t are the η that θ_{t+1} was taken
with. Probes ran earlier in the step, at the η in force then (``probe/two_over_eta`` uses the previous step's η).

Nothing read back from a run dir can execute code: tensors are safetensors, the ``.pt`` files hold only tensors and
plain containers and load with ``torch.load(weights_only=True)``, and each checkpoint's ``manifest.json`` (sha256 of
every file) is verified first. A resume takes the newest checkpoint that verifies and whose metrics rows are all
present, warning about each one it passes over (a corrupt checkpoint, or rows lost from metrics.jsonl, which the
replay from the older checkpoint regenerates); it fails with ``CheckpointError`` when every checkpoint is corrupt.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import pickle
import random
import re
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from agents.episodes import TurnProtocol, play
from agents.optim import accumulate_gradients
from agents.regime import Regime
from agents.runwriter import (STATUS_COMPLETED, STATUS_DIVERGED, STATUS_FAILED, STATUS_RUNNING, RunWriter,
                              read_metrics, write_json)  # noqa: F401 - read_metrics: part of this module's API
from probes import ProbeContext
from probes.memory import PeakMemory

FINAL_MODEL = "checkpoints/final_model"  # save_pretrained of the final policy: a model.name for a later run
LINEAGE_FILE = "eoslab_lineage.json"  # in FINAL_MODEL: where the policy came from (see experiments.run)
MANIFEST = "manifest.json"  # in each checkpoint: {"sha256": {file: hex digest}} of every other file


class CheckpointError(RuntimeError):
    """A checkpoint that fails verification or safe loading; the message is one line."""


class ResumeWarning(UserWarning):
    """A resume that passed over a checkpoint or repaired metrics.jsonl."""


@dataclass(frozen=True)
class TrainConfig:
    """Loop settings. Effective batch = micro_batch * grad_accum examples (SFT) unless full_batch (all n_train)."""

    steps: int = 1000
    """Optimizer steps."""
    micro_batch: int = 4
    """Examples per chunk (one forward/backward); RL: completions per chunk of the rollout buffer."""
    grad_accum: int = 4
    """Chunks per optimizer step (SFT); the gradient is their exact sum."""
    full_batch: bool = False
    """SFT only: every step is exact full-batch GD over the env.n_train training tasks (chunked)."""
    seed: int = 0
    """Random seed: data order, rollout sampling, value-head init."""
    eval_every: int = 100
    """Greedy accuracy on the eval tasks every this many steps (0 = only at start and end)."""
    retention_every: int = 100
    """Held-out pre-training perplexity every this many steps (0 = only at start and end)."""
    retention_tokens: int = 8192
    """Predicted tokens per perplexity measurement (0 = no retention)."""
    checkpoint_every: int = 250
    """Checkpoint every this many steps (0 = only at the end)."""
    divergence_loss: float = 50.0
    """A loss above this (or a non-finite one) ends the run as diverged."""
    max_length: int = 128
    """Tokens per training sequence (prompt + completion); longer completions are cut."""
    eval_max_new_tokens: int = 64
    """Greedy tokens per eval completion (the column working of a 3-digit sum is ~50 tokens)."""
    n_samples: int = 6
    """Eval prompts shown base vs fine-tuned in samples.json."""
    save_model: bool = True
    """save_pretrained the final policy to <run>/checkpoints/final_model (a model.name for a later run)."""
    autocast: str = ""
    """"bfloat16" or "float16": the training loss and its gradient under torch.autocast (half-precision matmuls,
    float32 weights and optimizer), while probes and the LR controller measure the float32 loss (HVPs lose ~3 % in
    bf16); "" = off. float16 (GPUs without bf16) scales the loss by torch.amp.GradScaler: a step whose float16
    gradient overflows is skipped and the scale halved (train/overflow, train/loss_scale; the scale is checkpointed),
    and an overflow at a scale ≤ 1 ends the run as diverged. For GPUs; on a CPU it runs, slowly."""


AUTOCAST = ("", "bfloat16", "float16")


def config_errors(t: TrainConfig) -> list[str]:
    """Problems with ``t`` on its own ([] = valid); how it fits the regime and env is the run config's check."""
    errors = []
    for name in ("steps", "micro_batch", "grad_accum"):
        if getattr(t, name) < 1:
            errors.append(f"train.{name}={getattr(t, name)} must be >= 1")
    for name in ("eval_every", "retention_every", "checkpoint_every", "n_samples", "retention_tokens"):
        if getattr(t, name) < 0:
            errors.append(f"train.{name}={getattr(t, name)} must be >= 0 (0 = only at the start and end)")
    if not (math.isfinite(t.divergence_loss) and t.divergence_loss > 0):
        errors.append(f"train.divergence_loss={t.divergence_loss} must be a finite number > 0")
    if t.max_length < 2:
        errors.append(f"train.max_length={t.max_length} must be >= 2")
    if t.eval_max_new_tokens < 1:
        errors.append(f"train.eval_max_new_tokens={t.eval_max_new_tokens} must be >= 1")
    if t.autocast not in AUTOCAST:
        errors.append(f"train.autocast={t.autocast!r} must be one of 'bfloat16', 'float16' or '' (off)")
    return errors


# ---------------------------------------------------------------------------------------------------- RNG
def rng_state() -> dict:
    """Every global RNG state as tensors and plain lists (loadable with ``torch.load(weights_only=True)``)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
             "python": [version, list(internal), gauss_next]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Inverse of :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(directory: Path) -> None:
    """``MANIFEST`` = sha256 of every other file in ``directory``."""
    files = sorted(p.name for p in directory.iterdir() if p.is_file() and p.name != MANIFEST)
    write_json(directory / MANIFEST, {"sha256": {name: _sha256(directory / name) for name in files}})


def verify_checkpoint(path: Path) -> None:
    """Raise CheckpointError unless every file of ``path`` matches its manifest (no file missing or extra)."""
    try:
        listed = json.loads((path / MANIFEST).read_text())["sha256"]
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} has no {MANIFEST} (incomplete, or written by an older "
                              "eoslab), so it cannot be verified") from None
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} is corrupt") from None
    present = {p.name for p in path.iterdir() if p.is_file() and p.name != MANIFEST}
    extra, missing = sorted(present - set(listed)), sorted(set(listed) - present)
    if extra or missing:
        raise CheckpointError(f"checkpoint {path}: files {missing} missing / {extra} not in its {MANIFEST}")
    bad = [name for name, digest in sorted(listed.items()) if _sha256(path / name) != digest]
    if bad:
        raise CheckpointError(f"checkpoint {path}: {', '.join(bad)} fail(s) the sha256 check (truncated or altered)")


def safe_load(path: Path) -> Any:
    """``torch.load(weights_only=True)``: tensors and plain containers only, so a crafted pickle cannot run code."""
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL \S+|Unsupported operand \S+", str(e))
        detail = found.group(0).strip() if found else str(e).splitlines()[0]
        raise CheckpointError(f"{path} holds more than tensors and plain containers; refused to unpickle it "
                              f"({detail})") from None
    except Exception as e:  # truncated zip, bad magic, ...
        raise CheckpointError(f"{path} cannot be read: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                              ) from None


def _cpu_copy(obj: Any) -> Any:
    """``obj`` with every tensor detached and copied to CPU (containers rebuilt, other values shared)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True).contiguous()
    if isinstance(obj, dict):
        return {k: _cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu_copy(v) for v in obj)
    return obj


def _grad_norm(params) -> float:
    """‖g‖₂ over the parameters that have a gradient (0.0 when none has), holding no reference to them."""
    grads = [p.grad for p in params if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


def _cpu_view(obj: Any) -> Any:
    """``obj`` with every tensor detached and on CPU: shared where it is already there, copied where not."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu")
    if isinstance(obj, dict):
        return {k: _cpu_view(v) for k, v in obj.items()}
    return obj


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
                max_new_tokens: int, batch_size: int = 32, protocol: TurnProtocol | None = None
                ) -> tuple[float, list[dict]]:
    """Greedy (temperature 0) completions on ``tasks``, whole episodes under a multi-turn ``protocol`` (the
    completion is then the transcript after the prompt); accuracy = mean over tasks of [score == 1]."""
    rows = []
    for i in range(0, len(tasks), batch_size):
        part = tasks[i:i + batch_size]
        prompts = [t.prompt for t in part]
        if protocol is not None:
            texts = play(policy, prompts, protocol, max_new_tokens, temperature=0.0).texts
        else:
            texts = policy.generate(prompts, max_new_tokens=max_new_tokens, temperature=0.0).texts
        scores = score_fn(texts, [t.answer for t in part])
        for t, text, s in zip(part, texts, scores):
            rows.append({"prompt": t.prompt, "answer": t.answer, "completion": text, "score": float(s),
                         "correct": bool(float(s) >= 1.0)})
    acc = float(np.mean([r["correct"] for r in rows])) if rows else float("nan")
    return acc, rows


# ---------------------------------------------------------------------------------------------------- trainer
class Trainer:
    """Runs ``config.steps`` optimizer steps of ``regime`` (see ``agents.regime.Regime``) on ``policy`` and writes
    the run directory."""

    def __init__(self, policy, regime: Regime, optimizer: torch.optim.Optimizer, config: TrainConfig, run_dir: Path | str,
                 scheduler: torch.optim.lr_scheduler.LRScheduler | None = None, prober=None,
                 eval_tasks: Sequence[Any] = (), score_fn: Callable | None = None,
                 retention_fn: Callable[[Any], dict[str, float]] | None = None,
                 log_fn: Callable[[dict], None] | None = None, grad_clip: float | None = None,
                 progress: bool = True, lineage: dict | None = None, controller=None,
                 eval_protocol: TurnProtocol | None = None) -> None:
        self.lineage = lineage  # JSON written as FINAL_MODEL/LINEAGE_FILE next to the saved policy
        self.policy, self.regime, self.optimizer, self.scheduler = policy, regime, optimizer, scheduler
        self.config, self.run_dir, self.prober = config, Path(run_dir), prober
        self.eval_tasks, self.score_fn, self.retention_fn = list(eval_tasks), score_fn, retention_fn
        self.eval_protocol = eval_protocol  # multi-turn envs: evaluation plays whole episodes
        self.grad_clip, self.progress = grad_clip, progress
        self.writer = RunWriter(self.run_dir, log_fn)
        self.last_update: dict[str, torch.Tensor] | None = None
        self.controller = controller  # agents.eos_lr controller (sets η each step) or None
        # float16 training: the loss is scaled so that small gradients survive float16 (bf16 has float32's range)
        self.scaler = torch.amp.GradScaler(policy.device.type) if config.autocast == "float16" else None

    # ------------------------------------------------------------------ parameters
    def parameters(self) -> dict[str, torch.Tensor]:
        """Everything the optimizer updates: the policy's trainable parameters + the regime's own (value head)."""
        params = dict(self.policy.trainable_parameters())
        params.update({f"regime.{k}": v for k, v in self.regime.extra_parameters().items()})
        return params

    # ------------------------------------------------------------------ checkpoints
    def _snapshot(self, step: int) -> dict:
        """What checkpoint ``step_<step>`` holds, taken now: ``_with_weights(_state_at_start(step))``."""
        return self._with_weights(self._state_at_start(step))

    def _state_at_start(self, step: int) -> dict:
        """Everything of checkpoint ``step_<step>`` but the weights and the optimizer state, taken at the start of
        that step: the RNG, the data cursor, the scheduler and controller, the probe warm starts and the last
        update. The prober's vectors and ``last_update`` are replaced, never mutated in place, so they are shared,
        not copied (on CPU): a parameter-sized vector each, which two snapshots alive at once would double."""
        # a prober without warm starts (any callable with ``due``) has no state to save
        prober_state = getattr(self.prober, "state_dict", None)
        probe = {f"prober.{k}": v for k, v in (prober_state() if prober_state is not None else {}).items()}
        probe.update({f"update.{k}": v for k, v in (self.last_update or {}).items()})
        return {
            "optimizer": {"scheduler": copy.deepcopy(self.scheduler.state_dict()) if self.scheduler is not None
                          else None,
                          "scaler": self.scaler.state_dict() if self.scaler is not None else None},
            "rng": rng_state(),
            "regime": self.regime.extra_state(),  # replaced, never mutated, by the regime
            "probe": _cpu_view(probe),
            "controller": _cpu_copy(self.controller.state_dict()) if self.controller is not None else None,
            "state": {"step": step, "regime": self.regime.state_dict(), "lr": self.optimizer.param_groups[0]["lr"],
                      "time": time.time()},
        }

    def _with_weights(self, start: dict) -> dict:
        """``start`` (from ``_state_at_start``) completed with copies of the weights and the optimizer state, which
        only ``optimizer.step`` changes: taken any time before it, they are the start's."""
        return {**start, "model": _cpu_copy(self.parameters()),
                "optimizer": {**start["optimizer"], "optimizer": _cpu_copy(self.optimizer.state_dict())}}

    def save_checkpoint(self, step: int, snapshot: dict | None = None) -> Path:
        """checkpoints/step_<step>/: model.safetensors, optimizer.pt, rng.pt, [regime.pt], [probe.safetensors],
        [controller.pt], state.json and manifest.json (sha256 of the others), written to a temporary dir and renamed
        into place.
        ``snapshot`` (from ``_snapshot``) saves an earlier state; default: the current one."""
        snap = snapshot if snapshot is not None else self._snapshot(step)
        final = self.run_dir / "checkpoints" / f"step_{step}"
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(snap["model"], str(tmp / "model.safetensors"))
        torch.save(snap["optimizer"], tmp / "optimizer.pt")
        torch.save(snap["rng"], tmp / "rng.pt")
        if snap["regime"] is not None:
            torch.save(snap["regime"], tmp / "regime.pt")
        if snap["probe"]:
            save_file(snap["probe"], str(tmp / "probe.safetensors"))
        if snap.get("controller") is not None:
            torch.save(snap["controller"], tmp / "controller.pt")
        write_json(tmp / "state.json", snap["state"])
        write_manifest(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        return final

    def read_checkpoint(self, path: Path) -> dict:
        """Verify ``path`` against its manifest and load it without executing anything; changes no state.
        Raises CheckpointError (one line) when it is corrupt, unsafe or not this model's."""
        path = Path(path)
        verify_checkpoint(path)
        try:
            tensors = load_file(str(path / "model.safetensors"))
            probe = load_file(str(path / "probe.safetensors")) if (path / "probe.safetensors").exists() else {}
            state = json.loads((path / "state.json").read_text())
            int(state["step"]), state["regime"]
        except Exception as e:
            raise CheckpointError(f"checkpoint {path} cannot be read: {type(e).__name__}: {e}") from None
        mismatch = set(self.parameters()) ^ set(tensors)
        if mismatch:
            raise CheckpointError(f"checkpoint {path} does not match the model's trainable parameters: "
                                  f"{sorted(mismatch)[:5]}")
        opt = safe_load(path / "optimizer.pt")
        if not (isinstance(opt, dict) and {"optimizer", "scheduler"} <= set(opt)):
            raise CheckpointError(f"checkpoint {path}: optimizer.pt lacks the optimizer/scheduler state")
        controller = safe_load(path / "controller.pt") if (path / "controller.pt").exists() else None
        if self.controller is not None and controller is None:
            raise CheckpointError(f"checkpoint {path} has no LR-controller state (controller.pt), which this run's "
                                  "schedule needs to resume")
        return {"model": tensors, "optimizer": opt, "rng": safe_load(path / "rng.pt"), "state": state,
                "regime": safe_load(path / "regime.pt") if (path / "regime.pt").exists() else None, "probe": probe,
                "controller": controller}

    def load_checkpoint(self, path: Path) -> int:
        """Restore θ, optimizer, scheduler, RNG, data order and prober state from ``path``; returns its step.

        Optimizer hyper-parameters (lr, momentum, weight decay, betas...) are taken from the *current* optimizer,
        not from the checkpoint, so a resume with a changed LR continues from the saved state with the new LR."""
        return self._apply_checkpoint(self.read_checkpoint(path))

    def _apply_checkpoint(self, ck: dict) -> int:
        params = self.parameters()
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(ck["model"][k])
        fresh = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        opt = ck["optimizer"]
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
        if self.controller is not None:  # after the groups got the fresh lr: the controller's η replaces it
            self.controller.load_state_dict(ck["controller"])
        if self.scaler is not None and opt.get("scaler"):   # a float16 run's loss scale (absent before float16)
            self.scaler.load_state_dict(opt["scaler"])
        set_rng_state(ck["rng"])
        self.regime.load_state_dict(ck["state"]["regime"])
        if ck["regime"] is not None:
            self.regime.load_extra_state(ck["regime"])
        load_probe = getattr(self.prober, "load_state_dict", None)
        if load_probe is not None:
            load_probe({k[len("prober."):]: v for k, v in ck["probe"].items() if k.startswith("prober.")})
        live = self.policy.trainable_parameters()
        update = {k[len("update."):]: v for k, v in ck["probe"].items() if k.startswith("update.")}
        self.last_update = {k: v.to(live[k].device) for k, v in update.items()} if update else None
        return int(ck["state"]["step"])

    def _resume(self) -> int:
        """Load the newest usable checkpoint; returns its step (0: start from the initial state).

        Usable = verifies and safely loads, and metrics.jsonl holds every row before its step. Lines of
        metrics.jsonl that are not JSON (a torn last line) are dropped. Each checkpoint passed over is reported as a ResumeWarning; rows missing before
        a checkpoint are regenerated by replaying from an older one (from step 0 if none is older). Raises
        ValueError when a checkpoint lies beyond ``config.steps`` (nothing is changed), CheckpointError when no
        checkpoint is intact."""
        dirs = checkpoint_dirs(self.run_dir)
        if dirs and dirs[-1][0] > self.config.steps:
            raise ValueError(f"{dirs[-1][1]} is at step {dirs[-1][0]}, beyond steps={self.config.steps}; "
                             "raise steps or start a new run")
        rows, bad = self.writer.rows()
        if bad:  # their steps become gaps below, regenerated like any lost row
            metrics = self.run_dir / "metrics.jsonl"
            what = "a torn last line (a crash mid-write)" if bad == [self.writer.line_count()] \
                else f"lines {bad} that are not JSON"
            warnings.warn(f"{metrics}: dropped {what}", ResumeWarning, stacklevel=3)
            self.writer.replace_rows(rows)
        logged = {r.get("step") for r in rows}
        first_gap = next(s for s in range(len(logged) + 1) if s not in logged)
        passed = [step for step, _ in dirs if step > first_gap]
        if passed:
            warnings.warn(f"metrics.jsonl has no row for step {first_gap}; passing over checkpoint(s) "
                          f"{', '.join(f'step_{s}' for s in passed)} to regenerate the missing rows from an earlier "
                          "state", ResumeWarning, stacklevel=3)
        failures = []
        for step, path in reversed([(s, p) for s, p in dirs if s <= first_gap]):
            try:
                ck = self.read_checkpoint(path)
            except CheckpointError as e:
                failures.append(str(e))
                warnings.warn(f"{e}; passing over it", ResumeWarning, stacklevel=3)
                continue
            return self._apply_checkpoint(ck)
        if failures:
            raise CheckpointError(f"no intact checkpoint to resume from ({failures[0]}); "
                                  "start over with --overwrite (resume=False)")
        return 0

    # ------------------------------------------------------------------ measurements
    def _measure(self, step: int, final: bool = False) -> dict:
        """Eval accuracy and retention at θ_step on their cadences (always at step 0 and at the end)."""
        cfg, row = self.config, {}
        if self.eval_tasks and self.score_fn is not None and (
                final or step == 0 or (cfg.eval_every and step % cfg.eval_every == 0)):
            acc, rows = greedy_eval(self.policy, self.eval_tasks, self.score_fn, cfg.eval_max_new_tokens,
                                    protocol=self.eval_protocol)
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

    def _context(self, step: int, chunks: list) -> ProbeContext:
        """The objective the optimizer steps on at θ_step (for probes and the LR controller)."""
        return ProbeContext(
            params=dict(self.policy.trainable_parameters()),
            loss_fn=lambda chunk: self.regime.loss(self.policy, chunk),
            batches=chunks,
            lr=float(self.optimizer.param_groups[0]["lr"]),
            step=step,
            optimizer=self.optimizer,
            model=self.policy.model,
            sample_batch=lambda gen: self.regime.sample_batch(self.policy, gen),
            update=self.last_update,
            probe_set=self._probe_set(),
        )

    def _probe(self, step: int, chunks: list) -> dict:
        return dict(self.prober(self._context(step, chunks)))

    def _probe_set(self) -> list | None:
        """The regime's fixed probe set at the prober's ``probe_set_size`` (None: the batch is the probe set)."""
        cfg = getattr(self.prober, "config", None)   # a prober may be any callable with ``due``
        size = getattr(cfg, "probe_set_size", 0)
        return self.regime.probe_set(self.policy, size, getattr(cfg, "seed", 0), getattr(cfg, "chunk_size", 0)) \
            if size > 0 else None

    def _loss_fn(self, chunk):
        if self.config.autocast:   # the training loss only: probes and the controller call regime.loss in float32
            with torch.autocast(self.policy.device.type, dtype=getattr(torch, self.config.autocast)):
                return self.regime.loss_and_stats(self.policy, chunk)
        return self.regime.loss_and_stats(self.policy, chunk)

    # ------------------------------------------------------------------ the loop
    def train(self, resume: bool = True) -> str:
        """Run (or resume) to ``config.steps``; returns the final status ("completed" or "diverged")."""
        cfg = self.config
        self.policy.model.eval()  # deterministic objective: no dropout (see module docstring)
        start = 0
        if resume:
            try:
                start = self._resume()
            except CheckpointError as e:
                self.writer.write_status(STATUS_FAILED, self.writer.status_step(), str(e))
                raise
        self.writer.keep_rows_before(start)
        self.writer.write_status(STATUS_RUNNING, start)
        params = self.parameters()
        device = next(iter(params.values())).device if params else torch.device("cpu")
        bar = None
        if self.progress:
            bar = tqdm(total=cfg.steps, initial=start, desc=self.run_dir.name, disable=None, leave=False)
        step = start
        on_disk = start if start > 0 else None  # step of the checkpoint holding the current state, if any
        last_good: tuple[int, dict | None] | None = None  # newest state whose loss passed the divergence check
        try:
            for step in range(start, cfg.steps):
                # θ_step is the last good state should θ_{step+1} diverge: keep it unless a checkpoint has it. Its
                # small part now (the RNG and data cursor move below), its weights once its loss has passed: one
                # copy of the weights and optimizer state is alive at a time, never two (through the probe call).
                start_state = self._state_at_start(step) if on_disk != step else None
                t_measure = time.perf_counter()
                row = {"step": step, **self._measure(step)}
                t_step = time.perf_counter()
                measure_s = t_step - t_measure
                chunks, batch_metrics = self.regime.next_batch(self.policy, step)
                row.update(batch_metrics)
                # the last step's gradients are spent: free them before the probe's own (a parameter-sized vector)
                self.optimizer.zero_grad(set_to_none=True)
                if self.prober is not None and self.prober.due(step):
                    with PeakMemory(device) as probe_mem:
                        row.update(self._probe(step, chunks))
                    row.update({"memory/probe_mb": probe_mem.mb, "memory/probe_peak_mb": probe_mem.peak_mb})
                step_mem = PeakMemory(device).__enter__()  # closed after the update: gradients, controller, step
                loss, stats = accumulate_gradients(self._loss_fn, chunks,
                                                   scale=self.scaler.scale if self.scaler is not None else None)
                overflow = False
                if self.scaler is not None:
                    row["train/loss_scale"] = loss_scale = self.scaler.get_scale()
                    self.scaler.unscale_(self.optimizer)   # .grad is the gradient again (inf where float16 overflowed)
                grad_norm = _grad_norm(params.values())
                loss = float(loss)
                row.update({"train/loss": loss, "train/lr": float(self.optimizer.param_groups[0]["lr"]),
                            "train/grad_norm": grad_norm, **stats})
                if self.scaler is not None:
                    # a finite loss whose scaled float16 gradient overflowed: skip the step and halve the scale
                    # (GradScaler), unless the scale is ≤ 1 already: then float16 cannot hold the gradient at all
                    overflow = math.isfinite(loss) and not math.isfinite(grad_norm) and loss_scale > 1.0
                    row["train/overflow"] = float(overflow)
                if not math.isfinite(loss) or loss > cfg.divergence_loss or not (overflow or math.isfinite(grad_norm)):
                    self.writer.append(row)
                    reason = f"train/loss={loss:.4g}, grad_norm={grad_norm:.4g} at step {step}"
                    if self.scaler is not None and math.isfinite(loss) and not math.isfinite(grad_norm):
                        reason += f" (the float16 gradient overflows at loss scale {loss_scale:g})"
                    if last_good is not None:
                        if last_good[1] is not None:
                            self.save_checkpoint(*last_good)
                        reason += f"; last good state: checkpoints/step_{last_good[0]}"
                    self.writer.finish(STATUS_DIVERGED, step, reason)
                    return STATUS_DIVERGED
                last_good = None   # θ_{step-1}'s copy is not needed any more: drop it before taking θ_step's
                last_good = (step, self._with_weights(start_state) if start_state is not None else None)
                want_update = self.prober is not None and self.prober.due(step + 1)
                before = {k: p.detach().clone() for k, p in self.policy.trainable_parameters().items()} \
                    if want_update else None
                if self.grad_clip is not None and not overflow:
                    torch.nn.utils.clip_grad_norm_(list(params.values()), self.grad_clip)
                if self.controller is not None and not overflow:  # sets η of this step (see module docstring)
                    row.update(self.controller(self._context(step, chunks), loss))
                    row["train/lr"] = float(self.optimizer.param_groups[0]["lr"])
                if self.scaler is not None:
                    self.scaler.step(self.optimizer)   # skipped when unscale_ found an inf or NaN
                    self.scaler.update()
                else:
                    self.optimizer.step()
                step_mem.__exit__(None, None, None)
                row["memory/step_mb"], row["memory/step_peak_mb"] = step_mem.mb, step_mem.peak_mb
                if self.scheduler is not None:
                    with warnings.catch_warnings():
                        # a skipped float16 step still counts as a step of the schedule (torch warns when the
                        # optimizer has not stepped yet), so that the schedule stays the run's step count
                        warnings.filterwarnings("ignore", re.escape("Detected call of `lr_scheduler.step()` before"))
                        self.scheduler.step()
                self.last_update = None if before is None else {
                    k: p.detach() - before[k] for k, p in self.policy.trainable_parameters().items()}
                before = None   # a parameter-sized copy: not to be held through the next probe call
                # wall seconds of this step's training (batch or rollouts, gradients, controller, update), probes
                # excluded (probe/seconds has them); of its eval + retention (time/measure_s): what a budget counts
                row["time/step_s"] = time.perf_counter() - t_step - row.get("probe/seconds", 0.0)
                row["time/measure_s"] = measure_s
                self.writer.append(row)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}")
                if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
                    self.save_checkpoint(step + 1)
                    on_disk = step + 1
                    self.writer.write_status(STATUS_RUNNING, step + 1)
            t_measure = time.perf_counter()
            final_row = self._measure(cfg.steps, final=True)
            if final_row:
                self.writer.append({"step": cfg.steps, **final_row, "time/measure_s": time.perf_counter() - t_measure})
            self.save_checkpoint(cfg.steps)
            if cfg.save_model:
                # under checkpoints/ so that run-dir discovery (a dir holding config.json) never mistakes it for a run
                self.policy.save(self.run_dir / FINAL_MODEL)
                if self.lineage is not None:
                    write_json(self.run_dir / FINAL_MODEL / LINEAGE_FILE, self.lineage)
            self.writer.finish(STATUS_COMPLETED, cfg.steps)
            return STATUS_COMPLETED
        except BaseException as e:
            self.writer.write_status(STATUS_FAILED, step, f"{type(e).__name__}: {e}")
            raise
        finally:
            if bar is not None:
                bar.close()
