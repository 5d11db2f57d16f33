"""EnvConfig: which env a run uses, with which keyword arguments, and which of its tasks it trains and evaluates on.

Training pools (``envs.core.pool_of``) are disjoint hash parts of the train split, "sft" (80 %) and "rl" (20 %), so RL
after SFT trains on problems the SFT data never held; twins (``1+3``, ``3+1``) share a pool.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import gymnasium as gym

# The package's __init__ (the registry) never imports this module, so importing it from here is no cycle.
from envs import ENV_IDS, make_unwrapped
from envs.core import TextTaskEnv, pool_of

POOLS = ("auto", "all", "sft", "rl")
# set by the run itself (tasks come from the train and test splits in dataset mode), so not user kwargs
RUN_CONTROLLED_ENV_KWARGS = ("split", "render_mode")


@dataclass(frozen=True)
class EnvConfig:
    env_id: str = "ArithRLVR-v0"
    """Registered env id (envs.ENV_IDS)."""
    n_train: int | None = None
    """Training set: the first n_train tasks of the pool (None = all of it); full-batch GD uses all n_train."""
    offset: int = 0
    """Tasks of the pool skipped before the training set, which is then tasks [offset, offset + n_train): disjoint
    blocks of one pool, e.g. one per seed of full-batch GD, which is deterministic given its data."""
    pool: str = "auto"
    """Part of the train split to train on: auto = the regime's own (sft or rl), sft, rl, or all (both)."""
    n_eval: int = 500
    """Held-out test-split tasks for eval/accuracy (0 = no eval)."""
    kwargs: dict[str, int | float | bool | str] = field(default_factory=dict)
    """gym.make(env_id, **kwargs) for every env of the run, e.g. max_digits 3 (ArithRLVR-v0), path a.json (Alpaca)."""
    # kwargs is a dict, so EnvConfig (and RunConfig) are not hashable.


def env_kwarg_names(env_id: str) -> tuple[str, ...]:
    """The keyword arguments a run may pass to ``env_id``: its class's ``kwarg_names()`` less those the run sets."""
    cls = gym.registry[env_id].entry_point
    if isinstance(cls, str):
        cls = gym.envs.registration.load_env_creator(cls)
    return tuple(sorted(set(cls.kwarg_names()) - set(RUN_CONTROLLED_ENV_KWARGS)))


def make_env(e: EnvConfig) -> TextTaskEnv:
    """The run's env (unwrapped TextTaskEnv) with ``e.kwargs``: source of tasks and of the verifier."""
    return make_unwrapped(e.env_id, **e.kwargs)


def train_tasks(env: TextTaskEnv, e: EnvConfig, regime: str) -> list:
    """The run's training set: the first ``e.n_train`` tasks of the train split whose problem falls in the pool
    (``e.pool``, "auto" = the regime's), in the env's dataset order. ValueError if the pool is too small.

    The split is read ``at_most`` its dataset size: a narrowed env (e.g. 2-digit sums, 7290 train problems) trains
    on all of its problems instead of failing to find the 9000 of the default space."""
    pool = regime if e.pool == "auto" else e.pool
    tasks = env.tasks("train", at_most=True)
    if pool != "all":
        tasks = [t for t in tasks if pool_of(env.split_key(t)) == pool]  # twins (1+3, 3+1) share a pool
    _POOL_SIZES[_pool_key(e, pool)] = len(tasks)
    if e.n_train is not None and e.offset + e.n_train > len(tasks):
        raise ValueError(_too_few(e, len(tasks), pool))
    tasks = tasks[e.offset:]
    return tasks if e.n_train is None else tasks[:e.n_train]


# Train-pool sizes by (env id, kwargs, pool), filled by train_tasks: a sweep validates hundreds of configs of one env
# before it runs, and drawing a pool (41k arithmetic problems: ≈ 3.5 s) for each would take minutes. An env's
# dataset is a pure function of its id and kwargs (a data file is read when the env is built, and rereading it
# within one process is not a change this check needs to see).
_POOL_SIZES: dict[tuple, int] = {}


def _pool_key(e: EnvConfig, pool: str) -> tuple:
    return e.env_id, json.dumps(e.kwargs, sort_keys=True, default=str), pool


def _too_few(e: EnvConfig, size: int, pool: str) -> str:
    past = f" after env.offset={e.offset}" if e.offset else ""
    return (f"env.n_train={e.n_train} exceeds the {size - e.offset} tasks of {e.env_id}'s train split in pool "
            f"{pool!r}{past}")


def curriculum_levels(env: TextTaskEnv, e: EnvConfig) -> list[list]:
    """The RL pool's training tasks at each difficulty level of ``env`` (``env.at_difficulty(k)``, the levels of
    ``env.n_levels``): at most ``e.n_train`` (default: the dataset's train size) distinct problems per level, all of
    them on a level whose problem space is smaller (the one-digit levels)."""
    levels = []
    for k in range(env.n_levels):
        level = env.at_difficulty(k)
        tasks = level.tasks("train", at_most=True)
        tasks = [t for t in tasks if pool_of(level.split_key(t)) == "rl"]
        levels.append(tasks[:e.n_train] if e.n_train is not None else tasks)
    return levels


def config_errors(e: EnvConfig, regime: str) -> tuple[list[str], TextTaskEnv | None]:
    """(problems with ``e`` for a run of ``regime``, the env built from it or None when it cannot be built).

    Builds the env once (a bad knob value or a missing data file shows only then); the run reuses it."""
    if e.env_id not in gym.registry:
        return [f"env.env_id={e.env_id!r} is not a registered env id (known: {', '.join(ENV_IDS)})"], None
    errors = []
    if e.n_train is not None and e.n_train < 1:
        errors.append(f"env.n_train={e.n_train} must be >= 1 (or None: the whole pool)")
    if e.pool not in POOLS:
        errors.append(f"env.pool={e.pool!r} is unknown; choose one of {POOLS}")
    if e.n_eval < 0:
        errors.append(f"env.n_eval={e.n_eval} must be >= 0")
    if e.offset < 0:
        errors.append(f"env.offset={e.offset} must be >= 0")
    if not isinstance(e.kwargs, dict) or not all(isinstance(k, str) for k in e.kwargs):
        return errors + [f"env.kwargs={e.kwargs!r} must be a dict with str keys"], None
    accepted = env_kwarg_names(e.env_id)
    unknown = sorted(set(e.kwargs) - set(accepted))
    if unknown:
        return errors + [f"env.kwargs {unknown} not accepted by {e.env_id} (accepted: {', '.join(accepted)})"], None
    try:
        json.dumps(e.kwargs)
    except TypeError as exc:
        return errors + [f"env.kwargs must be JSON-serialisable (it is recorded in config.json): {exc}"], None
    try:
        env = make_env(e)
        if e.n_eval > env.split_size("test"):
            errors.append(f"env.n_eval={e.n_eval} exceeds the {env.split_size('test')} tasks of {e.env_id}'s "
                          "test split")
        if not errors and regime in ("sft", "rl"):
            pool = regime if e.pool == "auto" else e.pool
            size = _POOL_SIZES.get(_pool_key(e, pool))
            if size is None:
                try:
                    train_tasks(env, e, regime)
                except ValueError as exc:
                    errors.append(str(exc))
            elif e.n_train is not None and e.offset + e.n_train > size:
                errors.append(_too_few(e, size, pool))
    except Exception as exc:  # an env that cannot even be built (bad knob value, missing data file) is a config error
        return errors + [f"env {e.env_id!r} with kwargs {e.kwargs} cannot be built: {type(exc).__name__}: {exc}"], \
            None
    return errors, env
