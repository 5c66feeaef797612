"""A decoding loop with no host sync per token: a static KV cache, the prompts prefilled in one forward, sampling and
stop tracking on the device, the stop flags read every `check_every` tokens.

transformers' `generate` reads a stop flag on the host after every token and grows its cache by concatenation, so
its cost per token is a host round trip plus Python overhead whatever the model's size. Here the cache is
transformers' `StaticCache` (allocated once for prompt + response, so every decode forward has the same shapes and
`torch.compile` / CUDA graphs can replay it), positions and the cache index are device tensors stepped in place, and
the only reads of device values are the stop checks and the final tokens.

Sampling is transformers' own arithmetic (fp32 logits, temperature, then top-p over the sorted distribution, then
`torch.multinomial`'s exponential race `argmax(p / q)` with `q ~ Exp(1)`, which is how multinomial draws one sample),
with one random stream per row: row r's noise comes from its own generator, so what a row draws does not depend on
which rows it is batched with, and a row seeded as transformers' `generate` was for a batch of one draws the same
tokens (the test of exactness). multinomial itself is not called: it reads its input on the host to validate it.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch

from .data import to_device

# With `torch.compile`, cache lengths are rounded up to a multiple of this, so that generations of different prompt
# widths share compiled graphs instead of recompiling for every width.
COMPILED_CACHE_ROUNDING = 64


@dataclass(frozen=True)
class Sampling:
    temperature: float  # 0: greedy
    top_p: float  # 1: off
    vocab_size: int | None  # head rows from it on are padding: never sampled (NoPaddedRows)


@dataclass(frozen=True)
class Decoding:
    new_tokens: int  # forwards after the prefill, at most: every row gets this many tokens unless all rows stop
    stop_ids: tuple[int, ...]
    pad_id: int  # what a row emits after its stop token
    check_every: int = 16  # tokens between reads of the stop flags (each read is one host sync)
    compile: bool = False  # torch.compile the decode forward (on CUDA with CUDA graphs: "reduce-overhead")


def next_tokens(logits: torch.Tensor, sampling: Sampling, noise: torch.Tensor | None,
                generators: list[torch.Generator]) -> torch.Tensor:
    """[rows] token ids drawn from `logits` [rows, vocab] (fp32, changed in place) as transformers samples them:
    padded head rows removed, then greedy, or temperature, top-p and one Exp(1) draw per vocabulary entry from each
    row's own generator into `noise` [rows, vocab]."""
    if sampling.vocab_size is not None:
        logits[:, sampling.vocab_size:] = -math.inf
    if sampling.temperature == 0:
        return logits.argmax(-1)
    if sampling.temperature != 1.0:
        logits = logits / sampling.temperature
    if sampling.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        remove = sorted_logits.softmax(-1).cumsum(-1) <= 1 - sampling.top_p
        remove[..., -1:] = False
        logits = logits.masked_fill(remove.scatter(1, order, remove), -math.inf)
    probs = logits.softmax(-1)
    for row, generator in zip(noise, generators):
        row.exponential_(generator=generator)
    return (probs / noise).argmax(-1)


def row_generators(seeds: list[int], device: torch.device) -> list[torch.Generator]:
    """One random stream per row, seeded on the host: no device value is read."""
    return [torch.Generator(device=device).manual_seed(seed) for seed in seeds]


def _forward(lm, ids, mask, positions, cache_position, cache, keyword: str):
    """One forward over the static cache (passed as `keyword`, `cache_keyword`'s): the logits of each row's last
    position only."""
    return lm(input_ids=ids, attention_mask=mask, position_ids=positions, cache_position=cache_position,
              **{keyword: cache}, use_cache=True, logits_to_keep=1).logits[:, -1]


def cache_keyword(model_class) -> str:
    """The forward's KV-cache argument: `cache` in transformers 5, `past_key_values` before (an unknown keyword
    would land in **kwargs and decode without the cache)."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


_COMPILED = {}  # device type -> the compiled `_forward`


def _compiled_forward(device: torch.device):
    if device.type not in _COMPILED:
        mode = "reduce-overhead" if device.type == "cuda" else None  # CUDA graphs on CUDA
        _COMPILED[device.type] = torch.compile(_forward, mode=mode, dynamic=False)
    return _COMPILED[device.type]


def cache_length(width: int, new_tokens: int, compiled: bool) -> int:
    """Slots for the prompt and every new token; rounded up when compiled (COMPILED_CACHE_ROUNDING)."""
    length = width + new_tokens
    return -(-length // COMPILED_CACHE_ROUNDING) * COMPILED_CACHE_ROUNDING if compiled else length


@torch.no_grad()
def decode(lm, ids: torch.Tensor, mask: torch.Tensor, decoding: Decoding, sampling: Sampling,
           generators: list[torch.Generator], all_done=None) -> torch.Tensor:
    """[rows, n] new tokens after the left-padded prompts `ids` [rows, width] (`mask` 1 on real tokens), both on the
    device; n <= `decoding.new_tokens` (the loop ends early once every row has emitted a stop id, seen at a check).
    A row's tokens after its first stop id are `pad_id`. `all_done(flags)` turns this rank's stop flags into the
    bool every rank must agree on, where ranks must run the same number of forwards (`on_policy.must_step_together`);
    by default the rank's own `flags.all()`."""
    from transformers import StaticCache

    rows, width = ids.shape
    device = ids.device
    length = cache_length(width, decoding.new_tokens, decoding.compile)
    cache = StaticCache(config=lm.config, max_cache_len=length)
    full_mask = torch.ones(rows, length, dtype=mask.dtype, device=device)
    full_mask[:, :width] = mask
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)  # as transformers' generate numbers them
    keyword = cache_keyword(type(lm))
    prefill = _forward(lm, ids, full_mask, positions, torch.arange(width, device=device), cache, keyword)
    logits = prefill.to(torch.float32, copy=True)
    forward = _compiled_forward(device) if decoding.compile else _forward
    stop_ids = to_device(torch.tensor(decoding.stop_ids, dtype=torch.long), device)
    tokens = torch.full((rows, decoding.new_tokens), decoding.pad_id, dtype=torch.long, device=device)
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    noise = torch.empty_like(logits) if sampling.temperature > 0 else None
    position = positions[:, -1:] + 1
    cache_position = torch.full((1,), width, dtype=torch.long, device=device)
    check = all_done or (lambda flags: bool(flags.all()))
    made = decoding.new_tokens
    for t in range(decoding.new_tokens):
        token = next_tokens(logits, sampling, noise, generators).masked_fill(done, decoding.pad_id)
        tokens[:, t] = token
        done |= torch.isin(token, stop_ids)
        if t == decoding.new_tokens - 1 or ((t + 1) % decoding.check_every == 0 and check(done)):
            made = t + 1
            break
        logits = forward(lm, token[:, None], full_mask, position, cache_position, cache, keyword)
        logits = logits.to(torch.float32, copy=True)
        position += 1
        cache_position += 1
    return tokens[:, :made]
