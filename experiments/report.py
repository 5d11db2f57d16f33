"""Run directories -> an HTML report (index.html + PNGs): figures, EoS phase table, forgetting, samples, configs.

Reads run dirs only (experiments.rundirs); never imports training code. Runs are grouped into sweeps by their
parent directory, regime label (sft / lora-r8 / rl ...) and optimizer; each group gets one figure overlaying its
learning rates (experiments.plots). Phase detection (experiments.phases) runs on each run's λ_max against its
optimizer's threshold, on the preconditioned λ_max for Adam, and on batch sharpness when logged.

    python -m experiments.report runs/ --out runs/report
"""

from __future__ import annotations

import html
import json
import math
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path


from experiments.findings import (METRICS, Stat, findings_table, group_name, optim_setting,  # noqa: F401
                                  regime_answers, run_phases, statements)
from experiments.lr_findings import comparison_rows, comparisons
from experiments.phases import PhaseConfig
from experiments.rundirs import Run, find_runs


@dataclass(frozen=True)
class ReportConfig:
    out: Path = Path("runs/report")  # output directory (index.html + PNGs)
    delta: float = PhaseConfig.delta  # EoS band half-width δ relative to the threshold
    title: str = "Edge of Stability in LM post-training"
    notes: tuple[str, ...] = ()  # lines listed under the title (HTML and findings.md), e.g. a study's LR placement


def group_runs(runs: list[Run]) -> dict[str, list[Run]]:
    """Sweep groups: runs sharing parent directory, regime label and optimizer."""
    groups: dict[str, list[Run]] = defaultdict(list)
    for r in runs:
        groups[f"{r.path.parent.name} · {r.label} · {r.optimizer}"].append(r)
    return dict(sorted(groups.items()))


def _first_last(run: Run, key: str) -> tuple[float, float]:
    _, v = run.series(key)
    return (float(v[0]), float(v[-1])) if len(v) else (math.nan, math.nan)


def phase_rows(runs: list[Run], config: PhaseConfig = PhaseConfig()) -> list[dict]:
    rows = []
    for r in runs:
        main_key = r.primary_sharpness
        p = run_phases(r, main_key, config)
        b = run_phases(r, "probe/batch_sharpness", config)
        row = {
            "run": r.name,
            "regime": r.label,
            "optim": optim_setting(r),
            "lr": r.lr,
            "status": r.status.get("status", "?"),
            "steps": int(r.status.get("step", max((x.get("step", 0) for x in r.records), default=0))),
            "sharpness": main_key.split("/")[-1],
        }
        if p is not None:
            row.update(
                phase=p.phase,
                r0=p.r0,
                catapult=p.catapult,
                onset_step=p.onset_step,
                time_to_edge=p.time_to_edge,
                ps_slope=p.sharpening_slope,
                ps_rate_per_1k=p.sharpening_rate,
                band_fraction=p.band_fraction,
                hover_fraction=p.hover_fraction,
                overshoot=p.overshoot,
                max_ratio=p.max_ratio,
                final_ratio=p.final_ratio,
                loss_up_fraction=p.loss_up_fraction,
            )
        if b is not None:
            row.update(bs_phase=b.phase, bs_onset_step=b.onset_step, bs_band_fraction=b.band_fraction)
        rows.append(row)
    return rows


def forgetting_rows(runs: list[Run]) -> list[dict]:
    """Catastrophic forgetting: retention perplexity/loss and task scores at the first vs the last logged step."""
    rows = []
    for r in runs:
        row = {"run": r.name, "regime": r.label, "lr": r.lr}
        for key in ("retention/perplexity", "retention/loss", "eval/accuracy", "env/reward_mean"):
            a, b = _first_last(r, key)
            if not math.isnan(a):
                name = key.split("/")[-1]
                row[f"{name}@0"] = a
                row[f"{name}@end"] = b
        if "perplexity@0" in row:
            row["ppl ratio"] = row["perplexity@end"] / row["perplexity@0"]
        if len(row) > 3:
            rows.append(row)
    return rows


def config_rows(runs: list[Run]) -> list[dict]:
    rows = []
    for r in runs:
        train = r.config.get("train", {}) if isinstance(r.config.get("train"), dict) else {}
        optim = r.config.get("optim", {}) if isinstance(r.config.get("optim"), dict) else {}
        model = r.config.get("model", {}) if isinstance(r.config.get("model"), dict) else {}
        env = r.config.get("env", {}) if isinstance(r.config.get("env"), dict) else {}
        ppo = r.config.get("ppo", {}) if isinstance(r.config.get("ppo"), dict) else {}
        if r.regime == "rl" and ppo:
            batch = f"{ppo.get('prompts_per_step')} prompts × {ppo.get('group_size')}"
        elif train.get("full_batch"):
            batch = f"full ({env.get('n_train', '?')})"
        elif "micro_batch" in train:
            batch = f"{train['micro_batch']}×{train.get('grad_accum', 1)}"
        else:
            batch = train.get("batch", "")
        rows.append(
            {
                "run": r.name,
                "regime": r.label,
                "model": _short_model_name(str(model.get("name", ""))),
                "env": env.get("env_id", r.config.get("dataset", "")),
                "optim": r.optimizer,
                "lr": r.lr,
                "momentum": optim.get("momentum", ""),
                "wd": optim.get("weight_decay", ""),
                "batch": batch,
                "steps": train.get("steps", r.config.get("steps", "")),
                "seed": train.get("seed", r.config.get("seed", "")),
                "git": str(r.meta.get("git_hash", ""))[:8],
            }
        )
    return rows


def _short_model_name(name: str) -> str:
    """'embedded', or '<run>/final_model' for a model saved by an earlier run (a warm start), else the last part."""
    parts = Path(name).parts
    if len(parts) >= 3 and parts[-2] == "checkpoints":
        return f"{parts[-3]}/{parts[-1]}"
    return parts[-1] if parts else name


# ---- HTML ----
_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1500px}table{border-collapse:collapse;
font-size:13px;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 7px;text-align:right;vertical-align:top}
th{background:#f0f0f0}td.t{text-align:left;white-space:pre-wrap;max-width:420px;font-family:monospace;font-size:12px}
img{max-width:100%;border:1px solid #eee}.eos{background:#d8f5d8}details{margin:0.3em 0}code{font-size:12px}"""


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if math.isnan(v):
            return "–"
        return f"{v:.3g}" if (abs(v) >= 1e-3 or v == 0) else f"{v:.2e}"
    return html.escape(str(v))


def html_table(rows: list[dict], text_cols: tuple[str, ...] = ()) -> str:
    if not rows:
        return "<p><i>none</i></p>"
    cols = list(dict.fromkeys(k for row in rows for k in row))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = []
    for row in rows:
        cls = ' class="eos"' if row.get("phase") == "eos" else ""
        cells = "".join(
            f'<td class="t">{html.escape(str(row.get(c, "")))}</td>' if c in text_cols
            else f"<td>{_fmt(row.get(c))}</td>"
            for c in cols
        )
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _fmt_stat(x: Stat) -> str:
    """mean [lo, hi] (n) across seeds."""
    if x.n == 0:
        return "–"
    ci = f" [{_fmt(x.lo)}, {_fmt(x.hi)}]" if x.n > 1 else ""
    return f"{_fmt(x.mean)}{ci} (n={x.n})"


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s).strip("_")


def write_report(paths, config: ReportConfig = ReportConfig()) -> Path:
    """Build the report for every run at or below ``paths``; returns the path of index.html."""
    from experiments.plots import sweep_figure  # matplotlib only when drawing

    runs = find_runs(paths)
    if not runs:
        raise FileNotFoundError(f"no run directories (config.json) under {list(map(str, paths))}")
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    phase_cfg = PhaseConfig(delta=config.delta)
    sources = html.escape(", ".join(map(str, paths)))
    parts = [f"<h1>{html.escape(config.title)}</h1>", f"<p>{len(runs)} runs from {sources}</p>"]
    if config.notes:
        parts.append("<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in config.notes) + "</ul>")

    rows = phase_rows(runs, phase_cfg)
    parts.append("<h2>EoS phases</h2>")
    parts.append(
        f"<p>r = λ/θ with θ the optimizer's threshold (2/η GD, (2+2β)/η momentum, Adam on the preconditioned "
        f"Hessian); rules in experiments/phases.py. r0: r at the first probe; catapult: starts above 1+δ and "
        f"drops (with a loss rise); onset: first probe with median-of-3 r ≥ 1−δ (δ={config.delta}); "
        f"time_to_edge: steps until the median r is ≤ 1+2δ after the onset; ps_slope: Theil–Sen dλ/dstep before "
        f"onset; ps_rate_per_1k: gain in r per 1000 steps; band_fraction / hover_fraction: share of probes after "
        f"that with |r−1| ≤ δ / with 1−δ ≤ r ≤ 1+2δ; overshoot: their median r − 1; loss_up_fraction: share of "
        f"loss increases after onset. eos: median r in [1−δ, 1+2δ] and hover_fraction ≥ 0.5; inconclusive: the "
        f"run ended < 3 probes after reaching the edge, or r swings across it. Green rows are at the edge.</p>"
    )
    parts.append(html_table(rows))
    (out / "phases.json").write_text(json.dumps(rows, indent=1, default=str))

    # figures first, so that every findings group can link to the figures its runs are drawn in
    figures, fig_parts = defaultdict(list), []
    for title, group in group_runs(runs).items():
        try:
            png = sweep_figure(group, title, out / f"{_slug(title)}.png")
        except ValueError as e:  # a group whose runs have no metrics yet
            fig_parts.append(f"<p>{html.escape(str(e))}</p>")
            continue
        fig_parts.append(f"<h3 id='{_slug(title)}'>{html.escape(title)}</h3><img src='{png.name}'>")
        for r in group:
            if png.name not in figures[group_name(r.label, optim_setting(r))]:
                figures[group_name(r.label, optim_setting(r))].append(png.name)

    table = findings_table(runs, phase_cfg)
    found = statements(table)
    regimes = regime_answers(found)
    for f in found:
        f["figures"] = figures.get(f["group"], [])

    def links(f: dict) -> str:
        return " ".join(f"<a href='#{html.escape(Path(p).stem)}'>[figure]</a>" for p in f.get("figures", []))

    parts.append("<h2>Findings (rules in experiments/findings.py; CIs across seeds)</h2>")
    if regimes:
        parts.append("<h3>Does the Edge of Stability persist? (per regime)</h3><ul>" + "".join(
            f"<li><b>{html.escape(a['statement'])}</b> <i>(rule: {html.escape(a['rule'])})</i></li>"
            for a in regimes) + "</ul>")
    parts.append("<ul>" + "".join(f"<li>{'<b>' if 'answer' in f else ''}{html.escape(f['statement'])}"
                                  f"{'</b>' if 'answer' in f else ''} <i>(rule: {html.escape(f['rule'])})</i> "
                                  f"{links(f)}</li>" for f in found) + "</ul>")
    parts.append(html_table([{k: _fmt_stat(v) if isinstance(v, Stat) else (json.dumps(v) if isinstance(v, dict) else v)
                              for k, v in row.items()} for row in table]))
    lr_found = comparisons(runs)
    for name, lr in lr_found.items():
        parts.append(f"<h3>Learning-rate controllers vs the best constant: {html.escape(name)} (rules in "
                     f"experiments/lr_findings.py)</h3><ul>" + "".join(
                         f"<li>{html.escape(st['statement'])} <i>(rule: {html.escape(st['rule'])})</i></li>"
                         for st in lr["statements"]) + "</ul>")
        parts.append(html_table(comparison_rows(lr)))
    (out / "findings.json").write_text(json.dumps({"table": table, "statements": found, "regimes": regimes,
                                                   "lr_comparisons": lr_found},
                                                  indent=1,
                                                  default=lambda o: o.__dict__ if isinstance(o, Stat) else str(o)))
    (out / "findings.md").write_text(findings_markdown(config.title, table, found, regimes, len(runs), config.delta,
                                                       config.notes) + lr_markdown(lr_found))

    parts.append("<h2>Figures (one per sweep group, overlaying learning rates)</h2>")
    parts.extend(fig_parts)

    parts.append("<h2>Catastrophic forgetting (first vs last logged step)</h2>")
    parts.append(html_table(forgetting_rows(runs)))

    parts.append("<h2>Base vs fine-tuned completions</h2>")
    any_samples = False
    for r in runs:
        if r.samples:
            any_samples = True
            cols = tuple(dict.fromkeys(k for s in r.samples for k in s))
            parts.append(f"<h3>{html.escape(r.name)}</h3>" + html_table(list(r.samples), text_cols=cols))
    if not any_samples:
        parts.append("<p><i>no samples.json in these runs</i></p>")

    parts.append("<h2>Configs</h2>")
    parts.append(html_table(config_rows(runs)))
    for r in runs:
        full = json.dumps({"config": r.config, **r.meta}, indent=1, default=str)
        parts.append(f"<details><summary>{html.escape(r.name)}</summary>"
                     f"<pre><code>{html.escape(full)}</code></pre></details>")

    index = out / "index.html"
    index.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(config.title)}</title>"
                     f"<style>{_CSS}</style></head><body>{''.join(parts)}</body></html>")
    return index


def lr_markdown(lr_found: dict[str, dict]) -> str:
    """The learning-rate comparisons (experiments.lr_findings) as Markdown sections; empty when there are none."""
    lines = []
    for name, lr in lr_found.items():
        lines += ["", f"## Learning-rate controllers vs the best constant: {name}", ""]
        lines += [f"- {st['statement']} (rule: {st['rule']})" for st in lr["statements"]] + [""]
        rows = comparison_rows(lr)
        lines += ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
        lines += ["| " + " | ".join(str(v) for v in row.values()) + " |" for row in rows]
    return "\n".join(lines) + ("\n" if lines else "")


def findings_markdown(title: str, table: list[dict], found: list[dict], regimes: list[dict], n_runs: int,
                      delta: float, notes: tuple[str, ...] = ()) -> str:
    """The findings as Markdown: notes, per-regime answers, every statement with its rule and figures, the table."""
    lines = [f"# {title}", "", f"{n_runs} runs; phases and rules in experiments/phases.py and experiments/findings.py "
             f"(δ = {delta}); numbers are mean [95% CI] (n seeds).", ""]
    lines += [f"- {n}" for n in notes] + ([""] if notes else [])
    if regimes:
        lines += ["## Does the Edge of Stability persist? (per regime)", ""]
        lines += [f"- **{a['statement']}** (rule: {a['rule']})" for a in regimes] + [""]
    lines += ["## Statements", ""]
    for f in found:
        figs = " ".join(f"[figure]({p})" for p in f.get("figures", []))
        text = f"**{f['statement']}**" if "answer" in f else f["statement"]
        lines.append(f"- {text} (rule: {f['rule']}) {figs}".rstrip())
    cols = ["regime", "optim", "lr", "seeds", "phases", "catapult_share", *METRICS]
    lines += ["", "## Table (per regime × optimizer × η)", "", "| " + " | ".join(cols) + " |",
              "|" + "---|" * len(cols)]
    for row in table:
        cells = []
        for c in cols:
            v = row.get(c)
            cells.append(_fmt_stat(v) if isinstance(v, Stat) else
                         ", ".join(f"{k} {n}" for k, n in v.items()) if isinstance(v, dict) else html.unescape(_fmt(v)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import tyro

    def _main(paths: tuple[Path, ...], out: Path = Path("runs/report"), delta: float = PhaseConfig.delta) -> None:
        """Build the HTML report for the run dirs (or directories holding run dirs) ``paths``."""
        print(write_report(paths, ReportConfig(out=out, delta=delta)))

    tyro.cli(_main)
