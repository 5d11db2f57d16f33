"""Validation against the literature: Andreyev & Beneventano 2024 (arXiv 2412.20553), "Edge of Stochastic
Stability", headline result at laptop scale.

Setup: minibatch SGD θ ← θ − η∇L_B(θ) (no momentum) with small batches B of b examples drawn without
replacement from a fixed training set, on the tanh MLP and square loss of experiments/cohen2021.py (sklearn's
bundled digits, or the seeded synthetic set). Expected: the *batch sharpness*
    BS(θ) = E_B[g_Bᵀ H_B g_B] / E_B[‖g_B‖²],   g_B = ∇L_B(θ), H_B = ∇²L_B(θ)
(the curvature of each minibatch's own loss along its own step) rises to 2/η and hovers there, while the
full-batch λ_max(∇²L) stabilises well below 2/η: SGD is at the edge of stability of the minibatch steps, not of
the full-batch loss that GD's EoS (Cohen et al. 2021) is about.

Both are measured with the project's own probes (probes.sharpness.batch_sharpness: Monte Carlo over fresh
minibatches, ratio of means with a delta-method CI, and the mean of ratios; probes.sharpness.lambda_max:
warm-started LOBPCG on exact HVPs of the whole training set). Output is a run directory in the CONTRACTS.md layout,
readable by the report. Float64, as in cohen2021.py.

    python -m experiments.eoss --lr 0.45 --batch 4
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from agents.runwriter import STATUS_COMPLETED, STATUS_DIVERGED, STATUS_RUNNING, RunWriter
from experiments.cohen2021 import CohenConfig, build_mlp, load_data
from probes.sharpness import batch_sharpness, lambda_max
from probes.thresholds import stability_thresholds


@dataclass(frozen=True)
class EossConfig:
    lr: float = 0.45  # η of SGD; 2/η is the predicted batch-sharpness plateau
    batch: int = 4  # examples per SGD step (small: the EoSS gap between batch sharpness and λ_max grows as b shrinks)
    steps: int = 5000  # SGD steps
    n_train: int = 500  # training-set size (the full-batch λ_max is on all of it)
    width: int = 64  # hidden width of both tanh layers
    dataset: str = "digits"  # "digits" (sklearn bundled) | "synthetic"
    probe_every: int = 500  # λ_max and batch sharpness every this many steps
    log_every: int = 10  # full-batch loss / accuracy every this many steps
    eig_tol: float = 1e-3  # LOBPCG relative residual of the λ_max solve
    bs_min_samples: int = 20  # minibatches per batch-sharpness estimate: at least ...
    bs_max_samples: int = 40  # ... and at most (the stop rule is 3% relative standard error)
    seed: int = 0
    out_dir: str = "runs/eoss"
    name: str | None = None  # default: sgd-b<batch>-<dataset>-lr<η>-s<seed>

    @property
    def run_name(self) -> str:
        return self.name or f"sgd-b{self.batch}-{self.dataset}-lr{self.lr:g}-s{self.seed}"


def config_errors(cfg: EossConfig) -> list[str]:
    errors = []
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):
        errors.append(f"lr={cfg.lr} must be a finite number > 0")
    if not cfg.eig_tol > 0:
        errors.append(f"eig_tol={cfg.eig_tol} must be > 0")
    for name in ("batch", "steps", "n_train", "width", "probe_every", "log_every", "bs_min_samples"):
        if getattr(cfg, name) < 1:
            errors.append(f"{name}={getattr(cfg, name)} must be >= 1")
    if cfg.bs_max_samples < cfg.bs_min_samples:
        errors.append(f"bs_max_samples={cfg.bs_max_samples} must be >= bs_min_samples={cfg.bs_min_samples}")
    if cfg.batch > cfg.n_train:
        errors.append(f"batch={cfg.batch} exceeds n_train={cfg.n_train}")
    if cfg.dataset not in ("digits", "synthetic"):
        errors.append(f"dataset={cfg.dataset!r} must be 'digits' or 'synthetic'")
    elif cfg.dataset == "digits" and cfg.n_train > 1797:
        errors.append(f"n_train={cfg.n_train} exceeds the 1797 digits examples")
    return errors


def run_eoss(cfg: EossConfig = EossConfig()) -> Path:
    """Minibatch SGD with λ_max and batch-sharpness probes; writes and returns the run dir (skipped if DONE)."""
    errors = config_errors(cfg)
    if errors:
        raise ValueError("; ".join(errors))
    run_dir = Path(cfg.out_dir) / cfg.run_name
    if (run_dir / "DONE").exists():
        return run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    x, y = load_data(CohenConfig(dataset=cfg.dataset, n_train=cfg.n_train, seed=cfg.seed))
    net = build_mlp(x.shape[1], cfg.width, cfg.seed)
    params = dict(net.named_parameters())
    n = len(x)

    def loss_fn(chunk) -> torch.Tensor:  # chunk = (x, y, N): its loss is normalised by the N of its whole batch
        xb, yb, denom = chunk
        return 0.5 * ((net(xb) - yb) ** 2).sum() / denom

    full = [(x, y, n)]  # the probe set of λ_max: the whole training set

    def sample_batch(gen: torch.Generator):  # a fresh training minibatch, drawn like the training ones
        idx = torch.randperm(n, generator=gen)[: cfg.batch]
        return [(x[idx], y[idx], cfg.batch)]

    opt = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=0.0)
    train_gen = torch.Generator().manual_seed(cfg.seed + 1)  # data order; the probes draw from their own generators
    config = {"regime": "sgd-mse", "experiment": "eoss", **asdict(cfg),
              "optim": {"name": "sgd", "lr": cfg.lr, "momentum": 0.0, "weight_decay": 0.0},
              "model": {"name": f"mlp-tanh-{cfg.width}x2", "lora_rank": 0},
              "train": {"steps": cfg.steps, "batch": cfg.batch, "seed": cfg.seed},
              "env": {"env_id": cfg.dataset, "n_train": n}}
    writer = RunWriter(run_dir)
    writer.write_config(config)
    writer.replace_rows([])  # an unfinished earlier attempt starts over: the run is cheap and deterministic
    writer.write_status(STATUS_RUNNING, 0)
    warm = None
    for step in range(cfg.steps + 1):  # metrics at θ_step, before the step's update
        rec = None
        if step % cfg.log_every == 0 or step % cfg.probe_every == 0 or step == cfg.steps:
            with torch.no_grad():
                out = net(x)
                loss = (0.5 * ((out - y) ** 2).sum() / n).item()
            acc = (out.argmax(1) == y.argmax(1)).double().mean().item()
            rec = {"step": step, "train/loss": loss, "train/lr": cfg.lr, "eval/accuracy": acc}
            if not math.isfinite(loss) or loss > 1e3:
                writer.append(rec)
                writer.finish(STATUS_DIVERGED, step, f"loss {loss:.3g}")
                return run_dir
        if step % cfg.probe_every == 0:
            rec.update(_probe(cfg, step, params, loss_fn, full, sample_batch, opt, net, warm))
            warm = rec.pop("_warm")
        if rec is not None:
            writer.append(rec)
        if step == cfg.steps:
            break
        idx = torch.randperm(n, generator=train_gen)[: cfg.batch]
        opt.zero_grad(set_to_none=True)
        loss_fn((x[idx], y[idx], cfg.batch)).backward()
        opt.step()
    writer.finish(STATUS_COMPLETED, cfg.steps)
    return run_dir


def _probe(cfg, step, params, loss_fn, full, sample_batch, opt, net, warm) -> dict:
    """probe/lambda_max (full training set), probe/two_over_eta and probe/batch_sharpness (+ CI, mean of ratios)."""
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    eig = lambda_max(params, loss_fn, full, tol=cfg.eig_tol, init=warm, model=net, generator=gen)
    bs = batch_sharpness(params, loss_fn, sample_batch, gen, min_samples=cfg.bs_min_samples,
                         max_samples=cfg.bs_max_samples, rse=0.03, model=net)
    out = {f"probe/{k}": v for k, v in stability_thresholds(opt, cfg.lr).items()}
    out.update({"probe/lambda_max": float(eig.values[0]), "probe/converged": float(eig.converged),
                "probe/batch_sharpness": bs.ratio_of_means, "probe/batch_sharpness_ci_lo": bs.rom_ci[0],
                "probe/batch_sharpness_ci_hi": bs.rom_ci[1], "probe/batch_sharpness_n": float(bs.n),
                "probe/batch_sharpness_mor": bs.mean_of_ratios, "probe/batch_sharpness_mor_ci_lo": bs.mor_ci[0],
                "probe/batch_sharpness_mor_ci_hi": bs.mor_ci[1], "probe/hvps": float(eig.hvps + bs.hvps),
                "probe/seconds": time.perf_counter() - t0, "_warm": eig.vectors})
    return out


@dataclass(frozen=True)
class EossCommand:
    """Edge of Stochastic Stability validation: minibatch SGD on a tanh MLP (MSE, sklearn digits); one run per η."""

    lrs: tuple[float, ...] = (0.45,)
    batch: int = 4
    steps: int = 5000
    out_dir: Path = Path("runs/eoss")

    def configs(self) -> list[EossConfig]:
        return [EossConfig(lr=lr, batch=self.batch, steps=self.steps, out_dir=str(self.out_dir)) for lr in self.lrs]


if __name__ == "__main__":
    import tyro

    print(run_eoss(tyro.cli(EossConfig)))
