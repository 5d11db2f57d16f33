"""Curvature probes for any loss over any parameter set: HVP operator, largest-algebraic eigen-solver, sharpness
measurements and the ``Prober`` layer the trainers call. Imports nothing from ``agents`` or ``envs``."""
from .blocks import DEFAULT_BLOCK_PATTERNS, block_operator, parameter_blocks
from .context import ProbeConfig, ProbeContext, Prober, preserved_state
from .eigs import EigResult, top_eigenvalues
from .hvp import HessianOperator, LinearOperator, check_model
from .sharpness import (BatchSharpness, TraceEstimate, adam_preconditioner, adam_sharpness, batch_sharpness,
                        block_lambda_max, hutchinson_trace, lambda_max, preconditioned_operator, rayleigh_pair,
                        rayleigh_quotient,
                        stability_thresholds, step_sharpness, update_sharpness)

__all__ = [
    "HessianOperator", "LinearOperator", "check_model", "top_eigenvalues", "EigResult", "lambda_max",
    "rayleigh_quotient", "rayleigh_pair", "step_sharpness", "update_sharpness", "batch_sharpness", "BatchSharpness",
    "adam_preconditioner", "preconditioned_operator", "adam_sharpness", "stability_thresholds",
    "hutchinson_trace", "TraceEstimate", "block_lambda_max", "parameter_blocks", "block_operator",
    "DEFAULT_BLOCK_PATTERNS", "ProbeContext", "ProbeConfig", "Prober", "preserved_state",
]
