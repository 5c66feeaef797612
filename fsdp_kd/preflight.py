"""Everything that can reject a run cheaply, before either model is loaded: paths, the output directory, the
checkpoint to resume, and the training data (tokenized once, memory-mapped, ordered by epoch).

The trainer calls these in order; each failure is one line naming the key and the fix. They read the run's paths
(`RunPaths`) and its data (`DataSpec`), each made from the config by one function here.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

from . import checkpoint as ckpt
from .config import TrainConfig, data_sources
from .data import Concatenated, EpochOrder, RoutedTo, Rows, SampleTable
from .distributed import DistEnv, all_gather_object
from .errors import ConfigError
from .loading import check_model_dir
from .records import Sample, check_data_path, looks_local
from .routing import RowRouting, row_routing
from .run_log import METRICS_FILE
from .tokenized import DataSources, TokenizedDataset, open_sources


@dataclass(frozen=True)
class RunPaths:
    """What a run reads and writes: its models by config key (and whether their own code may run), its data
    sources, and its output directories."""
    models: dict[str, str | None]  # pretrain, teacher_model
    trust_remote_code: bool
    sources: DataSources
    save_path: str
    ckpt_path: str


def run_paths(cfg: TrainConfig) -> RunPaths:
    return RunPaths({"pretrain": cfg.pretrain, "teacher_model": cfg.teacher_model}, cfg.trust_remote_code,
                    data_sources(cfg), cfg.save_path, cfg.resolved_ckpt_path())


def check_paths(paths: RunPaths) -> None:
    """The model directories, data files and output paths exist and are what they should be: one line if not."""
    for key, path in paths.models.items():
        if path and looks_local(path) and not os.path.isdir(os.path.expanduser(path)):
            raise ConfigError(f"key {key}: model directory not found: {path}")
        if path and os.path.isdir(os.path.expanduser(path)):
            check_model_dir(os.path.expanduser(path), key, paths.trust_remote_code)
    for path in paths.sources.train_paths:
        check_data_path(path, "dataset")
    if paths.sources.eval_path:
        check_data_path(paths.sources.eval_path, "eval_dataset")
    for key, path in (("save_path", paths.save_path), ("ckpt_path", paths.ckpt_path)):
        if os.path.exists(path) and not os.path.isdir(path):
            raise ConfigError(f"key {key}: {path} is a file, not a directory; choose a directory path")


ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")


def check_packing(paths: RunPaths, packing_samples: bool) -> None:
    """Packed samples are kept apart by attention masks and positions; a recurrent layer (Mamba, linear attention)
    carries its state from one packed sample into the next, and HF takes no sample boundaries for it. So packing is
    refused for a model that has one."""
    if not packing_samples:
        return
    from transformers import AutoConfig

    for key, path in paths.models.items():
        if not path or not os.path.isdir(os.path.expanduser(path)):
            continue
        config = AutoConfig.from_pretrained(os.path.expanduser(path), trust_remote_code=paths.trust_remote_code)
        settings = config.to_dict()
        other_layers = set(settings.get("layer_types") or ()) - set(ATTENTION_LAYER_TYPES)
        if other_layers or any("mamba" in name or "ssm" in name for name in settings):
            raise ConfigError(f"key packing_samples: {key} ({config.model_type}) has recurrent layers, whose state "
                              "would carry one packed sample into the next; drop --packing_samples")


def checkpoint_to_resume(paths: RunPaths, load_checkpoint: bool, run_config: dict) -> str | None:
    """The checkpoint `--load_checkpoint` resumes (refused if its settings differ from `run_config`'s), or None; a
    save_path that holds an earlier run is refused unless it is being resumed, so no run overwrites another."""
    found = ckpt.complete_checkpoints(paths.ckpt_path) if load_checkpoint else []
    if found:
        ckpt.check_resumable(found[-1][1], run_config)
        return found[-1][1]
    if _holds_a_run(paths.save_path):
        why = (f"--load_checkpoint found no complete checkpoint in {paths.ckpt_path} to resume, and "
               if load_checkpoint else "")
        raise ConfigError(f"key save_path: {why}{paths.save_path} already holds a model or metrics from an earlier "
                          "run; choose a new save_path" + ("" if load_checkpoint else
                                                          ", or pass --load_checkpoint to resume that run"))
    return None


def _holds_a_run(save_path: str) -> bool:
    if not os.path.isdir(save_path):
        return False
    names = os.listdir(save_path)
    return METRICS_FILE in names or "config.json" in names or any(n.endswith(".safetensors") for n in names)


@dataclass(frozen=True)
class DataSpec:
    """A run's training data: its sources, the share of the training data held out for eval when there is no eval
    source, and how the sources mix into epochs of whole global batches (`data.EpochOrder`)."""
    sources: DataSources
    holdout_ratio: float  # eval_holdout_ratio
    probs: tuple[float, ...] | None  # dataset_probs; none: equal weights
    seed: int
    batch_size: int  # train_batch_size
    routing: RowRouting | None = None  # several teachers: how each sample finds its teacher


def data_spec(cfg: TrainConfig) -> DataSpec:
    probs = tuple(float(p) for p in cfg.dataset_probs.split(",")) if cfg.dataset_probs else None
    return DataSpec(data_sources(cfg), cfg.eval_holdout_ratio, probs, cfg.seed, cfg.train_batch_size,
                    row_routing(cfg))


@dataclass
class TrainingData:
    """The training table (one source, or several under an interleaved `EpochOrder`), the held-out samples, every
    tokenized source (for the teacher source's checks), each training source's fingerprint (for resume), the order."""
    train: SampleTable
    held_out: list[Sample]
    sources: list[TokenizedDataset]
    fingerprint: list[dict]
    order: EpochOrder


def open_training_data(spec: DataSpec, env: DistEnv, tokenizer, log=print, retokenize=None) -> TrainingData:
    """Each source is tokenized once per node into the cache and read memory-mapped (`tokenized`), with a teacher's
    own tokens of each sample if `retokenize` gives them (several teachers: a dict by name of those that read their
    own, each sample taking its teacher's by its route); the held-out samples are the eval data set, or a seeded
    share of the training data (`eval_holdout_ratio`)."""
    if spec.routing is not None and retokenize is not None:
        retokenize = functools.partial(spec.routing.own_tokens, tokenizations=retokenize)
    sources, eval_source = open_sources(spec.sources, tokenizer, env.local_rank, all_gather_object, log, retokenize)
    fingerprint = ckpt.data_fingerprint(sources)
    every_source = sources + ([eval_source] if eval_source is not None else [])
    if spec.routing is not None:  # each sample says its teacher, held out or not
        sources = [RoutedTo(source, spec.routing.teachers(k, source)) for k, source in enumerate(sources)]
        if eval_source is not None:
            eval_source = RoutedTo(eval_source, spec.routing.teachers(None, eval_source))
    held_out: list[Sample] = []
    if eval_source is not None:
        held_out = [eval_source[i] for i in range(len(eval_source))]
    elif spec.holdout_ratio > 0:
        splits = [_hold_out(source, spec.holdout_ratio, spec.seed) for source in sources]
        sources = [train for train, _ in splits]
        held_out = [held[i] for _, held in splits for i in range(len(held))]
        log(f"held out {len(held_out)} training samples for evaluation (eval_holdout_ratio)")
    for path, source in zip(spec.sources.train_paths, sources):
        if len(source) == 0:
            raise ConfigError(f"key dataset: {path} has no training sample left"
                              + (" after eval_holdout_ratio held some out" if spec.holdout_ratio > 0 else "")
                              + "; give it more records, or drop it from dataset")
    order = EpochOrder([len(s) for s in sources], spec.probs, spec.seed, batch_size=spec.batch_size)
    if len(sources) > 1:
        log(f"mixing, per epoch of {order.length} samples:\n" +
            "\n".join("  " + line for line in order.describe(list(spec.sources.train_paths))))
    train = sources[0] if len(sources) == 1 else Concatenated(sources)
    return TrainingData(train, held_out, every_source, fingerprint, order)


def _hold_out(table: SampleTable, ratio: float, seed: int) -> tuple[Rows, Rows]:
    """(train, held out): a seeded share of the table's rows, at least one, set aside for evaluation."""
    order = torch.randperm(len(table), generator=torch.Generator().manual_seed(seed)).numpy()
    cut = max(1, int(len(table) * ratio))
    return Rows(table, order[cut:]), Rows(table, order[:cut])
