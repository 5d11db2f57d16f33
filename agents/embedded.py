"""The offline default model: byte-level BPE + a small GPT-NeoX, pre-trained on the running Python's stdlib prose.

No hub download is possible, so the default policy is built here, deterministically from ``EmbeddedConfig``:

- corpus: docstrings (``ast.get_docstring`` of modules, classes, functions in ``Lib/**/*.py``, tests excluded) and
  ``pydoc_data.topics``; sources are visited in sha256(name) order until ``corpus_chars`` are collected. Each document
  goes to the held-out *retention* split when ``sha256(text) mod 10^4 < retention_fraction · 10^4``, so the split of a
  document never depends on which other documents were collected. Arithmetic worksheets built from ``envs.arith``
  lines (train split of the envs only; see ``_arith_documents``) are mixed into the training split so the
  post-training tasks are reachable; they are about three quarters of the training tokens.
- tokenizer: byte-level BPE (``tokenizers``) with single-digit tokens, wrapped as ``PreTrainedTokenizerFast``; EOS id
  0, PAD id 1.
- model: ``GPTNeoXForCausalLM`` (Pythia architecture), pre-trained with AdamW on random ``context``-token windows of
  the concatenated training stream (documents separated by EOS), linear warm-up then cosine decay to 10 %.
- cache: ``$EOSLAB_HOME/embedded-<key>`` (default ``~/.cache/eoslab``) written atomically (tmp dir + rename) under a
  file lock, with ``manifest.json`` (config, key, retention loss, seconds) and ``retention.json``; reused when present.
  The key hashes the config, the Python version (the stdlib is the corpus) and the *code*: this module's syntax tree
  without docstrings (so a comment or docstring edit keeps the cache, any code edit rebuilds) and the arithmetic lines
  that ``envs.arith`` generates for the config (the generator's output, not its source: an edit anywhere in ``envs``
  that changes those lines rebuilds, an unrelated edit there does not), so no version constant has to be bumped by
  hand for a stale model to be rebuilt.
- determinism: the same config gives bitwise-equal tokenizer and weights run to run in one process (tested) and
  across processes on the same machine, torch build and thread count (measured; TOKENIZERS_PARALLELISM on or off
  gives the same tokenizer). The torch thread count changes the floating-point reduction order of the CPU kernels,
  so builds under different ``OMP_NUM_THREADS`` differ in the last bits (retention loss 4.338103294 vs 4.338103056
  on the test config with 1 vs 2 threads), not in quality; ``manifest.json`` records ``torch_threads``.

Our own pre-training loop (not ``transformers.Trainer``): it is 30 lines, needs no dataset library, and keeps the
build reproducible from ``seed`` alone.
"""
from __future__ import annotations

import ast
import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import re
import shutil
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Iterable, Mapping

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
FORMAT_VERSION = 1  # bump to invalidate caches for a change the code version cannot see (e.g. a dependency)
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "lib2to3"}
_MIN_DOC_CHARS = 64  # shorter docstrings ("Return x.") are mostly noise


@dataclass(frozen=True)
class EmbeddedConfig:
    """Recipe of the embedded model. Defaults: 2×128 GPT-NeoX (0.92M params), vocab 2048 with digit tokens; the
    build took 383 s (357 s of pre-training) on one thread while a 2-process test suite shared the 2-core machine."""

    seed: int = 0
    # corpus
    corpus_chars: int = 2_000_000     # prose collected from the stdlib (whole stdlib ≈ 2.07M chars on CPython 3.11)
    retention_fraction: float = 0.05  # share of documents held out as the retention set
    arith_fraction: float = 0.3       # arithmetic equation chars added to the training split, relative to corpus_chars
    # tokenizer + model
    vocab_size: int = 2048            # the LM head is most of a step's cost at this width; digits need no merges
    split_digits: bool = True         # every digit its own token (BPE never merges "37" into one symbol)
    n_layer: int = 2
    hidden: int = 128
    heads: int = 4
    context: int = 256
    # pre-training
    steps: int = 700                  # 700 × 16 × 256 ≈ 2.9M tokens (~0.9 epoch of 3.3M)
    batch_size: int = 16              # windows of `context` tokens per step
    lr: float = 3e-3
    warmup_steps: int = 30
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_tokens: int = 32_768         # retention tokens for the reported loss

    def __post_init__(self) -> None:
        for name in ("corpus_chars", "vocab_size", "n_layer", "hidden", "heads", "context", "batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"EmbeddedConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        if not 0 < self.retention_fraction < 1:
            raise ValueError(f"retention_fraction must be in (0, 1), got {self.retention_fraction}")
        if self.arith_fraction < 0 or self.steps < 0 or self.warmup_steps < 0:
            raise ValueError("arith_fraction, steps and warmup_steps must be >= 0")
        if self.vocab_size < 258:
            raise ValueError(f"vocab_size must be >= 258 (256 bytes + EOS + PAD), got {self.vocab_size}")

    def key(self) -> str:
        """Cache key: hash of the recipe, the format version, the Python version (the stdlib is the corpus) and the
        code version (see ``code_version``)."""
        blob = json.dumps(
            {"config": dataclasses.asdict(self), "format": FORMAT_VERSION, "python": list(sys.version_info[:2]),
             "code": code_version(self)},
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                node.body = node.body[1:] or [ast.Pass()]
    return tree


def source_code_hash(source: str) -> str:
    """sha256 (16 hex) of Python source's syntax tree without docstrings: code edits change it, comments, docstrings
    and formatting do not."""
    tree = _strip_docstrings(ast.parse(source))
    return hashlib.sha256(ast.dump(tree, include_attributes=False).encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def _module_code_hash() -> str:
    return source_code_hash(Path(__file__).read_text(encoding="utf-8"))


@functools.lru_cache(maxsize=8)
def code_version(cfg: EmbeddedConfig) -> str:
    """Hash of the code that builds ``cfg``: this module (``_module_code_hash``) + the arithmetic documents that
    envs.arith generates for ``cfg`` (≈0.5 s for the default config, once per process)."""
    arith = _arith_documents(int(cfg.arith_fraction * cfg.corpus_chars), cfg.seed)
    digest = hashlib.sha256("\x00".join(arith).encode()).hexdigest()[:16]
    return f"{_module_code_hash()}-{digest}"


# ---------------------------------------------------------------------------------------------- corpus
def _sha(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def _stdlib_sources() -> list[tuple[str, Path | None]]:
    """(name, path) of every stdlib module outside test dirs, plus ("pydoc_data/topics", None)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    sources: list[tuple[str, Path | None]] = [("pydoc_data/topics", None)]
    for p in root.rglob("*.py"):
        rel = p.relative_to(root)
        if not set(rel.parts[:-1]) & _EXCLUDED_DIRS:
            sources.append((rel.as_posix(), p))
    return sources


def _documents_of(path: Path | None) -> list[str]:
    if path is None:
        import pydoc_data.topics

        return [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)]
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    docs = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc) >= _MIN_DOC_CHARS:
                docs.append(doc)
    return docs


# Arithmetic as it appears in web text: worksheets of bare equations, Q/A pairs and sentences (the "direct" formats),
# and worked exercises that show column working (as envs.arith demonstrates it) and end with an "Answer:" line. One
# document = one worksheet in one format; half of the worksheets are worked. The worked ones make the column procedure
# and the answer marker reachable from the base model (RL from the base earns some reward), and a base that can
# already work columns needs a shorter SFT, which forgets less of its prose (measured: a base with 2 worked formats of
# 7 needed ~750 AdamW steps at 1e-3 for 0.66 held-out, while its prose perplexity rose 3.3x in the first 150). The
# base never sees the task's own instruction, so SFT still has to teach the prompt -> working mapping.
_DIRECT_FORMATS = (
    lambda e, v, steps: steps,
    lambda e, v, steps: re.sub(r"(?<=[\d)])([-+*=])", r" \1 ", steps),  # binary operators only: "5 - 11 = -6"
    lambda e, v, steps: f"Q: What is {e}?\nA: {v}",
    lambda e, v, steps: f"{e} is {v}.",
    lambda e, v, steps: f"Problem: {e}\nSolution: {steps}",
)
_WORKED_FORMATS = (
    lambda e, v, steps: f"Compute {e}.\n{working(steps.split('='))}\nAnswer: {v}",
    lambda e, v, steps: f"Compute {e}. Show your work.\n{working(steps.split('='))}\nAnswer: {v}",
    lambda e, v, steps: f"Problem: {e}\nWorking:\n{working(steps.split('='))}\nAnswer: {v}",
)
_HARD_SHARE = 0.1  # share of worksheets drawn from the hard preset (multi-step, '*', parentheses, negatives)


def working(steps: list[str]) -> str:
    from envs.arith import working as columns  # envs is optional: only arithmetic documents need it

    return columns(steps)


def _arith_documents(n_chars: int, seed: int, lines_per_doc: int = 8) -> list[str]:
    """Worksheets of train-split arithmetic (``envs.arith.arithmetic_corpus``) totalling about ``n_chars`` of
    equations. Worksheet j is from the hard preset when ``sha256("sheet j") mod 100 < 100 * _HARD_SHARE`` and is
    rendered in a worked or a direct format picked by ``sha256(its lines)``; each preset's lines are consumed in order,
    so the worksheets of a smaller corpus are a prefix of a larger one's."""
    if n_chars <= 0:
        return []
    try:
        from envs.arith import HARD, arithmetic_corpus
    except ImportError:  # envs is optional for the model build; the corpus is then prose only
        return []
    n_docs = max(1, n_chars // (8 * lines_per_doc))  # equations average ~8 chars
    hard = [_sha(f"sheet {j}") % 100 < 100 * _HARD_SHARE for j in range(n_docs)]
    n_hard = sum(hard) * lines_per_doc
    pools = {False: iter(arithmetic_corpus(n_docs * lines_per_doc - n_hard, seed=seed)),
             True: iter(arithmetic_corpus(n_hard, seed=seed, config=HARD))}
    docs = []
    for is_hard in hard:
        sheet = [next(pools[is_hard]) for _ in range(lines_per_doc)]
        h = _sha("\n".join(sheet))
        formats = _WORKED_FORMATS if h % 2 else _DIRECT_FORMATS
        fmt = formats[(h // 2) % len(formats)]
        docs.append("\n".join(fmt(ln.split("=")[0], ln.split("=")[-1], ln) for ln in sheet))
    return docs


@functools.lru_cache(maxsize=4)
def build_corpus(cfg: EmbeddedConfig) -> Mapping[str, tuple[str, ...]]:
    """{"train": documents (prose + arithmetic), "retention": held-out prose}; deterministic given cfg + Python.

    Read-only (cached per config)."""
    seen: set[str] = set()
    prose: list[str] = []
    total = 0
    for name, path in sorted(_stdlib_sources(), key=lambda s: _sha(s[0])):
        for doc in _documents_of(path):
            if doc in seen:
                continue
            seen.add(doc)
            prose.append(doc)
            total += len(doc)
        if total >= cfg.corpus_chars:
            break
    threshold = round(cfg.retention_fraction * 10_000)
    train = [d for d in prose if _sha(d) % 10_000 >= threshold]
    retention = [d for d in prose if _sha(d) % 10_000 < threshold]
    train += _arith_documents(int(cfg.arith_fraction * cfg.corpus_chars), cfg.seed)
    train.sort(key=_sha)  # interleave arithmetic and prose in a fixed order
    return MappingProxyType({"train": tuple(train), "retention": tuple(retention)})


def retention_texts(cfg: EmbeddedConfig = EmbeddedConfig(), split: str = "retention") -> list[str]:
    """Documents of one corpus split ("train" or "retention"); read from the model cache when it exists."""
    if not isinstance(cfg, EmbeddedConfig):
        raise TypeError(f"cfg must be an EmbeddedConfig, got {type(cfg).__name__} (use split=... by keyword)")
    if split not in ("train", "retention"):
        raise ValueError(f"split must be 'train' or 'retention', got {split!r}")
    cached = _home() / f"embedded-{cfg.key()}" / "retention.json"
    if split == "retention" and cached.is_file():
        return json.loads(cached.read_text())
    return list(build_corpus(cfg)[split])


# ---------------------------------------------------------------------------------------------- tokenizer + model
def train_tokenizer(texts: Iterable[str], vocab_size: int, split_digits: bool = False):
    """Byte-level BPE (GPT-2 byte alphabet, so every string round-trips) wrapped as PreTrainedTokenizerFast.

    ``split_digits``: a ``Digits(individual_digits=True)`` pre-tokenizer runs first, so every digit is a token of
    its own and a number's tokens are its digits: the same digit in the same place is the same token whatever
    the number, which is what lets a small LM learn column arithmetic (byte-BPE merges frequent digit chunks
    like "19" or "200" into single symbols, each with its own embedding to learn). Special tokens: EOS_TOKEN
    (id 0) and PAD_TOKEN (id 1)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]) \
        if split_digits else byte_level
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN)


def init_model(tokenizer, n_layer: int, hidden: int, heads: int, context: int, seed: int,
               attn_implementation: str = "eager"):
    """Random-init GPTNeoXForCausalLM (Pythia architecture: parallel residual, rotary on 25 % of head dims)."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=n_layer,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        max_position_embeddings=context,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    return GPTNeoXForCausalLM(config)


def _token_stream(tokenizer, docs: Iterable[str]):
    import torch

    ids: list[int] = []
    for row in tokenizer(list(docs), add_special_tokens=False)["input_ids"]:
        ids.extend(row)
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def _windows_loss(model, stream, context: int, max_tokens: int, batch_size: int = 16) -> float:
    """Mean next-token NLL (nats) over consecutive non-overlapping windows covering ≤ max_tokens of the stream."""
    import torch

    if len(stream) < 2:
        raise ValueError("evaluation stream has fewer than 2 tokens")
    n_win = max(1, min(len(stream) - 1, max_tokens) // context)
    width = min(context, len(stream))
    windows = [stream[i * width : (i + 1) * width] for i in range(n_win) if (i + 1) * width <= len(stream)]
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(windows), batch_size):
            x = torch.stack(windows[i : i + batch_size])
            loss = model(input_ids=x, labels=x, use_cache=False).loss
            n = x.numel() - x.shape[0]
            total, count = total + loss.item() * n, count + n
    model.train(was_training)
    return total / count


def pretrain(model, train_stream, cfg: EmbeddedConfig, progress: bool = True) -> list[float]:
    """AdamW on random windows; returns the per-step training loss (nats/token)."""
    import torch

    g = torch.Generator().manual_seed(cfg.seed)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95),
    )

    def lr_factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    width = min(cfg.context, len(train_stream) - 1)
    if width < 2:
        raise ValueError("training stream too short for pre-training")
    bar = _progress(cfg.steps, "pre-training embedded model", progress)
    losses = []
    model.train()
    for _ in range(cfg.steps):
        starts = torch.randint(0, len(train_stream) - width + 1, (cfg.batch_size,), generator=g)
        x = torch.stack([train_stream[s : s + width] for s in starts.tolist()])
        loss = model(input_ids=x, labels=x, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    return losses


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False)


# ---------------------------------------------------------------------------------------------- cache
def _home() -> Path:
    return Path(os.environ.get("EOSLAB_HOME", Path.home() / ".cache" / "eoslab")).expanduser()


@contextlib.contextmanager
def _file_lock(path: Path):
    """Exclusive lock so concurrent processes build a given config once (no-op where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build_embedded(cfg: EmbeddedConfig, out_dir: Path, progress: bool = True) -> dict:
    """Build corpus, tokenizer and model, pre-train, save everything into out_dir; returns the manifest."""
    import torch

    t0 = time.perf_counter()
    corpus = build_corpus(cfg)
    tokenizer = train_tokenizer(corpus["train"], cfg.vocab_size, split_digits=cfg.split_digits)
    train_stream = _token_stream(tokenizer, corpus["train"])
    retention_stream = _token_stream(tokenizer, corpus["retention"])
    # SDPA for pre-training (first-order only, ~1.4x faster than eager on CPU); LMPolicy reloads with eager
    # attention by default because the probes need double backward.
    model = init_model(tokenizer, cfg.n_layer, cfg.hidden, cfg.heads, cfg.context, cfg.seed,
                       attn_implementation="sdpa")
    with torch.random.fork_rng(devices=[]):  # the build never disturbs the caller's global RNG
        initial = _windows_loss(model, retention_stream, cfg.context, cfg.eval_tokens)
        t_train = time.perf_counter()
        losses = pretrain(model, train_stream, cfg, progress=progress)
        t_train = time.perf_counter() - t_train
    final = _windows_loss(model, retention_stream, cfg.context, cfg.eval_tokens)
    seconds = time.perf_counter() - t0
    manifest = {
        "key": cfg.key(),
        "code_version": code_version(cfg),
        "config": dataclasses.asdict(cfg),
        "format": FORMAT_VERSION,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),  # CPU reduction order: builds differ in the last bits across counts
        "n_params": sum(p.numel() for p in model.parameters()),
        "train_tokens": len(train_stream),
        "retention_tokens": len(retention_stream),
        "retention_loss_init": initial,
        "retention_loss": final,
        "train_loss_last": losses[-1] if losses else None,
        "seconds": seconds,
        "pretrain_seconds": t_train,
        "tokens_per_second": cfg.steps * cfg.batch_size * min(cfg.context, len(train_stream) - 1) / max(t_train, 1e-9),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "retention.json").write_text(json.dumps(list(corpus["retention"])))
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def embedded_model_path(cfg: EmbeddedConfig = EmbeddedConfig(), progress: bool = True) -> Path:
    """Path of the cached embedded model for cfg, building it first if needed (minutes for the default config).

    Load it with ``LMPolicy.from_pretrained(path)``; ``manifest.json`` inside records the recipe and losses."""
    home = _home()
    final = home / f"embedded-{cfg.key()}"
    if (final / "manifest.json").is_file():
        return final
    home.mkdir(parents=True, exist_ok=True)
    with _file_lock(home / f".embedded-{cfg.key()}.lock"):
        if (final / "manifest.json").is_file():  # built by another process while we waited
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-embedded-{cfg.key()}-", dir=home))
        try:
            build_embedded(cfg, tmp, progress=progress)
            if final.exists():  # an incomplete leftover (no manifest) from a killed build
                shutil.rmtree(final)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final
