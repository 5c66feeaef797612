"""The run's samples as the training loop takes them: this rank's micro-batches of each step, collated padded or
packed, and the held-out samples for evaluation."""

from __future__ import annotations

from dataclasses import dataclass

from .data import (EpochOrder, MicroBatch, SampleTable, StepSampler, collate, collate_packed, eval_shards,
                   padding_efficiency)
from .records import Sample


@dataclass
class RunData:
    """The training table (under its `order` per epoch, cut into this rank's micro-batches by `sampler`), the
    held-out samples, and how samples become a micro-batch: padded with `pad_id`, or packed into rows of `max_len`."""
    train: SampleTable
    held_out: list[Sample]
    order: EpochOrder
    sampler: StepSampler
    pad_id: int
    packing: bool
    max_len: int
    # several teachers (`routing`): per teacher, whether it reads its own tokens, so each micro-batch carries each
    # one's `Route` (with its tokens laid out where it does)
    teachers: tuple[bool, ...] = ()

    def collate(self, samples: list[Sample]) -> MicroBatch:
        if self.packing:
            return collate_packed(samples, self.max_len, self.pad_id, self.teachers)
        return collate(samples, self.pad_id, self.teachers)

    def step_samples(self, step: int) -> list[list[Sample]]:
        """This rank's micro-batches of samples for a global step."""
        epoch, step_in_epoch = divmod(step, self.sampler.steps_per_epoch)
        return [[self.train[i] for i in idx] for idx in self.sampler.indices(epoch, step_in_epoch)]

    def eval_groups(self, micro_batch_size: int, rank: int, world_size: int) -> list[list[Sample]]:
        """This rank's micro-batches of the held-out samples (`eval_shards`)."""
        return eval_shards(self.held_out, micro_batch_size, rank, world_size)

    def report_padding(self, total_steps: int, log, max_steps: int = 200) -> None:
        """The share of computed token slots that are real tokens, over this rank's first steps (at most 200)."""
        steps = range(min(self.sampler.steps_per_epoch, total_steps, max_steps))
        groups = [group for step in steps for group in self.step_samples(step)]
        unpacked = padding_efficiency([collate(g, self.pad_id) for g in groups])
        if not self.packing:
            log(f"padding: {unpacked:.1%} of computed token slots are real tokens")
            return
        packed = [collate_packed(g, self.max_len, self.pad_id) for g in groups]
        rows = sum(b.input_ids.shape[0] for b in packed)
        log(f"packing: {sum(map(len, groups)) / rows:.2f} samples per row; {padding_efficiency(packed):.1%} "
            f"of computed token slots are real tokens (without packing: {unpacked:.1%})")
