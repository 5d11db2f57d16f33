"""Multi-turn episodes played by a policy: the protocol of an env whose episode has several policy turns, and
``play``, which samples every turn of a batch of episodes (for PPO's rollouts and for greedy evaluation alike).

A turn is sampled after prompt + earlier turns + the env's replies, cut after ``turn_stop`` when that appears (a tool
call ends its turn); ``reply(turn)`` is the env's answer to it (None: the turn ended the episode); at most
``max_turns`` turns, the last one never replied to. Each episode comes back as its transcript after the prompt and as
token ids with a target flag per token (policy text True, env replies False), each segment tokenized on its own, EOS
appended (a target) when the last turn finished by EOS.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

__all__ = ["TurnProtocol", "Episodes", "play"]


@dataclass(frozen=True)
class TurnProtocol:
    """An env's multi-turn rules (envs.core.TextTaskEnv ``reply``, ``max_turns``, ``turn_stop``)."""

    reply: Callable[[str], str | None]
    max_turns: int
    turn_stop: str | None = None

    @classmethod
    def of(cls, env: Any) -> "TurnProtocol | None":
        """The protocol of ``env``, or None for a one-turn env."""
        return cls(env.reply, env.max_turns, env.turn_stop) if getattr(env, "max_turns", 1) > 1 else None


@dataclass
class Episodes:
    texts: list[str]                  # transcript after the prompt (turns and replies)
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]   # turns and replies (+ EOS when finished)
    targets: list[list[bool]]         # per completion token: the policy's (True) or the env's (False)
    finished: list[bool]              # the last turn ended by EOS
    turns: list[int]                  # policy turns played


def play(policy, prompts: Sequence[str], protocol: TurnProtocol, max_new_tokens: int, temperature: float,
         generator: torch.Generator | None = None) -> Episodes:
    """Play one episode per prompt (module docstring); ``temperature`` 0 is greedy. Generation draws from
    ``generator`` only, turn after turn, so the episodes are a function of (weights, prompts, generator state)."""
    eos = policy.tokenizer.eos_token_id
    segments: list[list[tuple[str, bool]]] = [[] for _ in prompts]
    finished, turns, open_ = [False] * len(prompts), [0] * len(prompts), list(range(len(prompts)))
    for turn in range(protocol.max_turns):
        if not open_:
            break
        gen = policy.generate([prompts[i] + "".join(t for t, _ in segments[i]) for i in open_],
                              max_new_tokens=max_new_tokens, temperature=temperature, generator=generator)
        still = []
        for j, i in enumerate(open_):
            text, done = gen.texts[j], gen.finished[j]
            if protocol.turn_stop and protocol.turn_stop in text:
                text, done = text[: text.index(protocol.turn_stop) + len(protocol.turn_stop)], False
            segments[i].append((text, False))
            turns[i] += 1
            reply = protocol.reply(text) if turn + 1 < protocol.max_turns else None
            if reply is None:
                finished[i] = done
            else:
                segments[i].append((reply, True))
                still.append(i)
        open_ = still
    ids, targets = [], []
    for s, f in zip(segments, finished):
        x, t = policy.segment_ids(s)
        ids.append(x + ([eos] if f else []))
        targets.append(t + ([True] if f else []))
    return Episodes(["".join(t for t, _ in s) for s in segments], policy.prompt_token_ids(list(prompts)), ids,
                    targets, finished, turns)
