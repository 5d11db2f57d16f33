"""Validation against the literature: Cohen et al. 2021 (ICLR), "Gradient Descent on Neural Networks Typically
Occurs at the Edge of Stability", headline result at laptop scale.

Setup (their fc-tanh / MSE experiment, scaled down): full-batch gradient descent θ ← θ - η∇L(θ) on a tanh MLP
(2 hidden layers) with the square loss L(θ) = (1/2n) Σ_i ||f_θ(x_i) - e_{y_i}||² on n examples of sklearn's
bundled 8×8 digits (standardised pixels, one-hot targets; no download) or, with ``dataset="synthetic"``, a
seeded Gaussian-mixture classification set. Expected: λ_max(∇²L) rises (progressive sharpening) until
λ_max ≈ 2/η, then hovers there while L keeps decreasing, non-monotonically.

λ_max is measured with the project's own probes (``probes.Prober``: warm-started LOBPCG on exact HVPs, here
≈ 2–6 HVPs per solve after the first), so this experiment also validates the probe stack end to end. Output is a
run directory written by ``agents.runwriter.RunWriter`` like every other run's, so the report reads it unchanged.
Computation in float64: at EoS, λ_max differences of 1% matter and the network is small (~9k parameters).

With ``schedule="eos"`` (or ``"cdat"``) the same GD runs under an LR controller of agents.eos_lr that starts from
``lr`` and then sets η itself (knobs in ``control``); it acts after the gradient and before the step, so the row
of step t (``train/lr``, ``probe/two_over_eta``) holds the η of that step.

    python -m experiments.cohen2021 --lr 0.3
    python -m experiments.cohen2021 --lr 0.1 --schedule eos --control.target 0.8
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import tyro

from agents.eos_lr import CONTROLLED, ControlConfig, build_controller, control_errors, controller_tag
from agents.optim import OptimConfig, lr_multiplier
from agents.runwriter import DONE, STATUS_COMPLETED, STATUS_DIVERGED, STATUS_RUNNING, RunWriter
from probes import ProbeConfig, ProbeContext, Prober


@dataclass(frozen=True)
class CohenConfig:
    lr: float = 0.3  # η of full-batch GD; 2/η is the predicted λ_max plateau
    steps: int = 500  # GD steps
    n_train: int = 250  # examples (full batch)
    width: int = 64  # hidden width of both tanh layers
    dataset: str = "digits"  # "digits" (sklearn bundled, 64 features, 10 classes) | "synthetic"
    eig_every: int = 20  # λ_max every this many steps
    eig_tol: float = 1e-3  # LOBPCG relative residual of the λ_max solve
    seed: int = 0
    out_dir: str = "runs/cohen2021"
    name: str | None = None  # default: gd-<dataset>-lr<η>-s<seed> (gd-<dataset>-eos<ρ>-lr<η>-... with a controller)
    schedule: str = "constant"  # constant / linear / cosine (agents.optim), or eos / cdat: a controller from lr on
    warmup_steps: int = 0  # linear warm-up before linear / cosine decay (fixed schedules only)
    control: ControlConfig = field(default_factory=ControlConfig)  # knobs of the eos / cdat controller
    batch: int = 0  # 0: full-batch GD (Cohen et al.); b > 0: minibatch SGD on b examples drawn afresh every step

    @property
    def run_name(self) -> str:
        sched = controller_tag(self.schedule, self.control) if self.schedule in CONTROLLED else (
            "" if self.schedule == "constant" else f"-{self.schedule}")
        if self.warmup_steps:
            sched += f"-w{self.warmup_steps}"
        kind = f"sgd-b{self.batch}" if self.batch else "gd"
        return self.name or f"{kind}-{self.dataset}{sched}-lr{self.lr:g}-s{self.seed}"


def config_errors(cfg: CohenConfig) -> list[str]:
    errors = []
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):
        errors.append(f"lr={cfg.lr} must be a finite number > 0")
    if not cfg.eig_tol > 0:
        errors.append(f"eig_tol={cfg.eig_tol} must be > 0")
    for name in ("steps", "n_train", "width", "eig_every"):
        if getattr(cfg, name) < 1:
            errors.append(f"{name}={getattr(cfg, name)} must be >= 1")
    if not 0 <= cfg.batch <= cfg.n_train:
        errors.append(f"batch={cfg.batch} must be in [0, n_train={cfg.n_train}] (0 = full batch)")
    schedules = ("constant", "linear", "cosine", *CONTROLLED)
    if cfg.schedule not in schedules:
        errors.append(f"schedule={cfg.schedule!r} must be one of {schedules}")
    elif cfg.schedule in CONTROLLED:
        errors += control_errors(cfg.control, prefix="control")
        if cfg.warmup_steps:
            errors.append(f"warmup_steps={cfg.warmup_steps} must be 0 with schedule={cfg.schedule!r}")
    if cfg.warmup_steps < 0:
        errors.append(f"warmup_steps={cfg.warmup_steps} must be >= 0")
    if cfg.dataset not in ("digits", "synthetic"):
        errors.append(f"dataset={cfg.dataset!r} must be 'digits' or 'synthetic'")
    elif cfg.dataset == "digits" and cfg.n_train > 1797:
        errors.append(f"n_train={cfg.n_train} exceeds the 1797 digits examples")
    return errors


def load_data(cfg: CohenConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(X [n, d] standardised, Y [n, 10] one-hot), float64, deterministic in cfg.seed."""
    gen = torch.Generator().manual_seed(cfg.seed)
    if cfg.dataset == "digits":
        from sklearn.datasets import load_digits  # bundled, no download; local: sklearn takes seconds to import

        x_all, y_all = load_digits(return_X_y=True)
        idx = torch.randperm(len(y_all), generator=gen)[: cfg.n_train]
        x = torch.as_tensor(x_all, dtype=torch.float64)[idx]
        y = torch.as_tensor(y_all)[idx]
    else:  # 10 Gaussian blobs in 32 dimensions, unit noise around centres of norm ~3
        centres = 3.0 * torch.randn(10, 32, generator=gen, dtype=torch.float64) / math.sqrt(32) * math.sqrt(10)
        y = torch.randint(0, 10, (cfg.n_train,), generator=gen)
        x = centres[y] + torch.randn(cfg.n_train, 32, generator=gen, dtype=torch.float64)
    x = (x - x.mean(0)) / (x.std(0) + 1e-8)  # constant pixels (digits' borders) stay 0
    return x, torch.nn.functional.one_hot(y, 10).to(torch.float64)


def build_mlp(d_in: int, width: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)  # torch's default (Kaiming-uniform) init, as in Cohen et al.'s fc-tanh
    return torch.nn.Sequential(
        torch.nn.Linear(d_in, width), torch.nn.Tanh(), torch.nn.Linear(width, width), torch.nn.Tanh(),
        torch.nn.Linear(width, 10),
    ).to(torch.float64)


def run_cohen(cfg: CohenConfig = CohenConfig()) -> Path:
    """Full-batch GD (or minibatch SGD with ``batch`` > 0) with full-batch λ_max probes; writes and returns the run
    directory (skipped if DONE exists)."""
    errors = config_errors(cfg)
    if errors:
        raise ValueError("; ".join(errors))
    run_dir = Path(cfg.out_dir) / cfg.run_name
    if (run_dir / DONE).exists():
        return run_dir
    x, y = load_data(cfg)
    net = build_mlp(x.shape[1], cfg.width, cfg.seed)
    params = dict(net.named_parameters())
    n = len(x)

    def loss_fn(chunk) -> torch.Tensor:  # chunk losses sum to L(θ): each is normalised by the full n
        xb, yb = chunk
        return 0.5 * ((net(xb) - yb) ** 2).sum() / n

    batches = [(x, y)]
    order = torch.Generator().manual_seed(cfg.seed + 1_000_003)  # minibatch draws: their own stream, seeded

    def batch_loss_fn(chunk) -> torch.Tensor:  # a minibatch's own mean loss, what SGD steps on
        xb, yb = chunk
        return 0.5 * ((net(xb) - yb) ** 2).sum() / len(xb)

    opt = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=0.0)  # plain GD; probes read thresholds from it
    controller = build_controller(opt, cfg.schedule, cfg.control, cfg.seed)  # None for the fixed schedules
    factor = lr_multiplier(OptimConfig(lr=cfg.lr, schedule=cfg.schedule, warmup_steps=cfg.warmup_steps), cfg.steps)
    prober = Prober(ProbeConfig(every=cfg.eig_every, update_sharpness=False, batch_sharpness_every=0, tol=cfg.eig_tol,
                                rayleigh_every=0, alignment_every=0, critical_every=0))   # λ_max only, as validated
    config = {"regime": "sgd-mse" if cfg.batch else "gd-mse", "experiment": "cohen2021", **asdict(cfg),
              "optim": {"name": "sgd", "lr": cfg.lr, "momentum": 0.0, "weight_decay": 0.0,
                        "schedule": cfg.schedule, "warmup_steps": cfg.warmup_steps, "control": asdict(cfg.control)},
              "model": {"name": f"mlp-tanh-{cfg.width}x2", "lora_rank": 0},
              "train": {"steps": cfg.steps, "full_batch": not cfg.batch, "micro_batch": cfg.batch or n,
                        "grad_accum": 1, "seed": cfg.seed},
              "env": {"env_id": cfg.dataset, "n_train": n}}
    writer = RunWriter(run_dir)
    writer.write_config(config)
    writer.replace_rows([])  # an unfinished earlier attempt starts over: the run is cheap and deterministic
    writer.write_status(STATUS_RUNNING, 0)
    t0, probe_seconds = time.perf_counter(), 0.0
    for step in range(cfg.steps + 1):  # metrics at θ_step, before the step's update
        opt.zero_grad(set_to_none=True)
        # train/loss is the full-batch loss L(θ_step) in both modes (what the arms are compared on); SGD steps on
        # the gradient of a fresh minibatch's loss, and its controller sees that minibatch and its loss
        with torch.set_grad_enabled(not cfg.batch):
            out = net(x)
            loss = 0.5 * ((out - y) ** 2).sum() / n  # = loss_fn((x, y))
        if cfg.batch:
            idx = torch.randperm(n, generator=order)[:cfg.batch]
            step_batches, step_loss_fn = [(x[idx], y[idx])], batch_loss_fn
            step_loss = batch_loss_fn(step_batches[0])
        else:
            step_batches, step_loss_fn, step_loss = batches, loss_fn, loss
        step_loss.backward()
        acc = (out.detach().argmax(1) == y.argmax(1)).double().mean().item()
        grad_norm = torch.sqrt(sum((p.grad**2).sum() for p in net.parameters())).item()
        control = {}
        if controller is None:
            opt.param_groups[0]["lr"] = cfg.lr * factor(step)
        elif step < cfg.steps and math.isfinite(loss.item()) and loss.item() <= 1e3:
            control = controller(ProbeContext(params=params, loss_fn=step_loss_fn, batches=step_batches,
                                              lr=opt.param_groups[0]["lr"], step=step, optimizer=opt, model=net),
                                 step_loss.item())
        lr = float(opt.param_groups[0]["lr"])  # η of this step (set by the controller, if any)
        rec = {"step": step, "train/loss": loss.item(), "train/lr": lr, "train/grad_norm": grad_norm,
               "eval/accuracy": acc, **control}
        if cfg.batch:
            rec["train/batch_loss"] = step_loss.item()
        # wall-clock of training so far, the controller's estimates included and the diagnostic probes not
        rec["train/seconds"] = time.perf_counter() - t0 - probe_seconds
        if prober.due(step):
            rec.update(prober(ProbeContext(params=params, loss_fn=loss_fn, batches=batches, lr=lr,
                                           step=step, optimizer=opt, model=net)))
            probe_seconds += rec["probe/seconds"]
        writer.append(rec)
        if not math.isfinite(loss.item()) or loss.item() > 1e3:
            writer.finish(STATUS_DIVERGED, step, f"loss {loss.item():.3g}")
            return run_dir
        if step < cfg.steps:
            opt.step()
    writer.finish(STATUS_COMPLETED, cfg.steps)
    return run_dir


if __name__ == "__main__":
    print(run_cohen(tyro.cli(CohenConfig)))
