"""The teacher kinds that run a teacher model: `live` (the student's tokenizer, on the student's own micro-batch),
`cross_tokenizer` (its own tokenizer, on its own tokens of each sample) and `privileged` (the student's tokenizer, on
its own rendering of each sample with context the student does not see). Both load the frozen teacher_model sharded
(`ModelSpec`) and make each micro-batch's targets in two steps, its final hidden states at the rows the loss reads
(`hidden`) and the loss's targets from those and its head (`targets_from`): the teacher on ranks of its own
(`teacher_ranks.RemoteTeacher`) runs the same two steps on either side of the wire, and the cache build
(`cache_teacher`) stores what the first gives.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from .errors import ConfigError
from .cross_tokenizer import LEFT_OUT, TeacherTokenization, TokenBytes, in_spans, shared_vocabulary, span_taught
from .cross_vocab import ALIGNED_METRIC_NAMES, CrossVocabTargets, VocabMap, prefix_joins, topk_in_student_vocabulary
from .data import MicroBatch
from .distill import hidden_at_targets
from .heads import probe_head
from .targets import LiveTargets
from .loading import LoadSpec, load_sharded
from .privileged import PrivilegedTokenization, TeacherContext
from .preemption import no_signal
from .records import IGNORE_INDEX
from .sharding import ShardedCausalLM, TeacherSharding, parameter_count
from .tokenizer_compat import shared_vocab_size, tokenizer_or_error


_SPAN_TAUGHT = -100  # `check`'s mark of a position the span term teaches (no `LEFT_OUT` code)


@dataclass(frozen=True)
class ModelSpec:
    """The teacher_model, and how it loads and shards."""
    path: str
    load: LoadSpec
    sharding: TeacherSharding

    @classmethod
    def of(cls, cfg) -> ModelSpec:
        return cls(cfg.teacher_model, LoadSpec.of(cfg), TeacherSharding.of(cfg))

    def tokenizer(self):
        return tokenizer_or_error(self.path, "teacher_model", self.load.trust_remote_code)

    def max_positions(self) -> int | None:
        """The teacher's max_position_embeddings (None where its config has none): how many of its tokens a sample
        may hold."""
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(self.path, trust_remote_code=self.load.trust_remote_code)
        return getattr(config.get_text_config(), "max_position_embeddings", None)


class ModelTeacher:
    """What the two kinds share: the model loaded over `teacher_vocab_size` and its head checked, its forward on a
    micro-batch, and the start-up summary's line, where `own_tokenizer` says which kind it is. A kind gives
    `vocabulary_lines`, and `targets_from` as a context manager: the head is gathered only while the loss runs."""
    metric_names: dict[str, str | None]
    metric_groups: dict[str, dict[str, str | None]] = {}  # one teacher
    own_tokenizer: str
    distills = True
    vocab_size: int
    teacher_vocab_size: int
    retokenize: TeacherTokenization | None

    def __init__(self, spec: ModelSpec | None, root: ShardedCausalLM | None):
        self.spec, self.root = spec, root  # root: a model sharded already (a benchmark's), else `load` reads it

    def check(self, tokenizer, sources, env) -> None:
        pass

    def load(self, env, dtype: torch.dtype) -> None:
        self.root = load_sharded(self.spec.path, self.spec.load, env, dtype, self.spec.sharding, "teacher",
                                 self.teacher_vocab_size)

    def verify(self, device: torch.device) -> None:
        probe_head(self.root, "teacher", self.teacher_vocab_size, device)

    def describe(self) -> list[str]:
        return [f"teacher {parameter_count(self.root) / 1e6:.2f}M params{self.own_tokenizer}: frozen, FSDP2 full "
                f"shard, CPU offload {'on' if self.spec.sharding.offload else 'off'}", *self.vocabulary_lines()]

    def vocabulary_lines(self) -> list[str]:
        raise NotImplementedError

    def teacher_batch(self, batch: MicroBatch) -> MicroBatch:
        """What the teacher runs on for the student's micro-batch."""
        return batch

    @torch.no_grad()
    def hidden(self, batch: MicroBatch) -> torch.Tensor:
        """Its final hidden states at the rows the loss reads, without gradients."""
        return self.root(hidden_at_targets, self.teacher_batch(batch))

    def begin(self, batches: list[MicroBatch]) -> None:
        pass

    def targets(self, batch: MicroBatch):
        return self.targets_from(self.hidden(batch), batch, self.root.gathered_head)

    def targets_from(self, hidden: torch.Tensor, batch: MicroBatch, gathered_head):
        raise NotImplementedError

    def signalled(self, device: torch.device) -> torch.Tensor:
        return no_signal(device)

    def close(self, preempted: bool = False) -> None:
        pass


class LiveTeacher(ModelTeacher):
    """The teacher with the student's tokenizer, run on the student's own micro-batch; the loss's vocabulary is the
    one its tokenizer shares with the student's."""
    metric_names: dict[str, str | None] = {}  # the loss's own: a live teacher gives every metric
    own_tokenizer = ""
    retokenize = None
    across_tokenizers = False  # a teacher cache records no teacher tokenizer of its own

    def __init__(self, spec: ModelSpec | None, vocab_size: int, root: ShardedCausalLM | None = None):
        super().__init__(spec, root)
        self.vocab_size = self.teacher_vocab_size = vocab_size

    @classmethod
    def from_config(cls, cfg, tokenizer) -> LiveTeacher:
        spec = ModelSpec.of(cfg)
        return cls(spec, shared_vocab_size(tokenizer, spec.tokenizer()))

    def vocabulary_lines(self) -> list[str]:
        return [f"shared vocabulary {self.vocab_size}"]

    @contextmanager
    def targets_from(self, hidden: torch.Tensor, batch: MicroBatch, gathered_head):
        with gathered_head() as head:
            yield LiveTargets(hidden, head)

    def in_loss_vocabulary(self, topk: tuple[torch.Tensor, ...], batch: MicroBatch) -> tuple[torch.Tensor, ...]:
        """The teacher's top-k rows as a cache stores them: its vocabulary is the loss's already."""
        return topk


class CrossTokenizerTeacher(ModelTeacher):
    """A teacher with its own tokenizer (`cross_tokenizer: true`), run live on its own tokens: the data's samples get
    the teacher's tokens and their alignment when they are tokenized (`retokenize`), each micro-batch carries them
    (`MicroBatch.teacher`, laid out at collate time), and the loss compares the two models where the tokenizations
    align one token to one (`cross_vocab`; docs/cross_tokenizer.md). The loss's vocabulary is the student's
    tokenizer, the teacher's head is read over its own."""
    metric_names = ALIGNED_METRIC_NAMES
    own_tokenizer = ", its own tokenizer"
    across_tokenizers = True

    def __init__(self, spec: ModelSpec, tokenizer, uld_weight: float, uld_topk: int, span_weight: float = 1.0,
                 prefix_buckets: bool = False):
        super().__init__(spec, None)
        self.uld_weight, self.uld_topk, self.span_weight, self._vocab_map = uld_weight, uld_topk, span_weight, None
        teacher_tokenizer = spec.tokenizer()
        try:
            student, teacher = TokenBytes.of(tokenizer), TokenBytes.of(teacher_tokenizer)
        except (AttributeError, ValueError) as e:
            raise ConfigError(f"key cross_tokenizer: both tokenizers must be fast (tokenizer.json) to be aligned by "
                              f"bytes ({e})") from None
        self.shared = shared_vocabulary(student, teacher)
        self.joins = ((prefix_joins(student.spelled, student.regular, self.shared.student_ids),
                       prefix_joins(teacher.spelled, teacher.regular, self.shared.teacher_ids)) if prefix_buckets
                      else (None, None))
        self.retokenize = TeacherTokenization(student, teacher, teacher_tokenizer, spec.max_positions(),
                                              spans=span_weight > 0)
        self.vocab_size, self.teacher_vocab_size = len(tokenizer), len(teacher_tokenizer)
        self.aligned_share: float | None = None
        self.left_out_shares: dict[str, float] = {}

    @classmethod
    def from_config(cls, cfg, tokenizer) -> CrossTokenizerTeacher:
        return cls(ModelSpec.of(cfg), tokenizer, cfg.uld_weight, cfg.uld_topk, cfg.span_weight, cfg.prefix_buckets)

    def vocab_map(self, device: torch.device) -> VocabMap:
        if self._vocab_map is None:  # once per run; its chunk layouts are found once per block shape
            self._vocab_map = VocabMap(torch.from_numpy(self.shared.student_ids).to(device),
                                       torch.from_numpy(self.shared.teacher_ids).to(device),
                                       self.vocab_size, self.teacher_vocab_size, *self.joins)
        return self._vocab_map

    def check(self, tokenizer, sources, env, samples: int = 1000) -> None:
        """Counts, over up to `samples` samples spread evenly over each source, the trained tokens that align one
        to one, those in groups the span term teaches, and why the others get no teacher term
        (`cross_tokenizer.LEFT_OUT`)."""
        positions = []
        for source in sources:
            for i in np.unique(np.linspace(0, len(source) - 1, num=min(samples, len(source))).astype(np.int64)):
                sample = source[int(i)]
                trained = np.asarray(sample.targets) != IGNORE_INDEX
                at = np.asarray(sample.teacher_positions)
                spans = span_taught(sample.teacher_spans, trained)
                positions.append(np.where(in_spans(spans, len(trained)), _SPAN_TAUGHT, at)[trained])
        positions = np.concatenate(positions) if positions else np.zeros(0, np.int64)
        trained = max(len(positions), 1)
        self.aligned_share = float((positions >= 0).sum()) / trained
        self.span_share = float((positions == _SPAN_TAUGHT).sum()) / trained
        self.left_out_shares = {why: float((positions == code).sum()) / trained for code, why in LEFT_OUT.items()}

    def vocabulary_lines(self) -> list[str]:
        left_out = ", ".join(f"{why.replace('_', ' ')} {share:.1%}" for why, share in self.left_out_shares.items())
        return [f"cross-tokenizer: {self.shared.describe()}; of the trained tokens of a sample of every source, "
                f"{self.aligned_share:.1%} align one to one with a teacher token and {self.span_share:.1%} are in "
                f"groups of several tokens the span term teaches (the rest get the CE term alone: {left_out}); "
                f"KD = D over the shared tokens{self._joined()} + {self.uld_weight:g}·ULD over {self.uld_topk} "
                f"unshared + {self.span_weight:g}·span term"]

    def _joined(self) -> str:
        """With prefix buckets, how many of each side's tokens join a shared token's bucket."""
        if self.joins[0] is None:
            return ""
        student, teacher = ((joins >= 0).sum() for joins in self.joins)
        return f" (with {student} of the student's and {teacher} of the teacher's tokens that start with them)"

    def teacher_batch(self, batch: MicroBatch) -> MicroBatch:
        """Its tokens of the batch: its rows aligned with the student's, then those of the groups the span term
        teaches (none with the span term off: `teacher_fields`)."""
        return batch.teacher

    @contextmanager
    def targets_from(self, hidden: torch.Tensor, batch: MicroBatch, gathered_head):
        """Its hidden states and next tokens at the positions aligned with the student's target rows, and which rows
        have one (`aligned`), then at the positions predicting its tokens of each group of several (`spans`)."""
        with gathered_head() as head:
            yield CrossVocabTargets(hidden, head, batch.teacher.target_ids, self.vocab_map(hidden.device),
                                    self.uld_weight, self.uld_topk, batch.aligned,
                                    batch.spans if self.span_weight > 0 else None,  # off: none laid out, none run
                                    self.span_weight)

    def in_loss_vocabulary(self, topk: tuple[torch.Tensor, ...], batch: MicroBatch) -> tuple[torch.Tensor, ...]:
        """The teacher's top-k rows (its vocabulary) as a cache of the student's vocabulary stores them (a micro-batch
        of masked copies alone has no rows, and `teacher_rows` no columns): those aligned with the student's rows,
        without the span rows after them, which a cache does not keep."""
        if not topk:
            return topk
        rows = batch.aligned.shape[0]
        return topk_in_student_vocabulary(*(x[:rows] for x in topk), batch.aligned, self.vocab_map(topk[0].device))


class PrivilegedTeacher(LiveTeacher):
    """The teacher with the student's tokenizer, reading each sample with context the student does not see
    (`teacher_context_key`, `teacher_system_prompt`; `privileged`): its own token rows of each sample, stored with the
    data as a teacher of another tokenizer's are (`retokenize`) and laid out in each micro-batch (`MicroBatch.teacher`),
    whose response tokens are the student's one to one. So every trained position has the teacher's distribution
    over the whole vocabulary, and the loss is the live teacher's."""

    def __init__(self, spec: ModelSpec | None, vocab_size: int, retokenize: PrivilegedTokenization,
                 root: ShardedCausalLM | None = None):
        super().__init__(spec, vocab_size, root)
        self.retokenize = retokenize

    @classmethod
    def from_config(cls, cfg, tokenizer) -> PrivilegedTeacher:
        context = TeacherContext.of(cfg)
        context.check_template(tokenizer, cfg.pretrain)
        spec = ModelSpec.of(cfg)
        return cls(spec, shared_vocab_size(tokenizer, spec.tokenizer()), PrivilegedTokenization(context, tokenizer))

    def vocabulary_lines(self) -> list[str]:
        return [*super().vocabulary_lines(), self.retokenize.context.describe()]

    def teacher_batch(self, batch: MicroBatch) -> MicroBatch:
        return batch.teacher


MODEL_TEACHERS = {"live": LiveTeacher, "cross_tokenizer": CrossTokenizerTeacher, "privileged": PrivilegedTeacher}


def model_kind(cross_tokenizer: bool, privileged: bool) -> str:
    """Which `MODEL_TEACHERS` entry runs the teacher_model: with the student's tokenizer, or (cross_tokenizer) its
    own, or (privileged) the student's, on its own rendering of each sample with context."""
    return "cross_tokenizer" if cross_tokenizer else "privileged" if privileged else "live"


def model_teacher(cfg, tokenizer) -> LiveTeacher | CrossTokenizerTeacher:
    """The teacher_model as this rank, the teacher ranks or a cache build runs it."""
    return MODEL_TEACHERS[model_kind(cfg.cross_tokenizer, bool(TeacherContext.of(cfg)))].from_config(cfg, tokenizer)
