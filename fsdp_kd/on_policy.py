"""On-policy distillation (GKD): for a share λ of the micro-batches the student writes the responses, and the teacher's
distribution on the student's own tokens is the target.

Off-policy KD trains on responses the student would never write, so at inference it meets contexts it never saw.
Here a micro-batch chosen as on-policy (probability `on_policy_ratio`, drawn per step and micro-batch index from the
run's seed, alike on every rank) keeps its prompts and gets new responses sampled from the current student, and then
trains like any micro-batch, against the live teacher (a cache cannot grade text written after it was built). The
CE term is off on these micro-batches unless `on_policy_ce` is set, since it would only reinforce the student's own
samples; the KD term keeps its weight `kd_coef`.

Generation runs with the student gathered once for the whole `generate` (every FSDP unit unsharded, resharded after),
with a KV cache and left-padded prompts, so the layers are not gathered again for every token. Each rank seeds its
sampling from (seed, step, micro-batch, rank): a resumed run writes exactly the same responses. Ids past the
tokenizer (a padded head's rows) are never sampled.
"""

from __future__ import annotations

import dataclasses
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.distributed.fsdp import FSDPModule
from transformers import LogitsProcessor, LogitsProcessorList

from .data import to_device
from .distributed import side_size
from .records import IGNORE_INDEX, Sample


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int
    temperature: float
    top_p: float
    stop_ids: tuple[int, ...]  # every token that ends a response (all EOS ids, the template's end of turn)
    max_len: int  # prompt + response never exceed it
    pad_id: int
    gather_once: bool = True  # the whole student gathered for the whole generate; False: FSDP re-gathers per token
    vocab_size: int | None = None  # the tokenizer's length: head rows from it on are padding, never sampled


def stop_token_ids(tokenizer, generation_config=None) -> tuple[int, ...]:
    """Every id that ends a response: the tokenizer's EOS, the generation config's EOS ids (Qwen lists two), and
    the special token the chat template closes an assistant turn with (Phi-3's `<|end|>`, ChatML's `<|im_end|>`)."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    eos = getattr(generation_config, "eos_token_id", None)
    ids.update(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
    if getattr(tokenizer, "chat_template", None):
        turn = tokenizer.apply_chat_template([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                                             tokenize=False)
        special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
        after = tokenizer(turn[turn.rindex("a") + 1:], add_special_tokens=False)["input_ids"]
        ids.update(next(([i] for i in after if i in special), []))
    return tuple(sorted(ids))


def prompt_of(sample: Sample) -> list[int]:
    """The tokens before the sample's last trained span: the prompt its last response answers."""
    start = max(i for i, t in enumerate(sample.targets) if t != IGNORE_INDEX and
                (i == 0 or sample.targets[i - 1] == IGNORE_INDEX))
    return sample.input_ids[:start + 1]


def with_response(prompt: list[int], response: list[int]) -> Sample:
    """A sample that trains on `response` after `prompt`."""
    ids = prompt + response
    targets = [IGNORE_INDEX] * len(ids)
    targets[len(prompt) - 1:len(ids) - 1] = response
    return Sample(ids, targets)


@contextmanager
def gathered(root, every_unit: bool = True):
    """The student gathered for a stretch of forwards that `root`'s own forward does not wrap (`lm.generate`).

    The root unit (embeddings, norm, head, which FSDP gathers in the root's forward) is gathered for the whole block.
    With `every_unit`, so are the decoder layers: FSDP would otherwise gather each layer again (and free it) at every
    forward, i.e. for every generated token. That per-token way is slower but holds one layer at a time, for a
    student too big to hold whole (`generate_gather_once: false`). Everything is resharded at the end."""
    root(lambda lm: None)  # a root forward that computes nothing: FSDP's lazy init, which must come from the root
    units = [m for m in root.modules() if isinstance(m, FSDPModule)]
    held = units if every_unit else [root]
    for unit in held:
        unit.unshard()
        unit.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for unit in held:
            unit.set_reshard_after_forward(unit in root.resharding_units, recurse=False)
        for unit in units:
            unit.reshard()


@torch.no_grad()
def generate(root, prompts: list[list[int]], settings: GenerationSettings, seed: int,
             device: torch.device) -> tuple[list[list[int]], float]:
    """(responses, seconds): each prompt's sampled continuation, cut after its first stop token (kept) or at
    `max_new_tokens` (or where prompt + response reaches max_len). Left-padded batch, KV cache, no gradients."""
    started = time.perf_counter()
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), settings.pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    new_tokens = max(1, min(settings.max_new_tokens, settings.max_len - width))
    lm, was_training = root.lm, root.lm.training
    lm.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), gathered(root, settings.gather_once):
            torch.manual_seed(seed)
            out = lm.generate(input_ids=to_device(ids, device), attention_mask=to_device(mask, device),
                              generation_config=generation_config(settings, new_tokens),
                              logits_processor=LogitsProcessorList([NoPaddedRows(settings.vocab_size)]),
                              synced_gpus=must_step_together(settings))
    finally:
        lm.train(was_training)
    responses = []
    for row in out[:, width:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in settings.stop_ids), len(row))
        responses.append(row[:cut])
    return responses, time.perf_counter() - started


def must_step_together(settings: GenerationSettings) -> bool:
    """Whether every rank must run as many forwards as the longest generation of any rank (transformers'
    `synced_gpus`): when FSDP gathers layers per token (`gather_once` false), each forward is a collective, and a
    rank whose responses have all ended must keep joining them. Gathered once, a forward is local, and a rank that is
    done goes on without a per-token all-reduce. Said explicitly: transformers would guess it from an attribute FSDP
    happens to set."""
    return not settings.gather_once and side_size() > 1


class NoPaddedRows(LogitsProcessor):
    """No probability for the output head's rows at or past the tokenizer's length: heads are padded (Qwen2.5's has
    151,936 rows for 151,665 tokens), and a padded row is no token. transformers runs the processors it is given
    before temperature and top-p, so the nucleus is taken over tokens only. One fill of a fixed slice per token, in
    place (generate hands the processors its own fp32 copy of the logits): no mask built, no host sync."""

    def __init__(self, vocab_size: int | None):
        self.vocab_size = vocab_size

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.vocab_size is not None:
            scores[:, self.vocab_size:] = -math.inf
        return scores


def generation_config(settings: GenerationSettings, new_tokens: int):
    """Exactly the run's sampling: plain temperature and nucleus sampling (no top-k, no penalties), whatever the
    model's own generation_config.json suggests."""
    from transformers import GenerationConfig

    sample = settings.temperature > 0
    return GenerationConfig(max_new_tokens=new_tokens, do_sample=sample, temperature=settings.temperature if sample
                            else None, top_p=settings.top_p if sample else None, top_k=0 if sample else None,
                            eos_token_id=list(settings.stop_ids), pad_token_id=settings.pad_id, use_cache=True)


@dataclass
class GenerationStats:
    micro_batches: int = 0  # on-policy micro-batches of this rank's step
    sequences: int = 0
    tokens: int = 0
    seconds: float = 0.0


class OnPolicy:
    """Chooses a step's on-policy micro-batches and replaces their responses with the student's own."""

    def __init__(self, ratio: float, seed: int, settings: GenerationSettings, rank: int, device: torch.device,
                 retokenize=None):
        self.ratio, self.seed, self.settings, self.rank, self.device = ratio, seed, settings, rank, device
        self.retokenize = retokenize  # a teacher's own token rows (`cross_tokenizer.TeacherTokenization`, `privileged`)

    def chosen(self, step: int, index: int) -> bool:
        """Whether micro-batch `index` of `step` is on-policy: a draw from (seed, step, index), so every rank agrees
        (their generations start with a collective gather) and a resumed run draws the same."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step * 1009 + index)
        return bool(torch.rand(1, generator=g) < self.ratio)

    def rewrite(self, root, step: int, groups: list[list[Sample]]) -> tuple[list[list[Sample]], list[bool],
                                                                            GenerationStats]:
        stats = GenerationStats()
        flags = [self.chosen(step, i) for i in range(len(groups))]
        out = []
        for i, (group, on) in enumerate(zip(groups, flags)):
            if not on:
                out.append(group)
                continue
            prompts = [prompt_of(s) for s in group]
            seed = ((self.seed * 1_000_003 + step) * 1009 + i) * 131 + self.rank
            responses, seconds = generate(root, prompts, self.settings, seed, self.device)
            samples = [with_response(p, r) for p, r in zip(prompts, responses)]
            if self.retokenize is not None:  # host string work, about a millisecond a sample (docs/cross_tokenizer.md)
                samples = [dataclasses.replace(s, **self.retokenize.rewritten(old, s))
                           for old, s in zip(group, samples)]
            out.append(samples)
            stats.micro_batches += 1
            stats.sequences += len(group)
            stats.tokens += sum(map(len, responses))
            stats.seconds += seconds
        return out, flags, stats


def on_policy_metrics(metrics: dict, kl_on: float, kd_tokens_on: float, on_batches: float, batches: float,
                       sequences: float, generated: float, seconds: float, world_size: int) -> dict[str, float]:
    """The on-policy share of micro-batches, what generation did, and the KL on and off the student's own text, each
    per token with a KD term (`kd_tokens_on` of them on-policy), as the step's KL is (`step_metrics.KD_ROW_MEANS`)."""
    out = {"on_policy_share": on_batches / max(batches, 1.0),
           "generated_len": generated / max(sequences, 1.0),
           "gen_tokens_per_sec": generated / max(seconds / world_size, 1e-9) if generated else 0.0}
    kl_key = next((k for k in ("kl", "kl_buckets", "kl_estimate", "kl_shared_buckets") if k in metrics), None)
    if kl_key is not None:
        tokens_off = metrics["kd_tokens"] - kd_tokens_on
        if kd_tokens_on:
            out["kl_on_policy"] = kl_on / kd_tokens_on
        if tokens_off:
            out["kl_off_policy"] = (metrics[kl_key] * metrics["kd_tokens"] - kl_on) / tokens_off
    return out
