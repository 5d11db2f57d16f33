"""``ProbeConfig``: which probes run when, and the tolerances of each, grouped by the probe they configure.

The fields stay flat, one level under ``probe``: their names are the CLI flags (``--probe.batch-rse``), the keys of
``config.json`` that resume and sweeps compare (``probe.every``), and the keyword arguments of every sweep.
``probes.registry`` says which cadence field schedules each probe kind.
"""
from __future__ import annotations

from dataclasses import dataclass

from .blocks import DEFAULT_BLOCK_PATTERNS
from .eigs import STOPS
from .hvp import MODES
from .sharpness import ESTIMATORS

__all__ = ["ProbeConfig", "config_errors", "KNOBS"]


@dataclass(frozen=True)
class ProbeConfig:
    """Probe cadences (in optimizer steps; 0 = off) and tolerances. ``every=0`` disables probing altogether.

    The defaults give a point every 10 steps (critical sharpness on the first 16 probe examples) and the λ_max
    family every 500. Measured share of wall time in 1000-step default runs (experiments/bench/probe_overhead.py
    --defaults cli, one CPU thread beside another job): SFT 8.3 % and 8.2 %, LoRA 8.4 % and 8.4 % (critical
    sharpness 18.1–19.6 s of it, 5.5 passes a call; with the search of before, rtol 0.1 and halving down to its
    budget, 6.7–7.3 passes: SFT 9.3 % and 9.7 %, LoRA 9.8–10.3 %).
    Per call, in training steps of that run (AdamW, batch 64, 64-example probe set, embedded model, one CPU thread;
    experiments/bench/scale.py and the runs' ``probe/<kind>_seconds``):
    - ``critical_every`` = 10 on ``critical_chunks`` = 1 chunk: 5.5 forward passes of 16 examples a call (rtol
      0.15; 4 when the update is uphill for those examples, 37 % of a LoRA run's calls; ηc moves ×1.7–2.4 between
      calls with minibatch noise, so warm starts rarely save a pass) ≈ 0.4–0.5 steps → 4–5 %;
    - ``every`` = 500: the probe-set graph (≈ 2.3) + update sharpness (1 HVP ≈ 1.4) + λ_max (≈ 6.6 warm, 18 cold) +
      the Adam λ_max (≈ 11.5) ≈ 24 warm → ≈ 5 % (the cold step-0 solve adds ≈ 2 % to a 1000-step run); the current
      batch's λ_max (``batch_lambda_max``, ≈ 9) and step sharpness (≈ 3.4, a graph of the batch) are off;
    - ``alignment_every`` = 500, at the solve steps, where it is free (the stored vector and the probe-set gradient);
      ``rayleigh_every`` = 0: between solves it costs one graph + 1 HVP ≈ 3.4 steps (1.5–2.2 s of a default run
      at every 250), and at a solve step it is λ_max itself;
    - ``batch_sharpness_every`` = 0 (off): 8–16 fresh batches at ≈ 3.7 steps each ≈ 30 steps per call; it is the
      EoSS quantity of minibatch SGD: turn it on for SGD runs (the study samples it every 75 steps).
    The cost in steps grows as the batch shrinks: at the user's batch 16 (4 batches = the probe set) the same
    defaults measured 13.6–15.6 % (critical sharpness then ≈ 0.9 steps a call at its older rtol 0.05 and 20 passes).
    """
    # ---- λ_max and what shares its operator (cadence ``every``) ----

    #: λ_max of the fixed probe set, the stability thresholds, update sharpness, the Adam-preconditioned λ_max (and,
    #: when switched on, the current batch's λ_max and step sharpness) every this many steps; 0 turns every probe off.
    every: int = 500
    #: examples in the fixed probe set of probe/lambda_max under minibatch training, drawn once from the training
    #: tasks with ``seed`` (the whole training set when it is smaller); full-batch GD probes the whole training set
    #: and RLVR the rollout buffer whatever this is; 0 = probe the current minibatch (lambda_max = lambda_max_batch).
    probe_set_size: int = 64
    #: also λ_max of the current batch (probe/lambda_max_batch) when the probe set is not the batch: one more solve,
    #: on the batch's graph (≈ 9 training steps warm on the embedded model); when the probe set is the batch,
    #: lambda_max_batch = lambda_max at no cost whatever this is.
    batch_lambda_max: bool = False
    #: examples per chunk of the fixed probe set, the unit of every probe-set HVP's graph: with mode="cache" the
    #: graphs of all chunks stay alive (memory ∝ probe_set_size), with "recompute" one chunk's at a time (memory ∝
    #: chunk_size); 0 = the training micro-batch. Independent of training, so a probe can fit where a micro-batch
    #: does (SFT/LoRA; RLVR's probe set is its rollout buffer, chunked as it trains).
    chunk_size: int = 0
    #: eigenvalues per solve (probe/lambda_max, probe/lambda_2, ...).
    k: int = 1
    #: eigen-solve tolerance relative to max|θ|, on the λ error (stop="eigenvalue") or on the residual
    #: with stop="residual".
    tol: float = 1e-3
    #: eigen-solve stop rule (probes.eigs). "eigenvalue": every λ estimated within tol (Kato–Temple estimate, then
    #: confirmed by one more iteration); fewer HVPs, not a guarantee. "residual": ‖Hx − θx‖ ≤ tol·max|θ|, which
    #: bounds |λ − θ| for sure and converges the eigenvector too.
    stop: str = "eigenvalue"
    #: stop rule of a cold solve (no stored eigenvector: the first probe, or warm_start off); "" = ``stop``. The
    #: eigenvalue stop's gap estimate comes from the subspace, which a cold start has not explored: on close top
    #: pairs and random-matrix edges it stopped inside the top cluster in 19 of 200 cold solves (errors up to
    #: 0.1·max|λ|), none of 400 warm ones; the residual rule in 2 (error ≤ the 1 % gap) for 1.0–1.6× the HVPs
    #: (experiments/bench/stop_rules.py). Warm solves, most of a run, keep ``stop``.
    cold_stop: str = "residual"
    #: HVP budget per eigen-solve; a solve that hits it logs probe/converged = 0.
    max_hvps: int = 40
    #: start each solve from the eigenvectors of the previous probe (checkpointed with the run).
    warm_start: bool = True
    #: g_BᵀH_Bg_B/g_Bᵀg_B for the current batch's gradient g_B (EoSS step sharpness: a graph of the batch + 1 HVP
    #: ≈ 3.4 training steps; one sample of what batch sharpness averages).
    step_sharpness: bool = False
    #: ΔθᵀHΔθ/ΔθᵀΔθ for the last optimizer update Δθ (1 HVP; needs ProbeContext.update).
    update_sharpness: bool = True
    #: λ_max of the Adam-preconditioned Hessian P^-½HP^-½ when the optimizer is Adam-family (one more solve).
    adam: bool = True

    # ---- batch sharpness and GNI over fresh minibatches (cadence ``batch_sharpness_every``) ----

    #: batch sharpness every this many steps (needs ProbeContext.sample_batch); 0 = off.
    batch_sharpness_every: int = 0
    #: minibatches drawn before the stop rule may end the estimate.
    batch_min_samples: int = 8
    #: most minibatches drawn per estimate.
    batch_max_samples: int = 16
    #: stop once the relative standard error of ``batch_estimator`` is at most this.
    batch_rse: float = 0.05
    #: estimator the stop rule watches: ratio_of_means E[gᵀH_Bg]/E[‖g‖²] or mean_of_ratios E[gᵀH_Bg/‖g‖²] (both
    #: are logged).
    batch_estimator: str = "ratio_of_means"
    #: also the gradient-noise interaction E[g_BᵀHg_B]/‖∇L‖² (+1 full-batch HVP per draw, ≈+40 % of its cost).
    gni: bool = False
    #: level of the logged Student-t confidence intervals.
    confidence: float = 0.95

    # ---- Hutchinson trace (cadence ``trace_every``) ----

    #: trace of H and per-block traces every this many steps; 0 = off.
    trace_every: int = 0
    #: most Rademacher probes (1 HVP each) per trace estimate.
    trace_max_probes: int = 32
    #: stop once the trace's relative standard error is at most this (after min(8, trace_max_probes) probes).
    trace_rse: float = 0.05

    # ---- per-block λ_max (cadence ``blocks_every``) ----

    #: λ_max of each diagonal Hessian block H_bb every this many steps (one solve per block); 0 = off.
    blocks_every: int = 0
    #: (block, regex on the parameter name) pairs, first match wins; with ProbeContext.model set, fused Q/K/V
    #: matrices (block attn_qkv) are split into attn_qk / attn_vo.
    block_patterns: tuple[tuple[str, str], ...] = DEFAULT_BLOCK_PATTERNS

    # ---- cheap traces between solves, on the probe set (each its own cadence) ----

    #: vᵀHv/vᵀv on the stored top eigenvector v of the last λ_max solve (1 HVP) every this many steps; 0 = off.
    rayleigh_every: int = 0
    #: |cos| between that stored top eigenvector and the probe-set gradient (0 HVPs) every this many steps; 0 = off.
    alignment_every: int = 500
    #: critical sharpness 2/ηc along the last update (forward passes only, ≈5.5) every this many steps; 0 = off.
    critical_every: int = 10
    #: chunks of the probe set (its first ones, ``chunk_size`` examples each: 16 at the defaults) whose loss the
    #: critical-sharpness line search evaluates, so a point every few steps stays cheap; 0 = the whole probe set.
    #: ηc is then the critical step of that subset's loss along the update, an estimate of the probe set's.
    critical_chunks: int = 1
    #: relative width of the final ηc bracket of the critical-sharpness line search: ηc is known to ±15 % at the
    #: default, finer than its own change between calls (median ×1.7–2.4 over 10 steps in the LM SFT runs). Replayed
    #: on the ηc trajectories of the 9 constant-LR SFT runs of ``sweep adaptive_lr``, the search takes 5.5 passes a
    #: call at 0.15 against 6.2 at 0.1: after a factor-2 bracket, bisection needs one step fewer about half the time.
    critical_rtol: float = 0.15
    #: most forward passes per critical-sharpness line search (NaN when it has not bracketed ηc by then).
    critical_max_forwards: int = 10

    # ---- shared by every probe ----

    #: HVP mode (probes.hvp): cache (graph kept, fastest), recompute (least memory) or fd (finite differences,
    #: for kernels without double backward). Measured on the embedded model (experiments/bench/scale.py): a probe
    #: call's peak memory is 6–12× a training step's with cache, 1.7–2.8× with recompute, at 1.3–1.5× its time.
    mode: str = "cache"
    #: bound in MB on what cache mode keeps per probe call (probes.hvp: each chunk's saved graph, counted at the
    #: build, and its gradient): chunks are cached in order while they fit, the rest recomputed at each HVP, with
    #: bit-for-bit the same results; ``probe/cached_chunks`` says how many fit. 0 = no bound. Measured at the SFT
    #: defaults (chunks of 16 examples): the embedded model's chunks take 61 MB each, so its probe set (5 chunks)
    #: is cached whole; a Pythia-70m-shaped model's (fused head, 1024) 644 MB each (375 saved + 269 gradient), so at
    #: 512 it is recomputed (cached whole, its default call needed +8.1 GB; recomputed, +4.6 GB: README).
    cache_mb: float = 512.0
    #: probe in eval mode (dropout off, deterministic); every module's train/eval flag is restored after.
    eval_mode: bool = True
    #: random seed of the probes' private generator, drawn anew from (seed, step) at every probe.
    seed: int = 0

    def stop_rule(self, warm: bool) -> str:
        """The eigen-solve stop rule: ``stop`` for a warm solve, ``cold_stop`` (``stop`` where it is "") cold."""
        return self.stop if warm or not self.cold_stop else self.cold_stop

    def __post_init__(self):
        errors = config_errors(self)
        if errors:
            raise ValueError("ProbeConfig: " + "; ".join(errors))


# Knobs read by some probe kinds only -> the cadence fields of those kinds: with all of them 0 the knob changes
# nothing (experiments.run.comparable_config leaves it out of run comparisons).
KNOBS = {**{k: ("batch_sharpness_every",) for k in ("batch_min_samples", "batch_max_samples", "batch_rse",
                                                    "batch_estimator", "gni", "confidence")},
         "trace_max_probes": ("trace_every",), "trace_rse": ("trace_every",),
         "block_patterns": ("trace_every", "blocks_every"),   # per-block traces and per-block λ_max
         **{k: ("critical_every",) for k in ("critical_chunks", "critical_rtol", "critical_max_forwards")}}


def config_errors(cfg: ProbeConfig) -> list[str]:
    """Every problem with ``cfg`` (empty when valid); ``ProbeConfig`` raises them at construction."""
    errors = [f"{name} must be >= 0, got {getattr(cfg, name)}"
              for name in ("every", "batch_sharpness_every", "trace_every", "blocks_every", "k", "max_hvps",
                           "probe_set_size", "chunk_size", "rayleigh_every", "alignment_every", "critical_every",
                           "critical_chunks")
              if getattr(cfg, name) < 0]
    if not cfg.cache_mb >= 0:
        errors.append(f"cache_mb must be >= 0 (0 = no bound), got {cfg.cache_mb}")
    if cfg.mode not in MODES:
        errors.append(f"mode must be one of {MODES}, got {cfg.mode!r}")
    if cfg.batch_estimator not in ESTIMATORS:
        errors.append(f"batch_estimator must be one of {tuple(ESTIMATORS)}, got {cfg.batch_estimator!r}")
    if not 0 < cfg.confidence < 1:
        errors.append(f"need 0 < confidence < 1, got {cfg.confidence}")
    if cfg.tol <= 0:  # NaN/inf are left to the run config's finiteness check, which names the flag
        errors.append(f"need tol > 0, got {cfg.tol}")
    if cfg.stop not in STOPS:
        errors.append(f"stop must be one of {STOPS}, got {cfg.stop!r}")
    if cfg.cold_stop not in ("", *STOPS):
        errors.append(f"cold_stop must be '' (= stop) or one of {STOPS}, got {cfg.cold_stop!r}")
    if cfg.every > 0 and (cfg.k < 1 or cfg.max_hvps < cfg.k):
        errors.append(f"need k >= 1 and max_hvps >= k, got k={cfg.k}, max_hvps={cfg.max_hvps}")
    if not 0 < cfg.critical_rtol < 1:
        errors.append(f"need 0 < critical_rtol < 1, got {cfg.critical_rtol}")
    if cfg.critical_max_forwards < 3:
        errors.append(f"need critical_max_forwards >= 3, got {cfg.critical_max_forwards}")
    if not 1 <= cfg.batch_min_samples <= cfg.batch_max_samples:
        errors.append(f"need 1 <= batch_min_samples <= batch_max_samples, got {cfg.batch_min_samples}, "
                      f"{cfg.batch_max_samples}")
    return errors
