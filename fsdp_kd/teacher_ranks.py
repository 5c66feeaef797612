"""The teacher on ranks of its own (`teacher_ranks: N`): the last N ranks of the job run the teacher, the others train
the student, and the teacher's final hidden states at the trained positions go from one to the other.

Per micro-batch a student rank sends its teacher rank the layout of what the teacher runs on (its ids, mask, packing
and target rows: a few bytes per token), and gets back the teacher's final hidden states at those rows, in the
teacher's compute dtype (bf16 on GPUs: 2·H bytes per trained token, against 4·V for fp32 logits). The student ranks
hold the teacher's output head (`ShardedHead`, sharded like the student) and compute the exact loss from those
hidden states in the chunked kernel, as a co-located run does: the same numbers, from a teacher that needs no room on
the student's devices and whose forward overlaps the student's step.

The wire, per micro-batch, between student rank s and teacher rank `split.teacher_of(s)`, in order:
  header   int64[8] on the host, over the gloo control group: kind (batch or stop), rows B, width T, target rows N,
           varlen boundaries C, packed, real tokens, longest sequence
  layout   int64[2 or 4, B, T] on the device, over the inputs group: ids, mask (and segments, positions when packed)
  rows     int64[N + C] on the device, over the inputs group: target rows, then the varlen boundaries
  hidden   [N + 1, H] in the teacher's compute dtype, back to the student over the default group: the hidden states,
           then a row of the teacher rank's stop flag (1 once it got a stop signal, `preemption`), which the student
           rank adds to its step's counts, so the student ranks stop and save as on a signal of their own
Point-to-point messages between two ranks arrive in the order they were sent, so nothing else is needed to match
them. A student rank sends every micro-batch of a step as the step starts (`RemoteTeacher.begin`); its teacher rank
runs them as they come, up to `SENDS_AHEAD` micro-batches ahead of the student, and each student rank ends the run
with a stop. The teacher ranks run their forwards together (FSDP over their own mesh), one micro-batch of each student
rank they serve in turn; the student ranks all run as many micro-batches as each other, so the teacher ranks do too.

With several teachers (`teachers`), each that sets its own `teacher_ranks` has a block of ranks of its own, after
the student ranks in the order of `teachers` (`distributed.split_world`): the wire is the same between a student rank
and each block, and a teacher rank serves its own block's teacher (`Split.name`).

A failure on either side ends the job as any rank's failure does (`distributed.report_failure`): the failing rank
exits, and torchrun stops the others, who are blocked in a receive.
"""

from __future__ import annotations

from collections import deque
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM

from .data import MicroBatch
from .distill import hidden_at_targets
from .distributed import DistEnv, Split
from .dtypes import resolve_dtype
from .heads import head_config
from .kernel import Head
from .preemption import StopSignals, no_signal
from .loading import (Checkpoint, check_head_covers_vocab, local_model_path, names_match, parameters_on_meta,
                      read_own_slices, safetensors_index, split_load_refused)
from .teacher_model import ModelTeacher, model_teacher

SENDS_AHEAD = 2  # hidden states a teacher rank may have in flight (to all the student ranks it serves): its lead
_BATCH, _STOP, _PREEMPTED = 1, 0, 2  # a header's kind: a micro-batch, or the last, after a run that ended or stopped
_HEADER = 8


def students_checked(split: Split) -> None:
    """Collective over every rank: the student ranks have checked their input (config, tokenizers, data), so the
    teacher ranks may start loading. Bad input is then found, and said once, before any heavy work on either side."""
    dist.barrier(group=split.control)


def send_layout(batch: MicroBatch, dst: int, split: Split) -> list:
    """Starts sending what the teacher runs on; returns the sends' (work, tensor) pairs, to be waited on later."""
    packed = batch.segment_ids is not None
    header = torch.tensor([_BATCH, *batch.input_ids.shape, batch.target_rows.numel(), batch.cu_seq_lens.numel(),
                           int(packed), batch.real_tokens, batch.max_seq_len], dtype=torch.long)
    layout = torch.stack([batch.input_ids, batch.attention_mask]
                         + ([batch.segment_ids, batch.position_ids] if packed else []))
    rows = torch.cat([batch.target_rows, batch.cu_seq_lens.long()])
    return [(dist.isend(header, dst, group=split.control), header),
            (dist.isend(layout, dst, group=split.inputs), layout), (dist.isend(rows, dst, group=split.inputs), rows)]


def send_stop(dst: int, split: Split, preempted: bool) -> None:
    dist.send(torch.tensor([_PREEMPTED if preempted else _STOP] + [0] * (_HEADER - 1), dtype=torch.long), dst,
              group=split.control)


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def receive_layout(src: int, split: Split, device: torch.device) -> tuple[MicroBatch, int] | bool:
    """The next micro-batch a student rank sent, as the teacher runs it, and the bytes it took; or, once that
    student rank is done, whether a stop signal stopped it (`preemption`)."""
    header = torch.empty(_HEADER, dtype=torch.long)
    dist.recv(header, src, group=split.control)
    kind, rows_, width, targets, boundaries, packed, real, longest = header.tolist()
    if kind != _BATCH:
        return kind == _PREEMPTED
    layout = torch.empty((4 if packed else 2, rows_, width), dtype=torch.long, device=device)
    rows = torch.empty(targets + boundaries, dtype=torch.long, device=device)
    dist.recv(layout, src, group=split.inputs)
    dist.recv(rows, src, group=split.inputs)
    segments, positions = (layout[2], layout[3]) if packed else (None, None)
    batch = MicroBatch(layout[0], layout[1], None, segments, positions, target_rows=rows[:targets],
                       real_tokens=real, cu_seq_lens=rows[targets:].int(), max_seq_len=longest)
    return batch, nbytes(header, layout, rows)


class ShardedHead:
    """A teacher's output head alone, on ranks that do not run its body (the student ranks): sharded over their mesh
    like the student, each rank reading only its rows from the teacher's safetensors, and gathered only while the
    loss reads it. Its logit transforms (soft-cap, scale) come from the teacher's config, as `heads.output_head`
    reads them off a whole model.

    Made in two steps: the constructor checks (on the architecture built on the meta device: no memory) that the
    head covers the vocabulary and that its tensors are in the files, before anything loads; `load` shards and
    reads it."""

    def __init__(self, path: str, trust_remote_code: bool, env: DistEnv, dtype: torch.dtype, vocab_size: int):
        from transformers import AutoConfig

        path = local_model_path(path, env)
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        with parameters_on_meta():
            lm = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
        check_head_covers_vocab(lm, vocab_size, "teacher")
        self.linear = lm.get_output_embeddings()
        names = {id(p): name for name, p in lm.named_parameters()}  # a tied head is named as the embedding
        self.in_files = {leaf: names[id(p)] for leaf, p in self.linear.named_parameters()}
        self.files = safetensors_index(path)
        # what the teacher ranks' `load_sharded` would refuse, refused here before they start
        if self.files is None or not names_match(lm, Checkpoint(self.files)):
            raise split_load_refused("teacher", path, self.files)
        self.fields = head_config(lm.config)
        self.hidden_size, self.dtype = self.linear.weight.shape[1], dtype

    def load(self, env: DistEnv) -> None:
        self.linear.requires_grad_(False)
        fully_shard(self.linear, mesh=env.mesh)
        self.linear.to_empty(device=env.device)
        params = dict(self.linear.named_parameters())
        read_own_slices({self.in_files[leaf]: params[leaf] for leaf in params}, Checkpoint(self.files), self.dtype)

    @contextmanager
    def gathered(self):
        """The head (a loss `Head`), gathered from the shards for this block only."""
        self.linear.unshard()
        try:
            yield Head(self.linear.weight, getattr(self.linear, "bias", None), **self.fields)
        finally:
            self.linear.reshard()


class RemoteTeacher:
    """`teacher_ranks`: the teacher_model runs on ranks of its own, as `model` (the kind a co-located run would use,
    `teacher_model.LiveTeacher` or `CrossTokenizerTeacher`, whose model is not on this rank); this student rank holds
    its head, sends it each micro-batch's layout and makes the targets from the hidden states that come back."""
    distills = True
    metric_groups: dict[str, dict[str, str | None]] = {}  # one teacher

    def __init__(self, model: ModelTeacher, param_dtype: str):
        self.model, self.param_dtype = model, param_dtype
        self.vocab_size, self.teacher_vocab_size = model.vocab_size, model.teacher_vocab_size
        self.retokenize = model.retokenize
        self.env = self.head = self.teacher = None  # set by `check`: this rank's place, the head, its teacher rank
        self.sends: list = []
        self.waiting: deque = deque()  # (batch, its teacher batch): sent, hidden states not yet received
        self.receiving: deque = deque()  # (batch, hidden buffer, receive work): posted, at most SENDS_AHEAD
        self.flags: list[torch.Tensor] = []  # the teacher rank's stop flag with each micro-batch of the step

    @classmethod
    def from_config(cls, cfg, tokenizer) -> RemoteTeacher:
        return cls(model_teacher(cfg, tokenizer), cfg.param_dtype)

    @property
    def metric_names(self) -> dict[str, str | None]:
        return self.model.metric_names

    def check(self, tokenizer, sources, env: DistEnv) -> None:
        """Among the last of the student ranks' checks (the trainer runs the teacher's last; the teacher ranks start
        loading after them, `students_checked`): the teacher's head, on `env.split`, this teacher's block of ranks."""
        self.model.check(tokenizer, sources, env)
        self.env, self.teacher, spec = env, env.split.teacher_of(env.global_rank), self.model.spec
        self.head = ShardedHead(spec.path, spec.load.trust_remote_code, env,
                                resolve_dtype(self.param_dtype, env.device), self.teacher_vocab_size)

    def load(self, env: DistEnv, dtype: torch.dtype) -> None:
        """The teacher's head, sharded over the student ranks; its body loads on the teacher ranks meanwhile."""
        self.head.load(env)

    def verify(self, device: torch.device) -> None:
        pass  # the teacher ranks verify the head on the whole model (`serve`)

    def describe(self) -> list[str]:
        return [f"teacher on ranks of its own: {self.env.split.describe()}; FSDP2 full shard over the teacher "
                f"ranks, CPU offload {'on' if self.model.spec.sharding.offload else 'off'}; hidden states of the "
                f"trained positions come back in {str(self.head.dtype).removeprefix('torch.')} "
                f"({self.head.hidden_size} per token), and the student ranks hold the teacher's head, sharded",
                *self.model.vocabulary_lines()]

    def _sent(self) -> None:
        """Waits for this rank's sends so far (long done once their hidden states are back), and lets them go."""
        for work, _ in self.sends:
            work.wait()
        self.sends = []

    def begin(self, batches: list[MicroBatch]) -> None:
        self._sent()
        for batch in batches:
            teacher_batch = self.model.teacher_batch(batch)
            self.sends += send_layout(teacher_batch, self.teacher, self.env.split)
            self.waiting.append((batch, teacher_batch))
        self._post_receives()

    def _post_receives(self) -> None:
        while self.waiting and len(self.receiving) < SENDS_AHEAD:
            batch, teacher_batch = self.waiting.popleft()
            hidden = torch.empty(teacher_batch.target_rows.numel() + 1, self.head.hidden_size,
                                 dtype=self.head.dtype, device=self.env.device)
            self.receiving.append((batch, hidden, dist.irecv(hidden, self.teacher)))

    def targets(self, batch: MicroBatch):
        expected, hidden, work = self.receiving.popleft() if self.receiving else (None, None, None)
        if expected is not batch:
            raise RuntimeError("teacher_ranks: targets were asked for a micro-batch other than the next one begun")
        work.wait()
        self._post_receives()
        self.flags.append(hidden[-1, :1].clone())  # not a view: the step would otherwise hold every buffer
        return self.model.targets_from(hidden[:-1], batch, self.head.gathered)

    def signalled(self, device: torch.device) -> torch.Tensor:
        """Whether the teacher rank got a stop signal by this step's micro-batches: the flag rows of their hidden
        states, on the device, taken once per step."""
        flags, self.flags = self.flags, []
        return torch.cat(flags).double().amax().reshape(1) if flags else no_signal(device)

    def close(self, preempted: bool = False) -> None:
        """Tells the teacher rank that this student rank is done, and whether a stop signal stopped it: it returns
        once all of its student ranks are. The hidden states of a step stopped midway are received first: the
        teacher rank sends them."""
        self._post_receives()
        while self.receiving:
            self.receiving.popleft()[2].wait()
            self._post_receives()
        self._sent()
        send_stop(self.teacher, self.env.split, preempted)


def serve(model: ModelTeacher, env: DistEnv, dtype: torch.dtype, stop: StopSignals) -> dict[str, int]:
    """A teacher rank's run once the student ranks' checks have passed (`students_checked`): load the teacher
    (`model`, in the compute `dtype`) sharded over the teacher ranks, then run each micro-batch its student ranks
    send and send back the hidden states, each with a row of this rank's `stop` flag, until all of them have said stop.
    Returns (and the first teacher rank prints) what it served: micro-batches, trained tokens, bytes received and
    sent, and whether the student ranks stopped on a stop signal."""
    split = env.split
    model.load(env, dtype)
    model.verify(env.device)
    root = model.root
    students = split.served_by(env.global_rank)
    sends: deque = deque()
    served = tokens = received = sent = 0
    with torch.no_grad():
        while True:
            batches = [receive_layout(s, split, env.device) for s in students]
            if all(isinstance(b, bool) for b in batches):
                preempted = any(batches)
                break
            if any(isinstance(b, bool) for b in batches):
                raise RuntimeError(f"teacher_ranks: student ranks {students} stopped after different numbers of "
                                   "micro-batches")
            for student, (batch, wire_bytes) in zip(students, batches):
                hidden = root(hidden_at_targets, batch).to(dtype)  # what the student ranks expect, whatever the family
                hidden = torch.cat([hidden, hidden.new_full((1, hidden.shape[1]), stop.flag)])
                root.reshard_everything()  # a tied head's root would otherwise stay gathered: no loss reads it here
                sends.append((dist.isend(hidden, student), hidden))
                served, tokens = served + 1, tokens + hidden.shape[0] - 1
                received, sent = received + wire_bytes, sent + nbytes(hidden)
                while len(sends) > SENDS_AHEAD:
                    sends.popleft()[0].wait()
    for work, _ in sends:
        work.wait()
    if env.is_main:  # its own counts: every teacher rank serves alike
        logits = 4 * model.teacher_vocab_size
        of = "" if split.name is None else f" of teacher {split.name!r}"
        print(f"teacher ranks{of}: served {served} micro-batches per rank; teacher rank {env.rank}: {tokens} trained "
              f"tokens, {sent / max(tokens, 1):.0f} bytes of hidden states sent per trained token (fp32 logits: "
              f"{logits}, {logits * tokens / max(sent, 1):.1f}x), {received / max(tokens, 1):.0f} bytes of inputs "
              "received", flush=True)
    return {"micro_batches": served, "tokens": tokens, "received": received, "sent": sent, "preempted": preempted}
