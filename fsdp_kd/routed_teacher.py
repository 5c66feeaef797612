"""Several teachers in one run (`teachers` in the config, `routing`): a composition of ordinary teachers, each any
entry of `teacher.TEACHERS` made from its own config, each training the rows routed to it.

Each micro-batch carries, per teacher, its own samples of the batch laid out alone (`data.Route`, built at collate
time from each sample's teacher index): a teacher runs on its own rows only, and a teacher that no row of a
micro-batch needs is not run for it at all. One exception keeps the ranks in lock-step without any host sync: a
teacher whose forward is a collective over the ranks (a co-located model teacher in a run of several ranks: FSDP
gathers its shards in its forward, and its head for the loss; a teacher on ranks of its own, whose ranks run one
micro-batch of each student rank in turn, and whose head the student ranks gather) runs on every micro-batch of
every rank, on a masked stand-in of one sample where this rank has none of its rows, because whether another rank has
some is not known here without asking. A cached teacher costs nothing where it has no rows.

The loss is exact: the student's rows are split by teacher, each part is scored against its own teacher (with that
teacher's kd_loss and kd_temperature) by the one-teacher loss, and the parts' summed losses and metrics add up, so
CE is counted once per row and the trainer's division by the global token count is unchanged. Each teacher's sums
also go to the step's metrics as `<metric>_<name>` (`step_metrics`), in the step's one transfer.
"""

from __future__ import annotations

import dataclasses
from contextlib import ExitStack, contextmanager, nullcontext

import numpy as np
import torch

from .data import MicroBatch, Route, Rows
from .errors import ConfigError
from .kernel import METRIC_NAMES
from .routing import RowRouting, loss_overrides, mixture_weights, row_routing, teacher_configs
from .step_metrics import COUNTS, SUMMED, summed
from .targets import NO_TEACHER
from .teacher import TEACHERS, Teacher, open_teacher, teacher_kind
from .teacher_model import MODEL_TEACHERS


# metrics of the student's rows alone: in a mixture, where every teacher scores every row, counted once
ROW_METRICS = ("ce", "student_entropy", "tokens")


@dataclasses.dataclass
class Part:
    """One teacher's share of a micro-batch's loss: its index, its rows among the batch's target rows (None: all of
    them, a mixture), its targets, its own loss settings, its weight in the KD term (1 when routed), and whether the
    CE of its rows is counted here (routed: always; a mixture: by the first teacher alone)."""
    index: int
    rows: torch.Tensor | None
    targets: object
    overrides: dict
    share: float = 1.0
    owns_rows: bool = True

    def spec(self, spec):
        """The run's loss settings as this part takes them."""
        coefs = {} if self.share == 1.0 and self.owns_rows else {
            "kd_coef": spec.kd_coef * self.share, "ce_coef": spec.ce_weight if self.owns_rows else 0.0}
        return dataclasses.replace(spec, **self.overrides, **coefs)


@dataclasses.dataclass
class RoutedTargets:
    """One micro-batch's targets from several teachers: a `Part` per teacher that scores rows here."""
    parts: list[Part]
    teachers: int

    def scored(self, score, hidden: torch.Tensor, labels: torch.Tensor, spec):
        """The sum of each part's loss, the run's summed metrics (the rows' own once, each teacher's weighted by its
        share), and each teacher's sums (`by_teacher`, [teachers, len(SUMMED)], zero for a teacher with no row
        here)."""
        if not self.parts:  # no target row at all (a batch of masked copies)
            loss, metrics = score(hidden, labels, spec, NO_TEACHER)
            return loss, {**metrics, "by_teacher": hidden.new_zeros((self.teachers, len(SUMMED)), dtype=torch.float64)}
        loss, metrics, rows = None, {}, [None] * self.teachers
        for part in self.parts:
            at = (hidden, labels) if part.rows is None else (hidden.index_select(0, part.rows),
                                                             labels.index_select(0, part.rows))
            part_loss, got = score(*at, part.spec(spec), part.targets)
            rows[part.index] = summed(part_loss, got)
            loss = part_loss if loss is None else loss + part_loss
            for k, v in got.items():
                if k not in ROW_METRICS or part.owns_rows:
                    v = v if k in ROW_METRICS or part.share == 1.0 else v * part.share
                    metrics[k] = v if k not in metrics else metrics[k] + v
        zero = torch.zeros(len(SUMMED), dtype=torch.float64, device=hidden.device)
        return loss, {**metrics, "by_teacher": torch.stack([zero if r is None else r for r in rows])}


class RoutedTeachers:
    """The run's teachers by name, each an ordinary `Teacher`, routed per source or per record (`routing`), or, with
    `weights`, all of them on every row, a teacher of weight 0 never run. It answers what a run asks of one teacher
    (`teacher.Teacher`) by asking each of them about its own rows; its `retokenize` is, by name, the tokenization
    of each teacher that reads its own tokens (`cross_tokenizer`), which the samples routed to it get, or None."""
    distills = True
    teacher_vocab_size = 0  # no head of its own: each teacher loads its own

    def __init__(self, members: dict[str, Teacher], kinds: dict[str, str], overrides: dict[str, dict],
                 routing: RowRouting | None, weights: tuple[float, ...] | None = None):
        self.members, self.kinds, self.overrides, self.routing = members, kinds, overrides, routing
        self.weights = weights
        self.retokenize = {name: m.retokenize for name, m in members.items() if m.retokenize is not None} or None
        sizes = {name: member.vocab_size for name, member in members.items()}  # the loss's, the student's tokens
        if len(set(sizes.values())) > 1:
            raise ConfigError(f"key teachers: the teachers' loss vocabularies differ ({sizes}); each teacher must "
                              "cover the same vocabulary of the student's tokenizer")
        self.vocab_size = next(iter(sizes.values()))
        # a metric of the whole run only where every teacher gives it under one name; each teacher's, by name
        self.metric_groups = {name: member.metric_names for name, member in members.items()}
        agreed = {k: {names.get(k, k) for names in self.metric_groups.values()} for k in METRIC_NAMES
                  if k not in COUNTS}  # counts are the run's, never renamed
        self.metric_names = {k: None if len(names) > 1 else names.pop() for k, names in agreed.items()}
        # the span term's count is logged where some teacher teaches groups of several tokens (across tokenizers)
        spans = {names["span_tokens"] for names in self.metric_groups.values() if names.get("span_tokens")}
        self.metric_names.update(span_tokens=spans.pop() if spans else None)
        self.collective = dict.fromkeys(members, False)

    @classmethod
    def from_config(cls, cfg, tokenizer) -> RoutedTeachers:
        configs = teacher_configs(cfg)
        kinds = {name: teacher_kind(own) for name, own in configs.items()}
        members = {name: TEACHERS[kinds[name]].from_config(own, tokenizer) for name, own in configs.items()}
        weights = mixture_weights(cfg.teacher_weights) if cfg.teacher_weights is not None else None
        return cls(members, kinds, loss_overrides(cfg), row_routing(cfg), weights)

    def _sources(self, index: int, sources: list) -> list:
        """Of the run's sources (the training sources, then any eval source), those whose samples may go to teacher
        `index`: its own, routed per source; every one, routed per record or mixed."""
        if self.routing is None or self.routing.sources is None:
            return sources
        trained = len(self.routing.sources)
        return [s for k, s in enumerate(sources) if self.routing.teacher_of(k if k < trained else None) == index]

    def check(self, tokenizer, sources, env) -> None:
        """Each teacher against the sources routed to it (one on ranks of its own, on its block of them); one that
        reads its own tokens, routed per record, against its own records of them (the others hold none of its
        tokens)."""
        for index, (name, member) in enumerate(self.members.items()):
            own = self._sources(index, sources)
            if member.retokenize is not None and self.routing is not None and self.routing.key is not None:
                own = [Rows(s, np.flatnonzero(self.routing.teachers(None, s) == index)) for s in own]
            member.check(tokenizer, own, env.for_teacher(name))

    def load(self, env, dtype: torch.dtype) -> None:
        for name, member in self.members.items():
            member.load(env, dtype)
            self.collective[name] = (self.kinds[name] == "teacher_ranks"  # its ranks await every student rank's
                                     or self.kinds[name] in MODEL_TEACHERS and env.world_size > 1)

    def verify(self, device: torch.device) -> None:
        for member in self.members.values():
            member.verify(device)

    def describe(self) -> list[str]:
        """Each teacher's own lines, under its name and the sources routed to it."""
        lines = []
        for index, (name, member) in enumerate(self.members.items()):
            routed = (f"weight {self.weights[index]:.3g} on every token" if self.weights is not None else
                      f"the records whose {self.routing.key} names it" if self.routing.sources is None else
                      f"{sum(t == index for t in self.routing.sources)} source(s)")
            runs = "every micro-batch (collective)" if self.collective[name] else "its rows only"
            lines += [f"teacher {name!r} ({self.kinds[name]}; {routed}, runs on {runs}"
                      + "".join(f", {k} {v}" for k, v in self.overrides[name].items()) + "):",
                      *("  " + line for line in member.describe())]
        return lines

    def _runs(self, index: int, name: str, count: int) -> bool:
        """Whether a teacher runs for a micro-batch where `count` of its rows are routed to it: where it has rows,
        and a collective one everywhere but in a mixture that gives it weight 0 (on every rank alike)."""
        return count > 0 or (self.collective[name] and (self.weights is None or self.weights[index] > 0))

    def _routes(self, batch: MicroBatch) -> list[Route]:
        """Each teacher's rows of a micro-batch: its route, or in a mixture the whole batch (no rows for a teacher
        of weight 0)."""
        if self.weights is None:
            return batch.routes
        return [Route(batch, None, batch.trainable_tokens if w > 0 else 0) for w in self.weights]

    def begin(self, batches: list[MicroBatch]) -> None:
        for index, (name, member) in enumerate(self.members.items()):
            routes = [self._routes(b)[index] for b in batches]
            member.begin([r.batch for r in routes if self._runs(index, name, r.count)])

    @contextmanager
    def targets(self, batch: MicroBatch):
        """Each teacher that runs here makes its targets over its own samples now; all are entered while the loss
        runs (a collective teacher's head is gathered on every rank alike)."""
        made = [(index, name, route, self.members[name].targets(route.batch) if self._runs(index, name, route.count)
                 else nullcontext())
                for index, (name, route) in enumerate(zip(self.members, self._routes(batch)))]
        with ExitStack() as stack:
            parts = []
            for index, name, route, context in made:
                targets = stack.enter_context(context)
                if route.count:
                    share = 1.0 if self.weights is None else self.weights[index]
                    parts.append(Part(index, route.rows, targets, self.overrides[name], share,
                                      owns_rows=self.weights is None or not parts))
            yield RoutedTargets(parts, len(self.members))

    def signalled(self, device: torch.device) -> torch.Tensor:
        """How many of the teachers' own ranks got a stop signal (`teacher.Teacher.signalled`): each teacher on ranks
        of its own gives its flags, the others none."""
        return sum(member.signalled(device) for member in self.members.values())

    def close(self, preempted: bool = False) -> None:
        for member in self.members.values():
            member.close(preempted)


def open_teachers(cfg, tokenizer) -> Teacher:
    """The run's teacher: several routed ones when the config names `teachers`, else the one it names."""
    return RoutedTeachers.from_config(cfg, tokenizer) if cfg.teachers is not None else open_teacher(cfg, tokenizer)
