"""The probe registry is the one list of probe kinds: the Prober emits exactly the keys its kinds declare, each
kind is scheduled by a real ProbeConfig cadence, and CONTRACTS.md lists every key."""
import dataclasses
import re
from pathlib import Path

import torch

from probes import PROBES, ProbeConfig, ProbeContext, Prober
from probes.registry import metric_keys
from probes.testing import mlp_problem

CONTRACTS = Path(__file__).resolve().parent.parent / "CONTRACTS.md"


def _pattern(key: str) -> re.Pattern:
    return re.compile(re.escape(key).replace(r"\{i\}", r"\d+").replace(r"\{block\}", r"[A-Za-z_]+")
                      .replace(r"\{kind\}", "(" + "|".join(k.name for k in PROBES) + ")") + "$")


def test_kinds_have_unique_names_and_real_cadences():
    fields = {f.name: f.type for f in dataclasses.fields(ProbeConfig)}
    assert len({k.name for k in PROBES}) == len(PROBES)
    for kind in PROBES:
        assert kind.cadence.endswith("every") and fields[kind.cadence] in (int, "int"), kind
        assert kind.keys and kind.cost, kind


def test_prober_emits_exactly_the_declared_keys():
    model, params, loss_fn, chunks = mlp_problem(chunk=32)
    opt = torch.optim.Adam(params.values(), lr=1e-3)
    opt.zero_grad()
    sum(loss_fn(c) for c in chunks).backward()
    opt.step()
    cfg = ProbeConfig(every=1, k=2, batch_sharpness_every=1, gni=True, batch_min_samples=2, batch_max_samples=2,
                      trace_every=1, trace_max_probes=2, blocks_every=1, max_hvps=30, step_sharpness=True,
                      rayleigh_every=1)
    update = {n: torch.full_like(p, 1e-3) for n, p in params.items()}
    out = Prober(cfg)(ProbeContext(params, loss_fn, chunks, lr=1e-3, step=0, optimizer=opt, model=model,
                                   sample_batch=lambda g: [chunks[int(torch.randint(0, 2, (1,), generator=g))]],
                                   update=update))
    patterns = [_pattern(k) for k in metric_keys()]
    assert all(any(p.match(key) for p in patterns) for key in out), sorted(out)
    assert out["probe/cached_chunks"] == len(chunks)   # the default cache_mb holds this probe set whole
    # every declared key but the SGD-only momentum threshold was emitted here
    for key in metric_keys():
        assert key == "probe/momentum_threshold" or any(_pattern(key).match(k) for k in out), key


def test_contracts_list_every_key():
    text = CONTRACTS.read_text()
    missing = [k for k in metric_keys() if f"`{k}`" not in text]
    assert not missing, f"CONTRACTS.md lacks {missing}"


def test_every_probe_flag_has_help_text():
    import warnings

    import tyro
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)   # get_parser: the argparse view tyro prints
        parser = tyro.extras.get_parser(ProbeConfig)
    helps = {a.dest: a.help or "" for a in parser._actions}
    for f in dataclasses.fields(ProbeConfig):
        text = helps[f.name.replace("_", "-")].split("(default")[0].strip()
        assert len(text) > 10, (f.name, text)


def test_a_bounded_cache_measures_the_same_bit_for_bit():
    """ProbeConfig.cache_mb changes what the probe keeps in memory, not what it measures."""
    model, params, loss_fn, chunks = mlp_problem(chunk=32)
    update = {n: torch.full_like(p, 1e-3) for n, p in params.items()}
    out = {}
    for mb in (0.0, 1e-6):
        cfg = ProbeConfig(every=1, k=2, max_hvps=30, step_sharpness=True, rayleigh_every=1, alignment_every=1,
                          critical_every=0, cache_mb=mb)
        out[mb] = Prober(cfg)(ProbeContext(params, loss_fn, chunks, lr=1e-3, step=0, model=model, update=update))
    assert out[0.0].pop("probe/cached_chunks") == len(chunks) and out[1e-6].pop("probe/cached_chunks") == 0
    values = {mb: {k: v for k, v in o.items() if not k.endswith("seconds")} for mb, o in out.items()}
    assert values[0.0] == values[1e-6] and "probe/lambda_max" in values[0.0]
