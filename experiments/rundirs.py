"""Read-only view of run directories (the layout of CONTRACTS.md), for reports and sweeps.

Reads ``config.json``, ``metrics.jsonl``, ``status.json``/``DONE`` (the layout ``agents.runwriter`` writes, whose file
names and metrics parser it shares) and ``samples.json``; imports no training code and no torch, so a report can be
built on a machine with nothing but numpy and matplotlib. Stability thresholds are taken from the logged probe keys
when present, else derived from the saved optimizer config by the probes' own formulas (:mod:`probes.thresholds`,
torch-free): GD 2/η, momentum (heavy ball or Nesterov, with dampening), Adam on the preconditioned Hessian.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from agents.runwriter import CONFIG, DONE, METRICS, STATUS, read_metrics  # the format only: no torch
from probes.thresholds import adam_threshold, momentum_threshold


@dataclass
class Run:
    path: Path
    config: dict  # the "config" entry of config.json (asdict of the run's config; Cohen's runs: their own fields)
    meta: dict  # the rest of config.json: git_hash, argv, resumed
    status: dict  # status.json ({} if missing)
    records: list[dict] = field(repr=False)  # metrics.jsonl, one dict per logged step
    samples: list[dict] | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def done(self) -> bool:
        return (self.path / "DONE").exists()

    def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of every record that logged ``key`` with a finite number."""
        pts = [
            (r["step"], float(r[key]))
            for r in self.records
            if isinstance(r.get(key), (int, float)) and "step" in r and math.isfinite(float(r[key]))
        ]
        if not pts:
            return np.zeros(0), np.zeros(0)
        steps, values = zip(*sorted(pts))
        return np.asarray(steps, dtype=float), np.asarray(values, dtype=float)

    def has(self, key: str) -> bool:
        return len(self.series(key)[0]) > 0

    # ---- config accessors (tolerant of configs that are not a RunConfig, e.g. the Cohen validation) ----
    def _get(self, *path, default=None):
        node = self.config
        for k in path:
            if not isinstance(node, dict) or k not in node:
                return default
            node = node[k]
        return node

    @property
    def regime(self) -> str:
        return str(self._get("regime", default="?"))

    @property
    def lora_rank(self) -> int:
        return int(self._get("model", "lora_rank", default=0) or 0)

    @property
    def label(self) -> str:
        """Regime as a researcher names it: sft, lora-r8, rl, rl-lora-r8, or the config's own regime."""
        if self.lora_rank > 0:
            return f"lora-r{self.lora_rank}" if self.regime == "sft" else f"{self.regime}-lora-r{self.lora_rank}"
        return self.regime

    @property
    def optimizer(self) -> str:
        return str(self._get("optim", "name", default="sgd"))

    @property
    def full_batch(self) -> bool:
        return bool(self._get("train", "full_batch", default=False))

    @property
    def lr(self) -> float:
        lr = self._get("optim", "lr", default=self._get("lr"))  # Cohen configs keep lr at the top level
        if lr is None:
            _, v = self.series("train/lr")
            return float(v[0]) if len(v) else float("nan")
        return float(lr)

    @property
    def momentum(self) -> float:
        if self.optimizer != "sgd":
            return 0.0
        return float(self._get("optim", "momentum", default=0.0) or 0.0)

    @property
    def nesterov(self) -> bool:
        return self.optimizer == "sgd" and bool(self._get("optim", "nesterov", default=False))

    @property
    def dampening(self) -> float:
        """SGD dampening τ (OptimConfig leaves it at torch's default 0; a config that sets it is read)."""
        if self.optimizer != "sgd":
            return 0.0
        return float(self._get("optim", "dampening", default=0.0) or 0.0)

    @property
    def beta1(self) -> float:
        betas = self._get("optim", "betas", default=(0.9, 0.999))
        return float(betas[0])

    @property
    def is_adam(self) -> bool:
        return self.optimizer in ("adam", "adamw")

    def edge(self, key: str = "probe/lambda_max") -> float:
        """η·θ for the sharpness ``key`` (the threshold at η = 1): 2 (GD), 2+2β (heavy-ball momentum β),
        (2+2β)/(1+2β) (Nesterov), (2+2β₁)/(1-β₁) (Adam, on the preconditioned λ_max; the raw λ_max of an Adam run
        is compared with 2/η)."""
        if key == "probe/adam_lambda_max":
            return adam_threshold(1.0, self.beta1)
        return momentum_threshold(1.0, self.momentum, self.dampening, self.nesterov)

    def eta(self, steps: np.ndarray) -> np.ndarray:
        """η in force at ``steps`` (logged train/lr, for schedules; else the configured lr)."""
        lr_steps, lrs = self.series("train/lr")
        if len(lr_steps):
            return np.interp(steps, lr_steps, lrs)
        return np.full(len(steps), self.lr)

    def threshold(self, key: str = "probe/lambda_max") -> tuple[np.ndarray, np.ndarray]:
        """(steps, θ) for the sharpness ``key``: the logged threshold if present, else edge(key)/η."""
        steps, _ = self.series(key)
        if key == "probe/adam_lambda_max":
            logged = "probe/adam_threshold"
        elif self.momentum > 0:
            logged = "probe/momentum_threshold"
        else:
            logged = "probe/two_over_eta"
        ts, tv = self.series(logged)
        if len(ts):
            return ts, tv
        return steps, self.edge(key) / self.eta(steps)

    @property
    def primary_sharpness(self) -> str:
        """The sharpness that the optimizer's stability threshold applies to."""
        if self.is_adam and self.has("probe/adam_lambda_max"):
            return "probe/adam_lambda_max"
        return "probe/lambda_max"


def load_run(path: str | Path) -> Run:
    """The run in ``path``, as ``agents.runwriter.RunWriter`` wrote it (every kind of run uses that writer)."""
    path = Path(path)
    cfg_file = path / CONFIG
    if not cfg_file.exists():
        raise FileNotFoundError(f"{path} is not a run directory (no config.json)")
    raw = json.loads(cfg_file.read_text())
    meta = {k: v for k, v in raw.items() if k != "config"}
    status = {}
    for f in (path / STATUS, path / DONE):  # DONE holds status.json's text: a fallback when status.json is torn
        if f.exists():
            try:
                status = json.loads(f.read_text() or "{}")
                break
            except json.JSONDecodeError:
                continue
    samples = None
    if (path / "samples.json").exists():
        # {"base_step", "final_step", "rows": [{"prompt", "answer", "base", "final", ...}]} (agents.trainer)
        rows = json.loads((path / "samples.json").read_text()).get("rows")
        samples = [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else None
    return Run(path, raw["config"], meta, status, read_metrics(path), samples)


def is_run_dir(path: Path) -> bool:
    """A run dir holds config.json plus metrics.jsonl or status.json (a saved HF model holds config.json only)."""
    return (path / CONFIG).is_file() and ((path / METRICS).is_file() or (path / STATUS).is_file())


def find_runs(paths) -> list[Run]:
    """Every run directory at or below ``paths``, sorted by path."""
    found: dict[Path, None] = {}
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"{p} does not exist")
        if is_run_dir(p):
            found[p.resolve()] = None
        else:
            for c in sorted(p.rglob("config.json")):
                if "checkpoints" not in c.relative_to(p).parts and is_run_dir(c.parent):
                    found[c.parent.resolve()] = None
    return [load_run(p) for p in sorted(found)]
