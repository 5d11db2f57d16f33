"""Lineage of a saved policy: which pre-trained model a chain of warm starts began from, and its held-out text.

Forgetting (``retention/...``) is always measured on the held-out text of the *original* pre-trained model, so that
every run of a lineage (SFT -> RL -> ...) is scored on the same texts. The trainer saves ``LINEAGE_FILE`` next to
each final policy (base model, retention source); ``retention_source`` follows those files back.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from agents.embedded import retention_texts as embedded_texts
from agents.trainer import FINAL_MODEL, LINEAGE_FILE
from experiments.errors import ConfigError


def retention_source(model_name: str) -> str:
    """The pre-trained model whose held-out text measures forgetting for a run starting from ``model_name``.

    A policy saved by a run (``<run>/checkpoints/final_model``) carries ``LINEAGE_FILE`` naming its base model and
    retention source; this follows such files through chains of warm starts back to the original model. Any other
    name is its own source. ConfigError when the chain has a cycle."""
    seen = []
    name = model_name
    while True:
        lineage = Path(name) / LINEAGE_FILE if name != "embedded" else None
        if lineage is not None and lineage.is_file():
            info = json.loads(lineage.read_text())
            if info.get("retention_source"):  # resolved when the policy was saved: robust to moved parents
                return info["retention_source"]
            parent = info["base_model"]
        else:  # a final model without a lineage file: its run's config.json names the base model
            config = Path(name).parent.parent / "config.json" if lineage is not None else None
            if config is None or Path(name).name != Path(FINAL_MODEL).name or not config.is_file():
                return name
            parent = json.loads(config.read_text())["config"]["model"]["name"]
        seen.append(name)
        name = parent
        if name in seen:
            raise ConfigError(f"model lineage of {model_name!r} has a cycle: {' -> '.join(seen + [name])}")


def lineage_name(model_name: str) -> str:
    """A model name as it will still resolve from another working directory: local paths become absolute."""
    return model_name if model_name == "embedded" or not Path(model_name).exists() else \
        str(Path(model_name).resolve())


@lru_cache(maxsize=4)
def retention_texts(source: str) -> tuple[str, ...]:
    """Held-out text for forgetting of the pre-trained model ``source`` (see ``retention_source``): the embedded
    model's retention split (prose it never trained on), the ``retention.json`` of a model directory that has one
    (an embedded build), else English prose that no post-training env contains (the Python reference topics of
    ``pydoc_data``), which is instant to load and the same on every machine with the same Python."""
    if source == "embedded":
        return tuple(embedded_texts(split="retention"))
    held_out = Path(source) / "retention.json"
    if held_out.is_file():
        return tuple(json.loads(held_out.read_text()))
    from pydoc_data.topics import topics  # local: a 700 kB module, needed only for hub models

    return tuple(topics[k] for k in sorted(topics))


@lru_cache(maxsize=2)
def replay_texts(source: str) -> tuple[str, ...]:
    """Pre-training text to replay during SFT (agents/replay.py): "embedded" is the embedded model's pre-training
    *train* split (prose and arithmetic; disjoint from the retention split); any other source is a file: a JSON list
    of texts, or plain text split into documents at blank lines."""
    if source == "embedded":
        return tuple(embedded_texts(split="train"))
    path = Path(source)
    if path.suffix == ".json":
        texts = json.loads(path.read_text())
        if not (isinstance(texts, list) and all(isinstance(t, str) for t in texts)):
            raise ConfigError(f"replay.source={source!r} must hold a JSON list of strings")
        return tuple(texts)
    return tuple(t for t in path.read_text().split("\n\n") if t.strip())
