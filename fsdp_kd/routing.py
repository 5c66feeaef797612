"""Several teachers in one run, as the config names them: `teachers` maps each name to that teacher's own keys (a
whole one-teacher config's teacher keys: `teacher_model` or `teacher_cache`, its offload, its kd_loss ...), and
each sample goes to one of them by its source (`dataset_teachers`, one name per comma-separated `dataset` source) or
by a field of its record (`teacher_key`; `RowRouting` gives each sample's teacher index), or every token to all of
them, weighted (`teacher_weights`: the weighted sum of their divergences). Each teacher is then an ordinary
teacher of `teacher.TEACHERS`, made from its own config (`teacher_configs`); `routed_teacher.RoutedTeachers` runs
them side by side. Every rule here is checked before any data or model is read (`check_routing`, from
`config.validate`), one line naming the file, line and key. docs/several_teachers.md says the semantics.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass

import numpy as np

from .distributed import plan_split
from .errors import ConfigError

# the keys a teacher of `teachers` may set for itself; the rest of its config is the run's
TEACHER_KEYS = ("teacher_model", "teacher_cache", "teacher_offload", "teacher_resident", "teacher_sharding_strategy",
                "kd_loss", "kd_temperature", "cache_mode", "cache_k", "cache_n", "teacher_ranks", "cross_tokenizer")
# the keys of the run a teacher's own config leaves out: the routing itself
ROUTING_KEYS = ("teachers", "dataset_teachers", "teacher_key", "teacher_weights")
# a teacher's own loss settings, as the `loss.LossSpec` fields they set
LOSS_FIELDS = {"kd_loss": "divergence", "kd_temperature": "temperature"}
# keys of the run that do not go with several teachers yet, and why
NOT_WITH_TEACHERS = {
    "teacher_model": "each teacher names its own under teachers",
    "teacher_cache": "each teacher names its own under teachers",
    "teacher_ranks": "a teacher on ranks of its own takes them as its own key (teachers.<name>.teacher_ranks)",
    "cross_tokenizer": "set it per teacher (teachers.<name>.cross_tokenizer: true)",
    "on_policy_ratio": "on-policy distillation is not supported with several teachers yet",
    "teacher_context_key": "a teacher's privileged context is not supported with several teachers yet",
    "teacher_system_prompt": "a teacher's privileged context is not supported with several teachers yet",
}
NAME = re.compile(r"[A-Za-z0-9_-]+")


def check_routing(cfg, where: dict[str, str]) -> None:
    """The routing's rules: each name a word with its own teacher keys and one teacher, every source routed to a
    teacher that exists, and no run-wide key that several teachers cannot take."""
    def fail(key, message):
        raise ConfigError(f"{where.get(key, f'key {key}')}: {message}")

    if cfg.teachers is None:
        for key in ("dataset_teachers", "teacher_key"):
            if getattr(cfg, key) is not None:
                fail(key, f"{key} routes samples to the teachers of `teachers`, which is not set; name the "
                          f"teachers, or drop {key}")
        return
    if not cfg.teachers:
        fail("teachers", "teachers is empty; name at least one teacher, e.g. teachers: {math: {teacher_model: ...}}")
    for name, keys in cfg.teachers.items():
        here = f"key teachers.{name}"
        if not isinstance(name, str) or not NAME.fullmatch(name):
            fail("teachers", f"{here}: a teacher's name is letters, digits, _ and - (it names its metrics, "
                             f"kl_<name>), got {name!r}")
        if not isinstance(keys, dict):
            fail("teachers", f"{here}: expects a mapping of that teacher's keys, e.g. {{teacher_model: path}}, got "
                             f"{keys!r}")
        unknown = [k for k in keys if k not in TEACHER_KEYS]
        if unknown:
            fail("teachers", f"{here}: unknown key '{unknown[0]}'; a teacher takes {', '.join(TEACHER_KEYS)}")
        if not keys.get("teacher_model") and not keys.get("teacher_cache"):
            fail("teachers", f"{here}: give the teacher a teacher_model or a teacher_cache")
    for key, why in NOT_WITH_TEACHERS.items():
        if getattr(cfg, key):
            fail(key, f"{key} is set with teachers: {why}")
    ranked = [name for name, keys in cfg.teachers.items() if keys.get("teacher_ranks")]
    hybrid = [name for name, keys in cfg.teachers.items()  # a co-located model (one with ranks: its own config's rule)
              if not keys.get("teacher_ranks") and not keys.get("teacher_cache")
              and keys.get("teacher_sharding_strategy", cfg.teacher_sharding_strategy) == "hybrid_shard"]
    if ranked and hybrid:
        own = "teacher_sharding_strategy" in cfg.teachers[hybrid[0]]
        fail("teachers" if own else "teacher_sharding_strategy",
             f"teachers.{hybrid[0]} is sharded hybrid_shard beside teachers.{ranked[0]}.teacher_ranks: a job split "
             "into blocks of ranks shards each side over its own ranks, and hybrid_shard is not supported with it "
             f"yet; set {f'teachers.{hybrid[0]}.' if own else ''}teacher_sharding_strategy full_shard")
    sources = cfg.dataset.split(",")
    routings = [key for key in ("dataset_teachers", "teacher_key", "teacher_weights") if getattr(cfg, key) is not None]
    if len(routings) > 1:
        fail(routings[1], f"{' and '.join(routings)} are each a routing (by source, by record, a weighted mixture "
                          "for every token): choose one")
    if cfg.teacher_weights is not None:
        across = [name for name, keys in cfg.teachers.items() if keys.get("cross_tokenizer")]
        if across:
            fail("teacher_weights", f"teacher_weights with teachers.{across[0]}.cross_tokenizer: a mixture needs that "
                                    "teacher's own tokens on every sample, and a sample holds those of one teacher "
                                    "only; route per source (dataset_teachers) or per record (teacher_key)")
        weights = mixture_weights(cfg.teacher_weights)
        if weights is None or len(weights) != len(cfg.teachers):
            fail("teacher_weights", f"teacher_weights needs one non-negative weight per teacher "
                                    f"({', '.join(cfg.teachers)}), not all 0, got {cfg.teacher_weights!r}")
        idle = [name for name, w in zip(cfg.teachers, weights) if w == 0 and name in ranked]
        if idle:
            fail("teacher_weights", f"teacher_weights gives teachers.{idle[0]} weight 0, but it holds ranks of its own "
                                    "(teacher_ranks) that would serve nothing; give it a weight, or drop it")
        return
    if cfg.teacher_key is not None:
        return
    if cfg.dataset_teachers is None:
        if len(cfg.teachers) > 1:
            fail("teachers", f"{len(cfg.teachers)} teachers but no routing: set dataset_teachers, one teacher name "
                             f"per dataset source ({len(sources)}), teacher_key, the record field naming each "
                             "record's teacher, or teacher_weights, a weight per teacher for every token")
        return
    if cfg.eval_dataset:
        fail("eval_dataset", "with dataset_teachers an eval source has no teacher: hold out training data with "
                             "eval_holdout_ratio, or route per record with teacher_key")
    names = cfg.dataset_teachers.split(",")
    if len(names) != len(sources):
        fail("dataset_teachers", f"dataset_teachers names {len(names)} teachers for {len(sources)} dataset sources; "
                                 "give one teacher name per source, in the order of dataset")
    for name, source in zip(names, sources):
        if name not in cfg.teachers:
            fail("dataset_teachers", f"source {source} is routed to {name!r}, which no teacher has; the teachers are "
                                     f"{', '.join(cfg.teachers)}")


def rank_blocks(cfg) -> dict[str | None, int]:
    """The teachers on ranks of their own and each one's count of ranks, in the order of the job's blocks
    (`distributed.split_world`): the run's one teacher (None) with teacher_ranks, or each of `teachers` that sets its
    own."""
    if cfg.teachers is None:
        return {None: cfg.teacher_ranks} if cfg.teacher_ranks else {}
    return {name: keys["teacher_ranks"] for name, keys in cfg.teachers.items() if keys.get("teacher_ranks")}


def check_world(cfg, where: dict[str, str]) -> None:
    """Several teachers' blocks of ranks fit the job's world (torchrun's WORLD_SIZE; a plain process is a world of
    one), said with where `teachers` was set. (A one-teacher run's teacher_ranks is checked as the job splits.)"""
    if cfg.teachers is None:
        return
    try:
        plan_split(int(os.environ.get("WORLD_SIZE", "1")), rank_blocks(cfg))
    except ConfigError as e:
        raise ConfigError(f"{where.get('teachers', 'key teachers')}: {e}") from None


def teacher_configs(cfg) -> dict:
    """Each teacher's own config: the run's, with that teacher's keys over it and no routing; with no `teachers`,
    none."""
    if cfg.teachers is None:
        return {}
    return {name: dataclasses.replace(cfg, **keys, **{k: None for k in ROUTING_KEYS})
            for name, keys in cfg.teachers.items()}


@dataclass(frozen=True)
class RowRouting:
    """How each sample finds its teacher (an index into `names`): by its source (`sources`, an index per training
    source) or by its record's field `key`."""
    names: tuple[str, ...]
    sources: tuple[int, ...] | None
    key: str | None

    def teachers(self, source: int | None, table) -> np.ndarray:
        """Each sample's teacher index in training source `source` (None: the eval source) read as `table`."""
        if self.key is not None:
            return table.teachers(self.names, self.key)
        return np.full(len(table), self.teacher_of(source), dtype=np.int64)

    def teacher_of(self, source: int | None) -> int:
        """The teacher index of training source `source`; the eval source (None) has one only where every source
        has the same (one teacher: `check_routing` refuses an eval_dataset with dataset_teachers)."""
        return self.sources[0 if source is None else source]

    def own_tokens(self, source: int | None, tokenizations: dict):
        """What gives the samples of training source `source` (None: the eval source) their teacher's own tokens,
        of `tokenizations` (by teacher name, those that read their own): per record, all of them, each record taking
        its teacher's (`tokenized`); per source, its teacher's, or None where it reads the student's tokens."""
        if self.key is not None:
            return tokenizations
        return tokenizations.get(self.names[self.teacher_of(source)])


def mixture_weights(text: str) -> tuple[float, ...] | None:
    """`teacher_weights` normalized to sum to 1; None where they are not non-negative numbers, not all 0."""
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        return None
    if min(weights) < 0 or sum(weights) <= 0:
        return None
    return tuple(w / sum(weights) for w in weights)


def routed_tokens(cfg, tokenizations: dict | None) -> tuple[bool, ...]:
    """Per teacher the samples are routed among (each micro-batch then carries each one's `data.Route`), whether it
    reads its own tokens of them (it has a tokenization in `tokenizations`, by name: a live `cross_tokenizer`
    teacher); none with one teacher of its own or a mixture."""
    if cfg.teachers is None or cfg.teacher_weights is not None:
        return ()
    return tuple(name in (tokenizations or {}) for name in cfg.teachers)


def row_routing(cfg) -> RowRouting | None:
    """How the config routes samples to its teachers; None with one teacher of its own (no `teachers`) or a
    mixture (every token goes to every teacher)."""
    if cfg.teachers is None or cfg.teacher_weights is not None:
        return None
    return RowRouting(tuple(cfg.teachers), source_teachers(cfg), cfg.teacher_key)


def source_teachers(cfg) -> tuple[int, ...] | None:
    """The index (in `teachers` order) of the teacher each training source is routed to; None where no source has
    one teacher (no `teachers`, or routed per record)."""
    if cfg.teachers is None or cfg.teacher_key is not None or cfg.teacher_weights is not None:
        return None
    names = list(cfg.teachers)
    routed = cfg.dataset_teachers.split(",") if cfg.dataset_teachers else [names[0]] * len(cfg.dataset.split(","))
    return tuple(names.index(name) for name in routed)


def loss_overrides(cfg) -> dict[str, dict]:
    """Per teacher, the `loss.LossSpec` fields it sets for itself (its kd_loss, its kd_temperature)."""
    return {name: {field: keys[key] for key, field in LOSS_FIELDS.items() if key in keys}
            for name, keys in (cfg.teachers or {}).items()}
