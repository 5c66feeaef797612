"""Run the frozen teacher once over a run's data and store its distributions: `python -m fsdp_kd.cache_teacher`.

    torchrun --nproc_per_node N -m fsdp_kd.cache_teacher --config run.yaml --teacher_cache DIR \\
        [--cache_mode topk --cache_k 64 | --cache_mode sampled --cache_n 32 | --cache_mode hidden]

It takes train.py's keys: the same `pretrain` (whose tokenizer tokenizes the data), `teacher_model`, data keys and
`kd_temperature` as the training run that will read the cache, and the teacher is sharded as in training
(`teacher_offload` included). Every sample of every training source and of `eval_dataset` is cached, so the run may
hold out or mix them as it likes. Work goes in chunks of samples; each rank writes its share of a chunk as one part
file, so a killed build, started again with the same arguments, keeps its finished chunks; a stop signal (SIGTERM,
or `preempt_signal`) ends it at the next chunk boundary with exit code 75, as it does training (`preemption`). See `teacher_cache` for
the format and docs/teacher_cache.md for when to cache.
"""

from __future__ import annotations

import os
import sys
import time

import torch
import torch.distributed as dist

from .config import TrainConfig, data_sources, parse_config
from .errors import ConfigError
from .data import collate, collate_packed, eval_shards, host_values
from .cross_tokenizer import ALIGNMENT_VERSION
from .cross_vocab import renormalized_side
from .dtypes import resolve_dtype
from .distributed import DistEnv, all_gather_object, all_reduce_sum, exit_process, report_failure, run_ranked
from .loss import LossSpec
from .preemption import Preempted, StopSignals
from .teacher_cache import (CACHE_MODES, META_FILE, CacheMeta, is_part, part_name, save_head, teacher_identity,
                            teacher_rows, write_part)
from .teacher_model import model_teacher
from .tokenized import TOKEN_SETTINGS, open_sources, tokenizer_fingerprint
from .tokenizer_compat import padding_id, student_tokenizer

class CacheBuilder:
    """Checks everything cheap (keys, tokenizers, data, an existing cache) before the teacher loads; then builds."""

    def __init__(self, cfg: TrainConfig, env: DistEnv, stop: StopSignals | None = None):
        self.cfg, self.env = cfg, env
        self.stop = stop or StopSignals(cfg.preempt_signal)
        self.log = print if env.is_main else (lambda *a, **k: None)
        for key in ("teacher_cache", "teacher_model"):
            if not getattr(cfg, key):
                raise ConfigError(f"key {key}: cache_teacher needs {key} (the cache's directory; the teacher to run)")
        self.directory = os.path.expanduser(cfg.teacher_cache)
        if os.path.exists(self.directory) and not os.path.isdir(self.directory):
            raise ConfigError(f"key teacher_cache: {self.directory} is a file, not a directory")
        self.tokenizer = student_tokenizer(cfg.pretrain, cfg.trust_remote_code, cfg.tokenizer_chat_template,
                                           cfg.apply_chat_template)
        self.teacher = model_teacher(cfg, self.tokenizer)
        self.vocab_size = self.teacher.vocab_size
        retokenize, across = self.teacher.retokenize, self.teacher.across_tokenizers
        if across:
            check_cacheable_across(self.teacher.shared)
        train, held_out = open_sources(data_sources(cfg), self.tokenizer, env.local_rank, all_gather_object, self.log,
                                       retokenize)
        self.sources = list({s.samples_sha256: s for s in train + ([held_out] if held_out else [])}.values())
        offsets = [0]
        for source in self.sources:
            offsets.append(offsets[-1] + len(source))
        self.offsets = offsets
        self.mode = CACHE_MODES[cfg.cache_mode]
        slots = self.mode.slots(getattr(cfg, self.mode.slots_key) if self.mode.slots_key else None,
                                self.teacher.teacher_vocab_size,
                                _hidden_size(cfg.teacher_model, cfg.trust_remote_code) if self.mode.keeps_head else 0)
        self.meta = CacheMeta(
            mode=cfg.cache_mode, slots=slots, temperature=cfg.kd_temperature, vocab_size=self.vocab_size,
            log_p_dtype=cfg.cache_log_p_dtype, tokenizer=tokenizer_fingerprint(self.tokenizer),
            sources=[{"path": s.path, "samples_sha256": s.samples_sha256, "samples": len(s), "offset": o}
                     for s, o in zip(self.sources, offsets)],
            settings={k: getattr(cfg, k) for k in TOKEN_SETTINGS}, teacher=teacher_identity(cfg.teacher_model),
            samples_per_chunk=cfg.cache_chunk_samples,
            teacher_tokenizer=tokenizer_fingerprint(retokenize.tokenizer) if across else None,
            alignment=ALIGNMENT_VERSION if across else None,
            teacher_context=list(retokenize.rendering) if retokenize is not None and retokenize.rendering else None,
            teacher_vocab_size=self.teacher.teacher_vocab_size if across else None,
            hidden_dtype=cfg.cache_hidden_dtype if self.mode.keeps_head else CacheMeta.hidden_dtype)
        self.already_complete = self._adopt_existing()

    def _adopt_existing(self) -> bool:
        """A directory with a cache of the same kind resumes it (or is already complete); any other cache there is
        refused, never overwritten."""
        existed = all_gather_object(os.path.exists(os.path.join(self.directory, META_FILE)))[0]  # before any write
        if not existed:
            if self.env.is_main:
                os.makedirs(self.directory, exist_ok=True)
                self.meta.save(self.directory)
            all_gather_object(None)  # the directory exists before any rank writes into it
            return False
        old = CacheMeta.load(self.directory)
        differ = [k for k in ("mode", "slots", "temperature", "vocab_size", "log_p_dtype", "tokenizer", "sources",
                              "teacher", "samples_per_chunk", "teacher_tokenizer", "alignment", "hidden_dtype",
                              "teacher_context")
                  if getattr(old, k) != getattr(self.meta, k)]
        if differ:
            raise ConfigError(f"key teacher_cache: {self.directory} holds a cache built with other {', '.join(differ)}; "
                              "choose a new directory (an existing cache is never overwritten)")
        return old.complete

    def run(self) -> None:
        cfg, env = self.cfg, self.env
        if self.already_complete:
            self.log(f"teacher cache {self.directory} is already complete; nothing to do")
            return
        started = time.time()
        teacher = self.teacher
        teacher.load(env, resolve_dtype(cfg.param_dtype, env.device))
        teacher.verify(env.device)
        if self.mode.keeps_head:
            with teacher.root.gathered_head() as head:
                if env.is_main:
                    self.meta.head = save_head(self.directory, head, teacher.teacher_vocab_size)
        spec = LossSpec(temperature=cfg.kd_temperature, vocab_chunk=cfg.kd_vocab_chunk,
                        token_chunk=cfg.kd_token_chunk, chunk_budget_mb=cfg.kd_chunk_budget_mb)
        total = self.offsets[-1]
        chunks = range(-(-total // self.meta.samples_per_chunk))
        done = set(all_gather_object(sorted(self._finished_chunks()))[0])  # rank 0's view, for every rank
        self.log(f"caching the teacher's {cfg.cache_mode} distribution ({self.mode.describe(self.meta.slots)}, "
                 f"τ = {cfg.kd_temperature:g}) for {total} samples in {len(chunks)} chunks"
                 + (f"; {len(done)} chunks already done" if done else ""))
        tokens = written = 0
        progress = _progress(len(chunks), len(done), env.is_main)
        for chunk in chunks:
            if chunk in done:
                continue
            if all_reduce_sum(host_values([self.stop.flag], env.device)).item():  # once a chunk: a sync is cheap here
                progress.close()
                self.log(f"cache build stopped on a stop signal ({self.stop.received or 'on another rank'}) before "
                         f"chunk {chunk + 1} of {len(chunks)}; the finished chunks are kept: run the same command to "
                         "go on from them")
                raise Preempted(f"cache build stopped before chunk {chunk}")
            positions = range(chunk * self.meta.samples_per_chunk, min((chunk + 1) * self.meta.samples_per_chunk, total))
            samples = [self._sample(i) for i in positions]
            generator = torch.Generator(env.device).manual_seed(cfg.seed * 1_000_003 + chunk * env.world_size + env.rank)
            keys, rows = [], []
            for group in eval_shards(samples, cfg.micro_train_batch_size, env.rank, env.world_size):
                batch = (collate_packed(group, cfg.max_len, padding_id(self.tokenizer)) if cfg.packing_samples
                         else collate(group, padding_id(self.tokenizer))).to(env.device)
                hidden = teacher.hidden(batch)
                with teacher.root.gathered_head() as head:
                    cached = teacher_rows(hidden, head, spec, teacher.teacher_vocab_size, cfg.cache_mode,
                                          self.meta.slots, generator)
                cached = teacher.in_loss_vocabulary(cached, batch)
                lengths = {(s.source, s.row): s.trainable_tokens for s in group}
                counts = [lengths[key] for key in batch.sample_keys]
                keys += batch.sample_keys
                rows += list(zip(*(column.split(counts) for column in cached)))
            indices = [self.offsets[self._source_index(sha)] + row for sha, row in keys]
            written += write_part(self.directory, part_name(chunk, env.rank, env.world_size), indices, rows, self.meta)
            tokens += sum(r[0].shape[0] for r in rows)
            progress.update(1)
        progress.close()
        totals = all_reduce_sum(torch.tensor([float(tokens), float(written)], dtype=torch.float64,
                                             device=env.device)).tolist()
        if env.is_main:  # the whole cache's figures, earlier runs' parts included
            self.meta.complete, self.meta.seconds = True, round(time.time() - started, 1)
            self.meta.tokens, self.meta.bytes = _tokens_and_bytes(self.directory)
            self.meta.save(self.directory)
        if dist.is_initialized():
            dist.barrier()  # no rank returns before the cache is marked complete: its caller may train from it next
        self.log(f"teacher cache {self.directory}: {int(totals[0])} tokens cached in {time.time() - started:.1f} s, "
                 f"{totals[1] / max(totals[0], 1):.1f} bytes per token")

    def _source_index(self, sha: str) -> int:
        return next(i for i, s in enumerate(self.sources) if s.samples_sha256 == sha)

    def _sample(self, position: int):
        k = max(i for i, o in enumerate(self.offsets[:-1]) if o <= position)
        return self.sources[k][position - self.offsets[k]]

    def _finished_chunks(self) -> set[int]:
        """Chunks whose parts are all on disk, from a complete set of some world size (a resumed build may run on
        another number of ranks). Leftover temporary files of a killed build are removed."""
        parts: dict[tuple[int, int], set[int]] = {}
        for name in os.listdir(self.directory):
            if name.endswith(".tmp") and self.env.is_main:
                os.remove(os.path.join(self.directory, name))
            elif is_part(name):
                _, chunk, rank, _, world = name[:-len(".safetensors")].split("-")
                parts.setdefault((int(chunk), int(world)), set()).add(int(rank[1:]))
        return {chunk for (chunk, world), ranks in parts.items() if len(ranks) == world}


def check_cacheable_across(shared) -> None:
    """A top-k cache across tokenizers keeps each side's rest bucket as it is. Where one vocabulary is all shared its
    rest is empty, and the live loss renormalizes the other side over the shared tokens (`VocabMap.renormalized`);
    the cache's student side cannot yet, and reverse KL would be infinite there. Refused before the teacher loads."""
    side = renormalized_side(len(shared.student_ids), shared.student_size, shared.teacher_size)
    if side is not None:
        whole = "student" if side == "teacher" else "teacher"
        raise ConfigError(f"key cross_tokenizer: every token of the {whole}'s vocabulary is in the other's, a case a "
                          "teacher cache across tokenizers does not handle yet; train with the live teacher "
                          "(teacher_model, no teacher_cache)")


def _hidden_size(teacher_model: str, trust_remote_code: bool) -> int:
    """The teacher's hidden size, from its config (before the model loads): what a hidden-state cache stores."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(teacher_model, trust_remote_code=trust_remote_code)
    return config.get_text_config().hidden_size


def _tokens_and_bytes(directory: str) -> tuple[int, int]:
    from safetensors import safe_open

    tokens = size = 0
    for name in os.listdir(directory):
        if is_part(name):
            with safe_open(os.path.join(directory, name), framework="pt") as f:
                tokens += int(f.get_tensor("offsets")[-1])
            size += os.path.getsize(os.path.join(directory, name))
    return tokens, size


class _NoProgress:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, initial: int, shown: bool):
    if not shown:
        return _NoProgress()
    from tqdm import tqdm  # a dependency of transformers and datasets

    return tqdm(total=total, initial=initial, unit="chunk", desc="caching teacher", file=sys.stdout)


# The keys a cache build reads (its --help lists them); train.py's other keys are accepted and ignored, so one config
# serves both.
KEYS = ("pretrain", "teacher_model", "cross_tokenizer", "trust_remote_code", "attn_implementation", "param_dtype",
        "teacher_context_key", "teacher_system_prompt",
        "teacher_sharding_strategy", "hsdp_shard_size", "teacher_offload", "teacher_resident",
        "dataset", "dataset_split", "eval_dataset", "eval_split", "input_key", "output_key", "input_template",
        "apply_chat_template", "tokenizer_chat_template", "multiturn", "pretrain_mode", "packing_samples",
        "skip_bad_rows", "max_len", "max_samples", "max_eval_samples", "data_cache_dir",
        "micro_train_batch_size", "seed", "kd_temperature", "kd_vocab_chunk", "kd_token_chunk", "kd_chunk_budget_mb",
        "teacher_cache", "cache_mode", "cache_k", "cache_n", "cache_log_p_dtype", "cache_hidden_dtype",
        "cache_chunk_samples",
        "dist_timeout_minutes", "preempt_signal")


def main(argv: list[str] | None = None) -> int:
    from .usage import KEYS_NOTE, asks_for_help, key_sections, print_help, render

    argv = sys.argv[1:] if argv is None else argv
    if asks_for_help(argv):
        return print_help(render(
            "torchrun --nproc_per_node N -m fsdp_kd.cache_teacher --config FILE.yaml --teacher_cache DIR "
            "[--key value ...]",
            "Runs the frozen teacher once over a training run's data and stores its distributions in teacher_cache, "
            "for train.py --teacher_cache to train from with no teacher model loaded.", key_sections(KEYS),
            "It takes train.py's keys, so one --config serves both; give it the pretrain (whose tokenizer tokenizes "
            "the data), data keys and kd_temperature of the run that will read the cache. It uses the keys below and "
            "ignores the rest. " + KEYS_NOTE))
    try:
        cfg = parse_config(argv)
    except ConfigError as e:
        return report_failure(e, int(os.environ.get("RANK", "0")))
    stop = StopSignals(cfg.preempt_signal)
    with stop.installed():
        return run_ranked(lambda env: CacheBuilder(cfg, env, stop).run(), cfg.dist_timeout_minutes)


if __name__ == "__main__":
    exit_process(main())
