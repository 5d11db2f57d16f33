"""LMPolicy: a Hugging Face causal LM + tokenizer (+ optional peft LoRA) as a text policy.

Sequences are ``prompt_ids ++ completion_ids ++ [eos]``, with prompt and completion tokenized *separately*: the
completion tokens are exactly what the policy would emit after the prompt, so training (encode), scoring
(token_logprobs) and sampling (generate) all see one tokenization.

    log π(c | p) = Σ_t log softmax(f_θ(p ++ c_<t))[c_t]        (labels = -100 on prompt and padding)

``generate`` is our own KV-cached decoding loop rather than ``model.generate`` because HF generate samples with the
global RNG; here every draw comes from the ``torch.Generator`` passed in, so rollouts are reproducible without
touching the training RNG. Greedy decoding (temperature 0) matches ``model.generate(do_sample=False)`` token for token.
"""
from __future__ import annotations

import inspect
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open

from agents.tokens import IGNORE, context_length, pad, token_stats

# LoRA targets used when LoRASpec.targets is empty. GPT-NeoX: every linear map in attention and MLP. Other
# architectures fall back to peft's own per-architecture default (target_modules=None).
DEFAULT_LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "gpt_neox": ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
    "gpt2": ("c_attn", "c_proj", "c_fc"),
}


@dataclass(frozen=True)
class LoRASpec:
    """peft LoRA parameterization: W = W0 + (alpha / rank) · B A with A: rank×d_in, B: d_out×rank (B = 0 at init).

    rank 0 means full fine-tuning (no adapters). The run config carries the same fields flat on ``ModelConfig``
    (``lora_rank``, ``lora_alpha``, ``lora_targets``: the CLI flags and config.json keys); ``ModelConfig.lora``
    turns them into this spec, and ``lora_errors`` is the one set of rules for both."""

    rank: int = 0
    alpha: float = 16.0
    targets: tuple[str, ...] = ()   # module names to adapt; empty = DEFAULT_LORA_TARGETS of the architecture
    dropout: float = 0.0


def lora_errors(spec: LoRASpec, prefix: str = "lora.") -> list[str]:
    """Problems with ``spec``, each naming its field as ``prefix + field`` (``model.lora_`` in a run config)."""
    errors = []
    if not spec.rank >= 0:
        errors.append(f"{prefix}rank={spec.rank} must be >= 0 (0 = full fine-tuning)")
    if not spec.alpha > 0:
        errors.append(f"{prefix}alpha={spec.alpha} must be > 0")
    if not 0.0 <= spec.dropout < 1.0:
        errors.append(f"{prefix}dropout={spec.dropout} must be in [0, 1)")
    if spec.targets and spec.rank == 0:
        errors.append(f"{prefix}targets is set but {prefix}rank is 0 (LoRA off)")
    return errors


@dataclass(frozen=True)
class ModelConfig:
    """Which pre-trained model a run starts from, how it is parameterized and where it runs."""

    name: str = "embedded"
    """"embedded" (offline default, agents.embedded), a save_pretrained directory (a run's final_model) or a hub name."""
    lora_rank: int = 0
    """0 = full fine-tuning; > 0 = train peft LoRA adapters of this rank only."""
    lora_alpha: float = 16.0
    """LoRA scale numerator: the update is (lora_alpha / lora_rank) · B A."""
    lora_targets: tuple[str, ...] = ()
    """Module names that get adapters; empty = the architecture default (GPT-NeoX: every attention/MLP linear)."""
    dtype: str = "float32"
    """torch floating dtype of the weights, e.g. float32, bfloat16."""
    device: str = "auto"
    """"auto" = cuda when available, else cpu; or any torch device string (cpu, cuda:1, mps)."""
    head_chunk: int = 0
    """> 0: SFT log-probs through agents.fused_head, the LM head's logits built this many tokens at a time and none
    kept in the autograd graph (a cached-graph HVP then holds no vocabulary-sized tensor: for Pythia's 50k vocabulary
    most of a probe's memory), at one more head matmul per backward; 0: the model's own forward. Needs a bias-free
    linear head (GPT-NeoX, GPT-2, Llama; not a LoRA-adapted head). PPO keeps the full softmax (its entropy)."""
    attention: str = "auto"
    """Attention kernel of the model's own passes: "sdpa" (PyTorch's fused kernels; the probes switch SDPA to its
    math kernel inside every Hessian-vector product, the one place that needs a double backward: probes.hvp_guard),
    "eager", or "auto" = sdpa on CUDA (flash/memory-efficient kernels: no T×T attention matrix kept per layer),
    eager elsewhere (on this CPU the two cost the same, 0.170 vs 0.168 s a 16-example gradient of the embedded model,
    and eager keeps every earlier CPU run bit for bit). Flash-attention-2/3 are refused: no double backward."""

    @property
    def lora(self) -> LoRASpec:
        return LoRASpec(rank=self.lora_rank, alpha=self.lora_alpha, targets=tuple(self.lora_targets))


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set to a true value: only local files may load."""
    return any(os.environ.get(v, "0").lower() not in ("", "0", "false", "no")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def resolve_device(device: str) -> str:
    """``"auto"`` -> "cuda" when available, else "cpu"; any other device string unchanged."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


ATTENTION = ("auto", "eager", "sdpa")


def resolve_attention(attention: str, device: str) -> str:
    """``"auto"`` -> "sdpa" on a CUDA device, else "eager" (ModelConfig.attention); others unchanged."""
    if attention == "auto":
        return "sdpa" if torch.device(resolve_device(device)).type == "cuda" else "eager"
    return attention


def config_errors(m: ModelConfig) -> list[str]:
    """Problems with ``m`` that show without loading weights (safetensors headers only); [] = valid."""
    errors = lora_errors(m.lora, prefix="model.lora_")
    if m.attention not in ATTENTION:
        errors.append(f"model.attention={m.attention!r} must be one of {', '.join(ATTENTION)} (flash attention has no "
                      "double backward, so no probe could take a Hessian-vector product through it)")
    if m.head_chunk < 0:
        errors.append(f"model.head_chunk={m.head_chunk} must be >= 0 (0 = the model's own head)")
    if not isinstance(getattr(torch, m.dtype, None), torch.dtype) or not getattr(torch, m.dtype).is_floating_point:
        errors.append(f"model.dtype={m.dtype!r} is not a torch floating dtype (e.g. 'float32', 'bfloat16')")
    if m.device != "auto":
        try:
            device = torch.device(m.device)
        except (RuntimeError, TypeError):
            errors.append(f"model.device={m.device!r} is not a torch device (e.g. 'auto', 'cpu', 'cuda:0')")
        else:
            errors += _device_errors(device, m.device)
    if m.name != "embedded" and Path(m.name).exists():
        errors += _model_dir_errors(Path(m.name))
    elif m.name != "embedded":
        offline = hub_offline()
        if offline or not re.fullmatch(r"[\w.\-]+(/[\w.\-]+)?", m.name):
            errors.append(f"model.name={m.name!r} is neither 'embedded' nor an existing local directory"
                          + (" (HF_HUB_OFFLINE is set, so hub names cannot be fetched)" if offline else ""))
    return errors


def _device_errors(device: torch.device, name: str) -> list[str]:
    """``device`` must exist on this machine (a missing accelerator fails here, before anything loads)."""
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            return [f"model.device={name!r} but CUDA is not available here (use 'auto' or 'cpu')"]
        if device.index is not None and device.index >= count:
            return [f"model.device={name!r} but only {count} CUDA device(s) exist"]
    if device.type == "mps" and not torch.backends.mps.is_available():
        return [f"model.device={name!r} but MPS is not available here (use 'auto' or 'cpu')"]
    return []


def _model_dir_errors(path: Path) -> list[str]:
    """A local model.name must be a save_pretrained directory: a readable config.json (adapter_config.json for a
    LoRA save) and weights whose safetensors headers parse. Reads headers only, no tensors."""
    label = f"model.name={str(path)!r}"
    if not path.is_dir():
        return [f"{label} is a file; expected a model directory (save_pretrained output)"]
    config = next((path / f for f in ("config.json", "adapter_config.json") if (path / f).is_file()), None)
    if config is None:
        return [f"{label} has no config.json (not a save_pretrained model directory)"]
    try:
        json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return [f"{label}: {config.name} is not valid JSON ({e})"]
    weights = sorted(path.glob("*.safetensors"))
    if not weights and not any(path.glob("*.bin")):
        return [f"{label} has no weights (*.safetensors or *.bin)"]
    for w in weights:
        try:
            with safe_open(str(w), framework="pt") as f:
                f.keys()
        except Exception as e:  # noqa: BLE001 - any parse failure means the file is unusable
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            return [f"{label}: {w.name} is not a valid safetensors file ({first})"]
    return []


@dataclass
class Generation:
    """Result of LMPolicy.generate, one entry per prompt.

    completion_ids include the EOS token when the sequence finished (finished[i] True); texts are the decoded
    completions without EOS/pad."""

    texts: list[str]
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    finished: list[bool] = field(default_factory=list)


def _resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use e.g. 'float32', 'bfloat16' or a torch.dtype")
    return resolved


class LMPolicy:
    """Causal LM policy. ``model`` is a PreTrainedModel, or a peft PeftModel when LoRA is on."""

    def __init__(self, model: torch.nn.Module, tokenizer, head_chunk: int = 0) -> None:
        self.model = model
        self.tokenizer = tokenizer
        # > 0: token_logprobs builds the head's logits this many tokens at a time and keeps none in the autograd
        # graph (agents.fused_head), for large vocabularies; 0: the model's own forward
        self.head_chunk = head_chunk
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos_token; LMPolicy needs one to end completions")
        if tokenizer.pad_token_id is None:
            # Padding positions are always masked out, so reusing EOS as pad changes no number.
            tokenizer.pad_token = tokenizer.eos_token
        # A peft model with adapters: its base model is reachable with them off (``model.disable_adapter()``).
        # Duck-typed so that this module does not import peft (heavy, and only needed under LoRA).
        self.uses_lora = hasattr(model, "disable_adapter") and hasattr(model, "peft_config")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        path_or_name: str | os.PathLike,
        lora: LoRASpec = LoRASpec(),
        dtype: torch.dtype | str = torch.float32,
        attn_implementation: str = "eager",
        device: str | torch.device | None = None,
        head_chunk: int = 0,
    ) -> "LMPolicy":
        """Load with AutoModelForCausalLM / AutoTokenizer (local files only when HF_HUB_OFFLINE is set).

        attn_implementation: "eager" or "sdpa" (the probes run SDPA's math kernel inside their Hessian-vector
        products, whose double backward the fused kernels lack: probes.hvp_guard); run configs choose it through
        ``ModelConfig.attention``. A directory saved by ``save`` under LoRA (adapter_config.json)
        is reloaded as base model + trainable adapters (``lora`` is then ignored: the saved adapter config wins)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = str(path_or_name)
        kwargs = dict(local_files_only=hub_offline())
        torch_dtype = _resolve_dtype(dtype)
        adapter_dir = Path(path) / "adapter_config.json"
        if adapter_dir.is_file():
            from peft import PeftConfig, PeftModel

            peft_cfg = PeftConfig.from_pretrained(path)
            base = AutoModelForCausalLM.from_pretrained(
                peft_cfg.base_model_name_or_path, dtype=torch_dtype, attn_implementation=attn_implementation, **kwargs
            )
            model = PeftModel.from_pretrained(base, path, is_trainable=True)
            tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=torch_dtype, attn_implementation=attn_implementation, **kwargs
            )
            tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
            if lora.rank != 0:
                model = apply_lora(model, lora)
        if device is not None:
            model.to(device)
        return cls(model, tokenizer, head_chunk=head_chunk)

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def max_length(self) -> int | None:
        """Model context in tokens (max_position_embeddings), or None when the config does not say."""
        return context_length(self.model)

    def trainable_parameters(self) -> dict[str, torch.Tensor]:
        """Named parameters with requires_grad (LoRA adapters only under LoRA)."""
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    # ------------------------------------------------------------------ batching
    def prompt_token_ids(self, prompts: Sequence[str]) -> list[list[int]]:
        """Token ids of each prompt, as ``encode`` and ``generate`` put them before a completion."""
        # add_special_tokens=True on the prompt only: a BOS-using tokenizer gets its BOS, never a stray EOS.
        return [list(x) for x in self.tokenizer(list(prompts), add_special_tokens=True)["input_ids"]]

    def _completion_ids(self, completions: Sequence[str]) -> list[list[int]]:
        return [list(x) for x in self.tokenizer(list(completions), add_special_tokens=False)["input_ids"]]

    def segment_ids(self, segments: Sequence[tuple[str, bool]]) -> tuple[list[int], list[bool]]:
        """Token ids of ``(text, is_env)`` segments, each tokenized on its own (as a multi-turn rollout appends them),
        and whether each token is a target (policy text) or context (env text)."""
        ids, target = [], []
        for text, is_env in segments:
            t = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            ids += t
            target += [not is_env] * len(t)
        return ids, target

    def encode(
        self, prompts: Sequence[str], completions: Sequence[str | Sequence[tuple[str, bool]]],
        max_length: int | None = None
    ) -> dict[str, torch.Tensor]:
        """Tokenize prompt/completion pairs into a right-padded training batch; see ``collate``. A completion is a
        string (all of it a target) or the ``(text, is_env)`` segments of a multi-turn episode after its prompt,
        whose env segments (tool replies) are context only: their labels are masked like the prompt's."""
        if isinstance(prompts, str) or isinstance(completions, str):
            raise TypeError("encode takes lists of prompts and completions, not a single string")
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        if all(isinstance(c, str) for c in completions):
            return self.collate(
                self.prompt_token_ids(prompts), self._completion_ids(completions), max_length=max_length, add_eos=True
            )
        ids, targets = zip(*(self.segment_ids([(c, False)] if isinstance(c, str) else c) for c in completions))
        return self.collate(self.prompt_token_ids(prompts), ids, max_length=max_length, add_eos=True, targets=targets)

    def collate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        completion_ids: Sequence[Sequence[int]],
        max_length: int | None = None,
        add_eos: bool = True,
        targets: Sequence[Sequence[bool]] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Token ids -> {input_ids, attention_mask, labels} [B, T], right padding, labels -100 on prompt and pad
        (and on the completion tokens whose ``targets`` entry is False: env text inside a multi-turn completion).

        add_eos appends EOS after each completion (use False for Generation.completion_ids, which already end in
        EOS when finished). Truncation rule when len(prompt) + len(completion) exceeds max_length (default: the
        model context): the prompt is kept whole and the completion is cut from the right, so a truncated
        sequence loses its EOS label. A prompt that leaves no room for one completion token is an error."""
        if len(prompt_ids) != len(completion_ids):
            raise ValueError(f"{len(prompt_ids)} prompts but {len(completion_ids)} completions")
        if len(prompt_ids) == 0:
            raise ValueError("empty batch")
        limit = max_length if max_length is not None else self.max_length
        eos, pad_id = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        if targets is not None and [len(t) for t in targets] != [len(c) for c in completion_ids]:
            raise ValueError("targets must give one flag per completion token")
        rows, n_prompt, context = [], [], []
        for i, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
            p, c = list(p), list(c) + ([eos] if add_eos else [])
            if limit is not None:
                if len(p) >= limit:
                    raise ValueError(
                        f"prompt of {len(p)} tokens leaves no room for a completion within max_length={limit}"
                    )
                c = c[: limit - len(p)]
            rows.append(p + c)
            n_prompt.append(len(p))
            if targets is not None:  # positions of env tokens in the row (the appended EOS is the policy's)
                context.append([len(p) + j for j, t in enumerate(targets[i][: len(c)]) if not t])
        input_ids, attention_mask = pad(rows, pad_id)
        labels = input_ids.masked_fill(attention_mask == 0, IGNORE)
        for i, k in enumerate(n_prompt):
            labels[i, :k] = IGNORE
            if context and context[i]:
                labels[i, context[i]] = IGNORE
        dev = self.device
        return {"input_ids": input_ids.to(dev), "attention_mask": attention_mask.to(dev), "labels": labels.to(dev)}

    # ------------------------------------------------------------------ scoring
    def token_logprobs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token log-probs of ``labels`` under this policy; see :func:`token_logprobs`."""
        return token_logprobs(self.model, input_ids, attention_mask, labels, head_chunk=self.head_chunk)

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        max_new_tokens: int = 32,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> Generation:
        """Sample completions, batched with left padding and a KV cache; stop at EOS (or max_new_tokens).

        temperature 0 = greedy (argmax); otherwise x_t ~ softmax(logits / temperature), drawn with
        torch.multinomial(generator=generator) so the result is a function of (weights, prompts, generator state).
        The model runs in eval mode (no dropout) and its mode is restored afterwards."""
        if isinstance(prompts, str):
            raise TypeError("generate takes a list of prompts, not a single string")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        prompt_ids = self.prompt_token_ids(prompts)
        if any(len(p) == 0 for p in prompt_ids):
            raise ValueError("generate needs non-empty prompts (the tokenizer adds no BOS to condition on)")
        limit = self.max_length
        longest = max(len(p) for p in prompt_ids)
        if limit is not None and longest + max_new_tokens > limit:
            raise ValueError(
                f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds the model context {limit}"
            )
        eos, pad_id = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        dev = self.device
        B = len(prompt_ids)
        ids, mask = pad(prompt_ids, pad_id, left=True)
        ids, mask = ids.to(dev), mask.to(dev)
        # Left padding: positions count real tokens only, so each row sees the positions it would see alone.
        positions = (mask.cumsum(-1) - 1).clamp(min=0)

        was_training = self.model.training
        self.model.eval()
        try:
            cache_kw = self._cache_kwarg()
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
            past, logits = _cache_of(out), out.logits[:, -1]
            next_pos = positions[:, -1:] + 1
            finished = torch.zeros(B, dtype=torch.bool, device=dev)
            new_tokens: list[torch.Tensor] = []
            for step in range(max_new_tokens):
                tok = self._pick(logits.float(), temperature, generator)
                tok = torch.where(finished, torch.full_like(tok, pad_id), tok)
                new_tokens.append(tok)
                finished = finished | (tok == eos)
                if bool(finished.all()) or step == max_new_tokens - 1:
                    break
                mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=dev)], dim=1)
                out = self.model(
                    input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos,
                    use_cache=True, **{cache_kw: past},
                )
                past, logits = _cache_of(out), out.logits[:, -1]
                next_pos = next_pos + 1
        finally:
            self.model.train(was_training)

        gen = torch.stack(new_tokens, dim=1).tolist() if new_tokens else [[] for _ in range(B)]
        completion_ids, texts, done = [], [], []
        for row in gen:
            if eos in row:
                row = row[: row.index(eos) + 1]
                done.append(True)
                body = row[:-1]
            else:
                done.append(False)
                body = row
            completion_ids.append(row)
            texts.append(self.tokenizer.decode(body, skip_special_tokens=True))
        return Generation(texts=texts, prompt_ids=prompt_ids, completion_ids=completion_ids, finished=done)

    def _cache_kwarg(self) -> str:
        # transformers >= 5.2x renamed past_key_values -> cache; support both so older installs keep working.
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"

    @staticmethod
    def _pick(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
        if temperature == 0:
            return logits.argmax(-1)
        probs = torch.softmax(logits / temperature, dim=-1)
        if generator is not None and generator.device != probs.device:
            return torch.multinomial(probs.to(generator.device), 1, generator=generator).squeeze(-1).to(probs.device)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> Path:
        """save_pretrained model (adapters only under LoRA) and tokenizer into path; reload with from_pretrained."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        return path


def _cache_of(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def apply_lora(model: torch.nn.Module, spec: LoRASpec) -> torch.nn.Module:
    """Wrap model with peft LoRA adapters; base weights get requires_grad=False and are never written."""
    from peft import LoraConfig, get_peft_model

    errors = lora_errors(spec) + ([] if spec.rank else ["apply_lora needs LoRASpec.rank > 0"])
    if errors:
        raise ValueError("; ".join(errors))
    targets = spec.targets or DEFAULT_LORA_TARGETS.get(getattr(model.config, "model_type", ""), None)
    config = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        target_modules=list(targets) if targets else None,
        lora_dropout=spec.dropout,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def token_logprobs(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
    head_chunk: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """logp[b, t] = log p_θ(labels[b, t+1] | input_ids[b, :t+1]); mask[b, t] = labels[b, t+1] != -100.

    Shapes [B, T-1]; logp is 0 where mask is False. Differentiable: the SFT loss is -Σ logp·mask / Σ mask. Cost:
    one forward pass (``agents.tokens.token_stats``)."""
    stats = token_stats(model, input_ids, attention_mask, labels, head_chunk=head_chunk)
    return stats.logp, stats.mask
