"""What probes cost as the model grows: time and peak memory of a training step and of each probe, in training-step
units, and the probe share of wall time at the default cadence, for the embedded model and random-init GPT-NeoX
models at 4×256 and 6×512 (and, with ``--models 70m``, the Pythia-70m shape: 6×512, vocab 50304, 70.4M weights;
``160m``, Pythia-160m's: 12×768, vocab 50304, for a GPU).

Each model trains in a fresh spawned process (glibc's mmap threshold pinned, so freed tensors leave the resident set
and the trainer's ``memory/*`` peaks are measured above a true baseline: probes.memory) through experiments.run at
``eoslab sft``'s defaults (AdamW 1e-3, effective batch 64 = 16 × 4, 50 warm-up steps then cosine decay over the run,
the 64-example probe set, every probe setting at its default) but for the run's length, 2·``gap`` steps (the warm
call sits mid-schedule, as the default cadence's calls do: at ``--gap 500`` the run is ``eoslab sft``'s 1000 steps
and the call at step 500 is the default one), and the cadences, shortened so that it holds every kind of call:
- step 0: every kind, cold (λ_max of the probe set and of the batch, step and update sharpness, the Adam λ_max, batch
  sharpness, Rayleigh, alignment, critical sharpness);
- step ``gap``/2: the cheap traces (Rayleigh, alignment, critical sharpness) alone;
- step ``gap``: the λ_max family again, warm-started from step 0's eigenvectors, and critical sharpness (and the
  cheap traces again at 3·``gap``/2).
A warm solve fewer steps after the last than the default 500 (``every``) is easier than the default one: below
``--gap 500`` the warm costs here are a lower bound, the cold ones (at random init) an upper bound. Random-init models
get no replay (the embedded model replays its pre-training text, as its default does: its step costs ≈ 20 % more).

Printed per model: a training step (median ``time/step_s``, seconds; peak ``memory/step_mb`` above the step's entry,
and the absolute one, ``memory/step_peak_mb``: the process's resident set on a CPU, allocated tensor bytes on CUDA),
per probe kind its seconds and cost in training steps (cold at step 0; warm), each probe call's peak memory above
its entry and over the training step's (goal ≤ 2×), and its absolute peak and that over the training step's absolute
peak, and the probe share of wall time at the default cadence, Σ_kind cost_kind / cadence_kind over 1 + that sum
(per training step), warm λ_max and critical costs, batch sharpness at its step-0 cost. Goals (issue 15):
share ≤ 10 %, warm λ_max ≤ 10 steps, cold ≤ 20.

Run: ``python experiments/bench/scale.py [--models embedded 4x256 6x512] [--gap 10] [--mode recompute]
[--chunk-size 4] [--memory-only] [--head-chunk 256] [--autocast bfloat16]``; the model runs where ``model.device``
"auto" puts it (CUDA when present: ``make gpu-check``). 6×512 takes tens of minutes on this 2-core CPU, ``70m``
hours (``--gap 2 --memory-only``: the memory peaks of every call in much less).
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere

SHAPES = {"4x256": (4, 256, None), "6x512": (6, 512, None), "70m": (6, 512, 50304),  # layers, hidden, vocab
          "160m": (12, 768, 50304)}
EVERY = ("thresholds", "step_sharpness", "update_sharpness", "lambda_max", "lambda_max_batch", "adam_lambda_max")
CADENCE = {"batch_sharpness": "batch_sharpness_every", "rayleigh": "rayleigh_every",
           "alignment": "alignment_every", "critical_sharpness": "critical_every", **{k: "every" for k in EVERY}}


def build_model(shape: str, out: Path) -> str:
    """A random-init GPT-NeoX of ``shape`` with the embedded model's tokenizer (digit tokens), saved to ``out``."""
    from transformers import AutoTokenizer

    from agents.embedded import embedded_model_path, init_model

    if shape == "embedded":
        return "embedded"
    layers, hidden, vocab = SHAPES[shape]
    tok = AutoTokenizer.from_pretrained(embedded_model_path())
    model = init_model(tok, n_layer=layers, hidden=hidden, heads=max(4, hidden // 64), context=256, seed=0)
    if vocab:
        model.resize_token_embeddings(vocab)  # Pythia's vocab: the LM head and its logits at full width
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def probed_run(model: str, gap: int, out_dir: str, mode: str = "cache", chunk: int = 0,
               memory_only: bool = False, head_chunk: int = 0, autocast: str = "") -> tuple[int, list[dict]]:
    """One short SFT run at the defaults with the shortened cadences (module docstring); (weights, metric rows)."""
    from probes.memory import pin_mmap_threshold

    pin_mmap_threshold()
    import torch

    from agents.trainer import read_metrics
    from experiments.run import default_config, replace, run

    torch.set_num_threads(1)
    cfg = replace(default_config("sft"), model={"name": model, "head_chunk": head_chunk}, out_dir=out_dir,
                  name="scale",
                  train={"steps": 2 * gap, "autocast": autocast, "eval_every": 0, "retention_every": 0,
                         "checkpoint_every": 0, "n_samples": 0, "save_model": False},
                  probe={"every": gap, "rayleigh_every": gap // 2, "alignment_every": gap // 2,
                         "critical_every": gap // 2, "batch_sharpness_every": 1000, "mode": mode,
                         "chunk_size": chunk})
    if model != "embedded":
        cfg = replace(cfg, replay={"weight": 0.0})
    if memory_only:  # every kind still runs and builds its graphs, but solves stop after 3 HVPs and 2 draws
        cfg = replace(cfg, probe={"max_hvps": 3, "batch_min_samples": 2, "batch_max_samples": 2})
    run_dir = run(cfg, resume=False, progress=False)
    from transformers import AutoModelForCausalLM

    from agents.embedded import embedded_model_path

    n = AutoModelForCausalLM.from_pretrained(embedded_model_path() if model == "embedded" else model).num_parameters()
    return n, read_metrics(run_dir)


def summarise(rows: list[dict], gap: int) -> dict:
    """Step time and memory, per-kind costs (cold at 0, warm at gap/2 or gap) and the share at default cadences."""
    from probes import ProbeConfig

    steps = [r for r in rows if "time/step_s" in r]
    step_s = statistics.median(r["time/step_s"] for r in steps)
    step_mb = max(r["memory/step_mb"] for r in steps)
    step_peak_mb = max(r.get("memory/step_peak_mb", math.nan) for r in steps)
    at = {r["step"]: r for r in rows if "probe/seconds" in r}
    cold, mid, warm = at.get(0, {}), at.get(gap // 2, {}), at.get(gap, {})
    defaults, kinds = ProbeConfig(), {}
    for kind, cadence in CADENCE.items():
        key = f"probe/{kind}_seconds"
        later = warm.get(key, mid.get(key)) if kind not in ("rayleigh", "alignment") else mid.get(key)
        kinds[kind] = {"cold": cold.get(key, math.nan), "warm": later if later is not None else cold.get(key, math.nan),
                       "cadence": getattr(defaults, cadence)}
    per_step = sum((k["cold"] if kind == "batch_sharpness" else k["warm"]) / k["cadence"]
                   for kind, k in kinds.items() if k["cadence"] and math.isfinite(k["warm"]))
    share = per_step / (step_s + per_step)  # probe seconds per step over all seconds per step
    calls = [(s, r["memory/probe_mb"], r["memory/probe_peak_mb"]) for s, r in sorted(at.items())]
    return {"step_s": step_s, "step_mb": step_mb, "step_peak_mb": step_peak_mb, "kinds": kinds, "share": share,
            "calls": calls, "cold_hvps": cold.get("probe/hvps", math.nan),
            "warm_hvps": warm.get("probe/hvps", math.nan)}


def report(name: str, n: int, s: dict) -> None:
    step_s = s["step_s"]
    print(f"\n{name}: {n / 1e6:.2f}M trainable weights; training step {step_s:.2f} s, peak +{s['step_mb']:.0f} MB "
          f"(absolute peak {s['step_peak_mb'] / 1024:.2f} GB)")
    print(f"  {'probe kind':<18}{'cadence':>8}{'cold s':>9}{'steps':>7}{'warm s':>9}{'steps':>7}")
    family = {"cold": 0.0, "warm": 0.0}
    for kind, k in s["kinds"].items():
        if kind in EVERY:
            family = {w: family[w] + (k[w] if math.isfinite(k[w]) else 0.0) for w in family}
        print(f"  {kind:<18}{k['cadence']:>8}{k['cold']:>9.2f}{k['cold'] / step_s:>7.1f}{k['warm']:>9.2f}"
              f"{k['warm'] / step_s:>7.1f}")
    print(f"  λ_max family (every {s['kinds']['lambda_max']['cadence']} steps): cold {family['cold'] / step_s:.1f} "
          f"steps ({s['cold_hvps']:.0f} HVPs in the call), warm {family['warm'] / step_s:.1f} steps "
          f"({s['warm_hvps']:.0f} HVPs); goals ≤ 20 and ≤ 10")
    for step, mb, peak in s["calls"]:
        print(f"  probe call at step {step}: peak +{mb:.0f} MB = {mb / max(s['step_mb'], 1e-9):.1f}× the training "
              f"step's (goal ≤ 2×), absolute peak {peak / 1024:.2f} GB = {peak / s['step_peak_mb']:.2f}× the step's")
    print(f"  probe share of wall time at the default cadence: {s['share']:.1%} (goal ≤ 10 %)")


def argument_errors(models, gap: int) -> list[str]:
    """What is wrong with a run's models and gap (empty when nothing), found before any model is built."""
    errors = []
    if bad := [m for m in models if m != "embedded" and m not in SHAPES]:
        errors.append(f"unknown models {bad}: embedded and/or {', '.join(SHAPES)}")
    if gap < 2 or gap % 2:
        errors.append(f"gap must be an even number >= 2, got {gap}")
    return errors


def main(models=("embedded", "4x256", "6x512"), gap: int = 10, mode: str = "cache", chunk: int = 0,
         memory_only: bool = False, head_chunk: int = 0, autocast: str = "") -> dict:
    if errors := argument_errors(models, gap):
        raise ValueError("; ".join(errors))
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            path = build_model(name, Path(tmp) / name) if name != "embedded" else "embedded"
            with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as ex:  # fresh process: clean RSS
                n, rows = ex.submit(probed_run, path, gap, str(Path(tmp) / f"run-{name}"), mode, chunk,
                                    memory_only, head_chunk, autocast).result()
            out[name] = summarise(rows, gap)
            head = (f", fused head in blocks of {head_chunk} tokens" if head_chunk else "") + \
                (f", {autocast} autocast" if autocast else "")
            report(f"{name} (HVP mode {mode}, probe chunks of {chunk or 'a micro-batch'}{head})", n, out[name])
    return out


if __name__ == "__main__":
    from agents.trainer import AUTOCAST

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["embedded", "4x256", "6x512"],
                    help=f"embedded and/or {', '.join(SHAPES)}")
    ap.add_argument("--gap", type=int, default=10, help="steps between the cold and the warm λ_max call (even)")
    ap.add_argument("--mode", default="cache", choices=("cache", "recompute", "fd"),
                    help="probe.mode: cache keeps every chunk's graph (fast), recompute one chunk's (small)")
    ap.add_argument("--chunk-size", type=int, default=0, help="probe.chunk_size (0 = the training micro-batch)")
    ap.add_argument("--memory-only", action="store_true", help="solves capped at 3 HVPs, 2 batch-sharpness draws: "
                    "every graph is still built, so the memory peaks hold; the times do not")
    ap.add_argument("--head-chunk", type=int, default=0, help="model.head_chunk: the fused LM head (agents.fused_head)"
                    " in blocks of this many tokens; 0 = the model's own head")
    ap.add_argument("--autocast", default="", choices=AUTOCAST,
                    help="train.autocast: half-precision training (GPUs), float32 probes")
    a = ap.parse_args()
    if errors := argument_errors(a.models, a.gap):
        ap.error("; ".join(errors))
    main(tuple(a.models), a.gap, a.mode, a.chunk_size, a.memory_only, a.head_chunk, a.autocast)
