"""Curvature probes for any loss over any parameter set: HVP operator, largest-algebraic eigen-solver, sharpness
measurements, stability thresholds and the ``Prober`` layer the trainers call. Imports nothing from ``agents`` or
``envs``.

The names below load their module on first use (PEP 562), so ``import probes.thresholds`` stays free of torch:
run-dir readers and reports use the same threshold formulas as the probes without installing torch.
"""
from __future__ import annotations

import importlib

_HOME = {  # public name -> the module that defines it
    "DEFAULT_BLOCK_PATTERNS": "blocks", "block_operator": "blocks", "parameter_blocks": "blocks",
    "ProbeConfig": "config",
    "ProbeContext": "context", "preserved_state": "context", "Prober": "prober",
    "CriticalSharpness": "critical", "critical_sharpness": "critical", "critical_step": "critical",
    "EigResult": "eigs", "top_eigenvalues": "eigs",
    "HessianOperator": "hvp", "LinearOperator": "hvp", "check_model": "hvp",
    "PROBES": "registry", "ProbeKind": "registry",
    "BatchSharpness": "sharpness", "alignment": "sharpness", "TraceEstimate": "sharpness", "adam_preconditioner": "sharpness",
    "adam_sharpness": "sharpness", "batch_sharpness": "sharpness", "block_lambda_max": "sharpness",
    "hutchinson_trace": "sharpness", "lambda_max": "sharpness", "preconditioned_operator": "sharpness",
    "rayleigh_pair": "sharpness", "rayleigh_quotient": "sharpness", "step_sharpness": "sharpness",
    "update_sharpness": "sharpness",
    "stability_thresholds": "thresholds",
}
__all__ = sorted(_HOME)


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module 'probes' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
    globals()[name] = value   # resolved once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOME))
