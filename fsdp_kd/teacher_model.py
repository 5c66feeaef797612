"""The teacher kinds that run a teacher model: `live` (the student's tokenizer, on the student's own micro-batch) and
`cross_tokenizer` (its own tokenizer, on its own tokens of each sample). Both load the frozen teacher_model sharded
(`ModelSpec`) and make each micro-batch's targets in two steps, its final hidden states at the rows the loss reads
(`hidden`) and the loss's targets from those and its head (`targets_from`): the teacher on ranks of its own
(`teacher_ranks.RemoteTeacher`) runs the same two steps on either side of the wire, and the cache build
(`cache_teacher`) stores what the first gives.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .errors import ConfigError
from .cross_tokenizer import TeacherTokenization, TokenBytes, shared_vocabulary
from .cross_vocab import ALIGNED_METRIC_NAMES, CrossVocabTargets, VocabMap, topk_in_student_vocabulary
from .data import MicroBatch
from .distill import hidden_at_targets
from .heads import probe_head
from .targets import LiveTargets
from .loading import LoadSpec, load_sharded
from .records import IGNORE_INDEX
from .sharding import ShardedCausalLM, TeacherSharding, parameter_count
from .tokenizer_compat import shared_vocab_size, tokenizer_or_error


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

    def close(self) -> None:
        pass


class LiveTeacher(ModelTeacher):
    """The teacher with the student's tokenizer, run on the student's own micro-batch; the loss's vocabulary is the
    one its tokenizer shares with the student's."""
    metric_names: dict[str, str | None] = {}  # the loss's own: a live teacher gives every metric
    own_tokenizer = ""
    retokenize = None

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

    def __init__(self, spec: ModelSpec, tokenizer, uld_weight: float, uld_topk: int):
        super().__init__(spec, None)
        self.uld_weight, self.uld_topk, self._vocab_map = uld_weight, uld_topk, None
        teacher_tokenizer = spec.tokenizer()
        try:
            student, teacher = TokenBytes.of(tokenizer), TokenBytes.of(teacher_tokenizer)
        except (AttributeError, ValueError) as e:
            raise ConfigError(f"key cross_tokenizer: both tokenizers must be fast (tokenizer.json) to be aligned by "
                              f"bytes ({e})") from None
        self.shared = shared_vocabulary(student, teacher)
        self.retokenize = TeacherTokenization(student, teacher, teacher_tokenizer)
        self.vocab_size, self.teacher_vocab_size = len(tokenizer), len(teacher_tokenizer)
        self.aligned_share: float | None = None

    @classmethod
    def from_config(cls, cfg, tokenizer) -> CrossTokenizerTeacher:
        return cls(ModelSpec.of(cfg), tokenizer, cfg.uld_weight, cfg.uld_topk)

    def vocab_map(self, device: torch.device) -> VocabMap:
        if self._vocab_map is None:  # once per run; its chunk layouts are found once per block shape
            self._vocab_map = VocabMap(torch.from_numpy(self.shared.student_ids).to(device),
                                       torch.from_numpy(self.shared.teacher_ids).to(device),
                                       self.vocab_size, self.teacher_vocab_size)
        return self._vocab_map

    def check(self, tokenizer, sources, env, samples: int = 1000) -> None:
        """Counts, over the first source's first samples, the trained tokens that align one to one."""
        trained = aligned = 0
        for i in range(min(samples, len(sources[0]))):
            sample = sources[0][i]
            for target, position in zip(sample.targets, sample.teacher_positions):
                trained += target != IGNORE_INDEX
                aligned += target != IGNORE_INDEX and position >= 0
        self.aligned_share = aligned / max(trained, 1)

    def vocabulary_lines(self) -> list[str]:
        return [f"cross-tokenizer: {self.shared.describe()}; {self.aligned_share:.1%} of the trained tokens of the "
                f"first source's first samples align one to one with a teacher token (the rest get the CE term alone); "
                f"KD = D over the shared tokens + {self.uld_weight:g}·ULD over {self.uld_topk} unshared"]

    def teacher_batch(self, batch: MicroBatch) -> MicroBatch:
        return batch.teacher

    @contextmanager
    def targets_from(self, hidden: torch.Tensor, batch: MicroBatch, gathered_head):
        """Its hidden states and next tokens at the positions aligned with the student's target rows, and which rows
        have one (`aligned`)."""
        with gathered_head() as head:
            yield CrossVocabTargets(hidden, head, batch.teacher.target_ids, self.vocab_map(hidden.device),
                                    self.uld_weight, self.uld_topk, batch.aligned)

    def in_loss_vocabulary(self, topk: tuple[torch.Tensor, ...], batch: MicroBatch) -> tuple[torch.Tensor, ...]:
        """The teacher's top-k rows (its vocabulary) as a cache of the student's vocabulary stores them (a micro-batch
        of masked copies alone has no rows, and `teacher_rows` no columns)."""
        if not topk:
            return topk
        return topk_in_student_vocabulary(*topk, batch.aligned, self.vocab_map(topk[0].device))


MODEL_TEACHERS = {"live": LiveTeacher, "cross_tokenizer": CrossTokenizerTeacher}


def model_kind(cross_tokenizer: bool) -> str:
    """Which `MODEL_TEACHERS` entry runs the teacher_model: with the student's tokenizer, or (cross_tokenizer) its
    own."""
    return "cross_tokenizer" if cross_tokenizer else "live"


def model_teacher(cfg, tokenizer) -> LiveTeacher | CrossTokenizerTeacher:
    """The teacher_model as this rank, the teacher ranks or a cache build runs it."""
    return MODEL_TEACHERS[model_kind(cfg.cross_tokenizer)].from_config(cfg, tokenizer)
