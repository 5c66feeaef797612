"""Typed training configuration: a YAML file, `--key value` flags over it, or flags alone.

Key names follow OpenRLHF's `train_kd` wherever it had one, so its command lines move over unchanged. Every error
here is one line naming the file, line and key (or the flag) and what would fix it, and is raised before any model
or data is touched.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import types
import typing
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import yaml

from .data import ATTENTION_IMPLEMENTATIONS
from .divergences import DIVERGENCES
from .dtypes import PARAM_DTYPES
from .errors import ConfigError, require, require_choice
from .loss import CONVENTIONS, LossSpec
from .preemption import PREEMPT_SIGNALS
from .records import TokenSettings
from .routing import TEACHER_KEYS, check_routing, check_world, teacher_configs
from .schedule import LR_SCHEDULES
from .sharding import STRATEGIES, TEACHER_STRATEGIES
from .teacher_cache import CACHE_MODES, HIDDEN_DTYPES, LOG_P_DTYPES
from .tokenized import DataSources


# What replaces each DeepSpeed-only OpenRLHF flag here, for users moving their command lines over.
DEEPSPEED_REPLACEMENTS = {
    "zero_stage": "use --sharding_strategy full_shard (ZeRO-3, the default) or shard_grad_op (ZeRO-2)",
    "adam_offload": "optimizer offload is not supported; FSDP2 full sharding already splits optimizer state across ranks",
    "zpg": "ZeRO++ partition groups have no FSDP2 counterpart here; drop the flag",
    "overlap_comm": "FSDP2 overlaps communication by itself; drop the flag",
    "bf16": "use --param_dtype bf16",
    "flash_attn": "use --attn_implementation flash_attention_2",
    "deepspeed_enable_sleep": "there is no DeepSpeed engine to put to sleep; drop the flag",
    "ds_tensor_parallel_size": "tensor parallelism is not supported; drop the flag",
    "local_rank": "torchrun sets LOCAL_RANK in the environment; drop the flag",
    "ref_offload": "the teacher's offload is --teacher_offload",
}


def opt(default, help: str, section: str | None = None, choices: Collection[str] | None = None,
        must_be: str | None = None):
    """A TrainConfig field: its default and the one line `--help` prints for it (tests/test_help.py fails on a field
    without one). `section` starts a group of `--help`: this field and the ones after it, up to the next section.
    `choices`, where given, are the only values the key takes (the names of a table, taken from where the table
    lives): `{choices}` in the help lists them, and `validate` refuses any other value. `must_be` is a number's
    range, as the refusal says it: ">= 1", "> 0", "in [0, 1)" (none passes)."""
    metadata = {"help": help.format(choices=_listed(choices)) if choices else help}
    if section:
        metadata["section"] = section
    if choices:
        metadata["choices"] = tuple(choices)
    if must_be:
        metadata["must_be"] = must_be
    return dataclasses.field(default=default, metadata=metadata)


def _listed(names: Collection[str]) -> str:
    """'a, b or c'."""
    *others, last = names
    return f"{', '.join(others)} or {last}" if others else last


def _within(value: float, must_be: str) -> bool:
    """Whether a number is in a range written as `opt`'s `must_be`."""
    if must_be.startswith(">"):
        relation, bound = must_be.split()
        return value >= float(bound) if relation == ">=" else value > float(bound)
    low, high = (float(end) for end in must_be[4:-1].split(", "))
    return (low <= value if must_be[3] == "[" else low < value) and (value <= high if must_be[-1] == "]" else
                                                                      value < high)


SELF_TEACHER = "self"  # teacher_model: self


@dataclass
class TrainConfig:
    """Every key of train.py and cache_teacher. A new key is one line in its group: `name: type = opt(default,
    "what it means")`; `python train.py --help` lists it from there."""

    pretrain: str = opt("", "the student: a local HF model directory or a hub id; its tokenizer tokenizes the data",
                        section="Models")
    teacher_model: str | None = opt(None, "the teacher: a local HF model directory or a hub id with the student's "
                                          "tokenizer (or its own, with cross_tokenizer); self: a frozen copy of the "
                                          "student's initial weights (pretrain); none trains plain SFT (kd_coef must "
                                          "then be 0)")
    teacher_context_key: str | None = opt(None, "self-distillation with privileged context: a record field the "
                                                "teacher reads before the prompt (in the first user turn with a chat "
                                                "template) and the student never sees (docs/on_policy.md)")
    teacher_system_prompt: str | None = opt(None, "self-distillation with privileged context: a system turn only "
                                                  "the teacher gets (needs apply_chat_template and a template with a "
                                                  "system role)")
    cross_tokenizer: bool = opt(False, "the teacher has its own tokenizer: align the two tokenizations by bytes and "
                                       "distil over the tokens both vocabularies spell alike, plus ULD "
                                       "(docs/cross_tokenizer.md); with teachers, a teacher's own key")
    uld_weight: float = opt(1.0, "cross_tokenizer: the weight of the ULD part (tokens without a counterpart, by "
                                 "rank) beside the exact part; 0: the exact part alone")
    uld_topk: int = opt(64, "cross_tokenizer: each side's most likely tokens without a counterpart that ULD sorts")
    span_weight: float = opt(1.0, "cross_tokenizer: the weight of the span term, which teaches the tokens of groups "
                                  "of several tokens on a side (each model's chain-rule probability of the group's "
                                  "text); 0: those tokens get the CE term alone")
    prefix_buckets: bool = opt(False, "cross_tokenizer: a token without a counterpart joins the bucket of the "
                                      "longest shared token its bytes start with (each bucket: the probability that "
                                      "the text goes on with that token's bytes; exact where the other side's tokens "
                                      "are single characters), rather than the rest bucket and ULD")
    trust_remote_code: bool = opt(False, "let transformers run a model's own .py files (architectures it does not "
                                         "ship); the export copies them")
    attn_implementation: str = opt("sdpa", "the models' attention implementation: {choices}",
                                   choices=ATTENTION_IMPLEMENTATIONS)
    param_dtype: str = opt("auto", "compute dtype: {choices}; auto is bf16 on CUDA and fp32 on CPU (the student's "
                                   "master weights stay fp32)", choices=PARAM_DTYPES)
    gradient_checkpointing: bool = opt(False, "recompute the student's layer activations in the backward: less "
                                              "memory, more compute")
    sharding_strategy: str = opt("full_shard", "the student's sharding: {choices}, that is ZeRO-3, ZeRO-2 or HSDP",
                                 choices=STRATEGIES)
    hsdp_shard_size: int | None = opt(None, "hybrid_shard: ranks per shard group (replicated across groups); none: "
                                            "the ranks per node", must_be=">= 1")
    teacher_sharding_strategy: str = opt("full_shard", "the teacher's sharding: {choices}",
                                         choices=TEACHER_STRATEGIES)
    teacher_offload: bool = opt(False, "keep the teacher's shards in CPU memory, moved to the device for each "
                                       "forward: less device memory, slower")
    teacher_resident: bool = opt(False, "keep the teacher gathered after its first forward: no gathers per step, but "
                                        "needs its full size free on every device")
    teachers: dict | None = opt(None, "several teachers: name -> that teacher's own keys (teacher_model or "
                                      "teacher_cache, teacher_offload, teacher_ranks, cross_tokenizer, kd_loss, "
                                      "kd_temperature ...), routed by dataset_teachers; a flag takes it as inline "
                                      "YAML (docs/several_teachers.md)")
    teacher_ranks: int = opt(0, "run the teacher on the last N ranks of the job (FSDP2 over those), which send the "
                                "student ranks its hidden states: 0 shares every rank (docs/scale_out.md); with "
                                "teachers, a teacher's own key: each such teacher's block after the student ranks, "
                                "in the order of teachers",
                             must_be=">= 0")

    dataset: str = opt("", "training data: a .jsonl/.json/.parquet/.csv file, a directory of them or a hub dataset; "
                           "several comma-separated are mixed by dataset_probs", section="Data")
    dataset_probs: str | None = opt(None, "sampling weights of the comma-separated datasets, e.g. 0.7,0.3; none: "
                                          "equal weights")
    dataset_teachers: str | None = opt(None, "with teachers: the teacher name of each comma-separated dataset "
                                             "source, e.g. math,chat")
    teacher_key: str | None = opt(None, "with teachers: the record field naming each record's teacher (instead of "
                                        "dataset_teachers)")
    teacher_weights: str | None = opt(None, "with teachers: every token distilled from all of them, KD = the "
                                            "weighted sum of their divergences, one weight per teacher, e.g. 0.7,0.3")
    dataset_split: str = opt("train", "the split of a hub dataset to train on")
    eval_dataset: str | None = opt(None, "held-out data, in the layouts dataset takes; none: see eval_holdout_ratio")
    eval_split: str = opt("test", "the split of a hub eval_dataset")
    eval_holdout_ratio: float = opt(0.0, "without eval_dataset: hold out this fraction of the training data for eval",
                                    must_be="in [0, 1)")
    input_key: str = opt("input", "the record key of the prompt (or of a conversation)")
    output_key: str = opt("output", "the record key of the response")
    input_template: str | None = opt(None, "a format string with one {} for the prompt, e.g. \"User: {}\\nAssistant: "
                                           "\"; unused with apply_chat_template")
    apply_chat_template: bool = opt(False, "render prompts and conversations with the student tokenizer's chat "
                                           "template (or tokenizer_chat_template)")
    tokenizer_chat_template: str | None = opt(None, "a Jinja chat template, or a path to a file of one, replacing the "
                                                    "tokenizer's own")
    multiturn: bool = opt(False, "train every assistant turn of a conversation, not only the last")
    pretrain_mode: bool = opt(False, "train every token of the text (no prompt/response split)")
    packing_samples: bool = opt(False, "pack each micro-batch's samples into rows of max_len with a block-diagonal "
                                       "attention mask")
    skip_bad_rows: bool = opt(False, "drop and count records that cannot be read or tokenized instead of stopping "
                                     "the run")
    max_len: int = opt(2048, "the most tokens of a sample, prompt and response together; longer samples are cut",
                       must_be=">= 1")
    max_samples: int | None = opt(None, "read at most this many records of each training source; none: all")
    max_eval_samples: int | None = opt(None, "read at most this many records of eval_dataset; none: all")
    data_cache_dir: str | None = opt(None, "where tokenized data is cached; none: $FSDP_KD_DATA_CACHE or "
                                           "~/.cache/fsdp_kd/tokenized")

    micro_train_batch_size: int = opt(1, "samples per rank per forward/backward", section="Optimization",
                                      must_be=">= 1")
    train_batch_size: int = opt(16, "samples per optimizer step over all ranks: micro_train_batch_size × "
                                    "accumulation steps × world size", must_be=">= 1")
    max_epochs: int = opt(1, "passes over the training data", must_be=">= 1")
    max_steps: int | None = opt(None, "stop after this many optimizer steps; none: max_epochs decides", must_be=">= 1")
    learning_rate: float = opt(5e-6, "the peak learning rate of AdamW")
    lr_warmup_ratio: float = opt(0.03, "the fraction of the steps spent in linear warmup from 0", must_be="in [0, 1)")
    lr_scheduler: str = opt("cosine_with_min_lr", "after warmup: {choices}; cosine_with_min_lr goes down to "
                                                  "min_lr_ratio × learning_rate along a cosine",
                            choices=LR_SCHEDULES)
    min_lr_ratio: float = opt(0.1, "the cosine schedule's final learning rate, as a fraction of learning_rate",
                              must_be="in [0, 1]")
    adam_betas: tuple[float, float] = opt((0.9, 0.95), "AdamW's beta1 and beta2")
    l2: float = opt(0.0, "AdamW weight decay")
    max_norm: float = opt(1.0, "clip gradients to this global norm")
    seed: int = opt(42, "seeds the data order and hold-out, and each rank's draws (dropout, on-policy sampling, a "
                        "sampled cache)")
    max_skipped_steps: int = opt(5, "consecutive steps with a non-finite loss or gradient norm (each skipped, no "
                                    "update) before the run stops", must_be=">= 1")

    kd_coef: float = opt(0.4, "loss = (1 - kd_coef) · CE + kd_coef · divergence to the teacher; OpenRLHF's "
                              "default", section="Distillation")
    kd_loss: str = opt(LossSpec.divergence, "the divergence: {choices}; forward_kl is KL(teacher ‖ student) "
                                            "(docs/divergences.md)", choices=DIVERGENCES)
    jsd_beta: float = opt(LossSpec.jsd_beta, "jsd: the mixture weight; 0 is forward_kl, 1 is reverse_kl")
    akl_mu: float = opt(LossSpec.akl_mu, "akl: the teacher's cumulative probability that bounds the head (Wu et al."
                                         "'s μ)")
    skew_alpha: float = opt(LossSpec.skew_alpha, "skew_kl: KL(p ‖ α·p + (1-α)·q); skew_reverse_kl: KL(q ‖ (1-α)·p + "
                                                 "α·q); 0 is the plain KL (DistiLLM's default 0.1)")
    student_topk: int = opt(LossSpec.student_topk, "reverse_kl_student_topk: the student's most likely tokens "
                                                    "that each get a bucket; the rest of the vocabulary is one")
    kd_loss_convention: str = opt(LossSpec.convention, "how the KD term is scaled: {choices}; fsdp_kd's is τ²·D "
                                                       "with JSD normalized by β(1-β), trl's and liger's are their "
                                                       "formulas (no τ², JSD unnormalized); bring a tool's kd_coef "
                                                       "with its convention (docs/divergences.md)",
                                  choices=CONVENTIONS)
    kd_temperature: float = opt(LossSpec.temperature, "both distributions are softmax(logits / kd_temperature) in "
                                                      "the divergence")
    kd_vocab_chunk: int | None = opt(None, "the loss kernel's vocabulary columns per chunk; none: chosen per device "
                                           "(1024 on CPU, a few big chunks on CUDA)")
    kd_token_chunk: int | None = opt(None, "the loss kernel's tokens per block; none: chosen per device (on CPU up "
                                           "to 256, 192 at a 152k vocabulary; >= 1024 on CUDA)")
    kd_chunk_budget_mb: int = opt(LossSpec.chunk_budget_mb, "CUDA: the loss kernel's scratch memory per token "
                                                            "block, in MiB")
    compile_loss: bool = opt(False, "torch.compile the loss kernel's per-chunk elementwise work")

    on_policy_ratio: float = opt(0.0, "GKD's λ: the share of micro-batches whose responses the student writes "
                                      "itself (reverse_kl is the usual kd_loss then)", section="On-policy distillation",
                                must_be="in [0, 1]")
    on_policy_ce: bool = opt(False, "keep the CE term on self-generated text (it reinforces the student's own "
                                    "samples)")
    generate_max_new_tokens: int = opt(256, "on-policy: the longest response the student writes, in tokens")
    generate_temperature: float = opt(1.0, "on-policy: the student's sampling temperature; 0: greedy")
    generate_top_p: float = opt(1.0, "on-policy: nucleus sampling's probability mass; 1: off")
    generate_gather_once: bool = opt(True, "hold the whole student gathered while it generates; false: re-gather "
                                           "each layer per token (a student too big to hold whole)")
    generate_stop_check_every: int = opt(16, "on-policy: tokens between reads of the stop flags (each read is one "
                                             "host sync; generation ends at most this many tokens after the last "
                                             "response stops)", must_be=">= 1")
    generate_compile: bool = opt(False, "on-policy: torch.compile the decoding forward (on CUDA with CUDA graphs); "
                                        "the first steps pay for compiling")

    teacher_cache: str | None = opt(None, "a directory of the teacher's stored distributions: cache_teacher writes "
                                          "it, training reads it instead of running a teacher", section="Teacher cache")
    cache_mode: str = opt("topk", "{choices}: topk stores cache_k ids with log-probs plus a rest bucket, sampled "
                                  "cache_n draws as ids with counts, hidden the teacher's final hidden states (exact, "
                                  "2·H bytes a token) and its head", choices=CACHE_MODES)
    cache_k: int = opt(64, "topk: the teacher's most likely ids stored per token")
    cache_n: int = opt(32, "sampled: draws from the teacher per token (at most 255)")
    cache_log_p_dtype: str = opt("float16", "topk: the dtype of the stored log-probabilities: {choices}",
                                 choices=LOG_P_DTYPES)
    cache_hidden_dtype: str = opt("bfloat16", "hidden: the dtype of the stored hidden states: {choices}",
                                  choices=HIDDEN_DTYPES)
    cache_chunk_samples: int = opt(512, "samples per part file: the most work a killed cache build loses",
                                   must_be=">= 1")

    save_path: str = opt("output/fsdp_kd_student", "where the run writes the HF model, metrics.jsonl and "
                                                   "train_config.yaml; must not hold an earlier run", section="Outputs")
    ckpt_path: str | None = opt(None, "where checkpoints go; none: <save_path>/checkpoints")
    save_steps: int = opt(-1, "save a checkpoint every this many steps; -1: never (the final model is exported "
                              "anyway)")
    eval_steps: int = opt(-1, "evaluate every this many steps and after the last; -1: never")
    logging_steps: int = opt(1, "log metrics every this many steps (and after the last)", must_be=">= 1")
    print_config: bool = opt(False, "print the resolved config at start (it is always written to "
                                    "<save_path>/train_config.yaml)")
    max_ckpt_num: int = opt(3, "keep this many newest checkpoints; older ones are deleted", must_be=">= 1")
    load_checkpoint: bool = opt(False, "resume from the newest complete checkpoint in ckpt_path")
    async_save: bool = opt(False, "write checkpoints in the background while training goes on")
    preempt_signal: str = opt("SIGTERM", "a signal that, like SIGTERM, stops the run after the current step with a "
                                         "checkpoint of it (a cache build: after its chunk) and exit code 75 "
                                         "(docs/training.md, Preemption): {choices}", choices=PREEMPT_SIGNALS)
    preempt_grace_s: float = opt(60.0, "seconds between the stop signal and the SIGKILL that follows: a step plus a "
                                       "save measured longer than this stops at the next micro-batch instead, "
                                       "unsaved", must_be="> 0")
    use_tensorboard: str | None = opt(None, "mirror metrics to TensorBoard in this log directory (needs the "
                                            "tensorboard package)")
    use_wandb: str | None = opt(None, "mirror metrics to this W&B project (needs the wandb package)")
    dist_timeout_minutes: float = opt(60.0, "the process group's timeout: long enough for rank 0 to load a large "
                                            "model", must_be="> 0")

    def __post_init__(self):
        if self.teacher_model == SELF_TEACHER:  # the student's initial weights, loaded again as a frozen teacher
            self.teacher_model = self.pretrain

    def resolved_ckpt_path(self) -> str:
        return self.ckpt_path or os.path.join(self.save_path, "checkpoints")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["adam_betas"] = list(self.adam_betas)
        return d


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_TYPES = typing.get_type_hints(TrainConfig)

# Keys that change what a checkpoint means; a resume with any of these changed is refused.
RESUME_SENSITIVE_KEYS = (
    "pretrain", "teacher_model", "teacher_cache", "dataset", "dataset_probs", "dataset_split", "input_key", "output_key",
    "input_template", "apply_chat_template", "tokenizer_chat_template", "multiturn", "pretrain_mode",
    "packing_samples", "eval_holdout_ratio", "max_len", "max_samples", "micro_train_batch_size", "train_batch_size",
    "seed", "param_dtype", "kd_coef", "kd_loss", "jsd_beta", "skew_alpha", "akl_mu", "student_topk", "kd_loss_convention",
    "kd_temperature", "max_epochs", "max_steps", "on_policy_ratio", "on_policy_ce",
    "generate_max_new_tokens", "generate_temperature", "generate_top_p", "cross_tokenizer", "uld_weight", "uld_topk",
    "teacher_context_key", "teacher_system_prompt",
    "span_weight", "prefix_buckets",
    "teachers", "dataset_teachers", "teacher_key", "teacher_weights",
)


def _base_type(tp):
    """(scalar type, optional?) for the annotations used in TrainConfig."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return tp, False


def type_name(key: str) -> str:
    """A key's type as `--help` shows it: STR, INT, FLOAT, BOOL, or FLOAT FLOAT for a pair."""
    tp, _ = _base_type(_TYPES[key])
    return "FLOAT FLOAT" if typing.get_origin(tp) is tuple else tp.__name__.upper()


def _coerce(key: str, value, where: str):
    """Converts a YAML or CLI value to the field's type, or raises a one-line ConfigError."""
    tp, optional = _base_type(_TYPES[key])
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and optional):
        if optional:
            return None
        raise ConfigError(f"{where}: key '{key}' cannot be empty; give a {tp.__name__}")
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
                return value.lower() in ("true", "1", "yes", "on")
            raise ValueError
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if tp is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            return str(value)
        if tp is dict:
            value = yaml.safe_load(value) if isinstance(value, str) else value
            if not isinstance(value, dict):
                raise ValueError
            return {name: {k: _coerce(k, v, f"{where} teachers.{name}") if k in FIELDS else v
                           for k, v in keys.items()} if isinstance(keys, dict) else keys
                    for name, keys in value.items()}
        if typing.get_origin(tp) is tuple:
            items = value.split(",") if isinstance(value, str) else value
            if not isinstance(items, (list, tuple)) or len(items) != 2:
                raise ValueError
            return tuple(float(v) for v in items)
    except (TypeError, ValueError):
        pass
    expected = ("two numbers, e.g. [0.9, 0.95]" if typing.get_origin(tp) is tuple else
                "a mapping, e.g. {math: {teacher_model: path}}" if tp is dict else f"a {tp.__name__}")
    raise ConfigError(f"{where}: key '{key}' expects {expected}, got {value!r}")


def _unknown_key_error(key: str, where: str) -> ConfigError:
    if key in DEEPSPEED_REPLACEMENTS:
        return ConfigError(f"{where}: '{key}' is a DeepSpeed-only option: {DEEPSPEED_REPLACEMENTS[key]}")
    return ConfigError(f"{where}: unknown key '{key}'; valid keys: {', '.join(sorted(FIELDS))}")


def _read_yaml(path: str) -> dict[str, tuple[object, str]]:
    """Maps each key to (value, 'file:line') so later errors can point at the line."""
    if not os.path.isfile(path):
        raise ConfigError(f"--config: file not found: {path}")
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte at offset {e.start}); re-save the config as UTF-8") from None
    try:
        root = yaml.compose(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{line}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if root is None:
        return {}
    if not isinstance(root, yaml.MappingNode):
        raise ConfigError(f"{path}:1: the config must be a mapping of key: value")
    loader = yaml.SafeLoader("")
    out = {}
    for key_node, value_node in root.value:
        where = f"{path}:{key_node.start_mark.line + 1}"
        out[key_node.value] = (loader.construct_object(value_node, deep=True), where)
    return out


def _parse_flags(argv: list[str]) -> tuple[str | None, dict[str, tuple[object, str]]]:
    """`--key value`, `--key=value`, `--flag` alone for booleans, `--adam_betas 0.9 0.95`.

    Returns (the --config path or None, {key: (raw value, where)}).
    """
    config_path, values, i = None, {}, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"command line: unexpected argument {arg!r}; options look like --key value")
        key, has_inline, inline = arg[2:].partition("=")
        key = key.replace("-", "_")
        where = f"command line --{key}"
        taken = [inline] if has_inline else []
        i += 1
        while not has_inline and i < len(argv) and not argv[i].startswith("--"):
            taken.append(argv[i])
            i += 1
        if key == "config":
            if len(taken) != 1:
                raise ConfigError("command line --config: give one YAML path")
            config_path = taken[0]
            continue
        if key not in FIELDS:
            raise _unknown_key_error(key, where)
        if key == "adam_betas":
            values[key] = (taken if len(taken) > 1 else (taken[0] if taken else None), where)
            continue
        if not taken and _base_type(_TYPES[key])[0] is bool:
            taken = ["true"]
        if len(taken) != 1:
            raise ConfigError(f"{where}: expects one value, got {len(taken)}: {' '.join(taken) or 'none'}")
        values[key] = (taken[0], where)
    return config_path, values


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """YAML first, flags on top; then type checks and cross-field validation. No I/O besides reading the YAML."""
    argv = sys.argv[1:] if argv is None else argv
    config_path, flag_values = _parse_flags(argv)
    merged = _read_yaml(config_path) if config_path else {}
    for key, (value, where) in merged.items():
        if key not in FIELDS:
            raise _unknown_key_error(key, where)
    merged.update(flag_values)
    kwargs = {key: _coerce(key, value, where) for key, (value, where) in merged.items()}
    cfg = TrainConfig(**kwargs)
    validate(cfg, {key: where for key, (_, where) in merged.items()})
    return cfg


def validate(cfg: TrainConfig, where: dict[str, str] | None = None) -> None:
    """The checks that need no I/O: each key's own rule (its `opt` choices or range, or the rule of the spec that
    takes the key: `LossSpec`, `TokenSettings`), said with where the key was set, and the rules of several keys
    together. `where` maps keys to their source for the message."""
    where = where or {}

    def fail(key, message):
        raise ConfigError(f"{where.get(key, f'key {key}')}: {message}")

    def owned(check, *args):
        """A rule whose owner names the key it refuses: said with where that key was set."""
        try:
            check(*args)
        except ConfigError as e:
            fail(e.key, str(e))

    if not cfg.pretrain:
        fail("pretrain", "no student model: set pretrain to an HF model directory or hub id")
    if not cfg.dataset:
        fail("dataset", "no training data: set dataset to a .json/.jsonl file")
    check_routing(cfg, where)
    for name, own in teacher_configs(cfg).items():
        validate(own, {k: f"{where.get('teachers', 'key teachers')} teachers.{name}.{k}" for k in TEACHER_KEYS})
    check_world(cfg, where)
    if cfg.teacher_model is None and cfg.teacher_cache is None and cfg.teachers is None and cfg.kd_coef > 0:
        fail("kd_coef", f"kd_coef is {cfg.kd_coef} but no teacher_model or teacher_cache is set; set kd_coef 0 for "
                        "plain SFT")
    for key, field in FIELDS.items():
        value = getattr(cfg, key)
        if "choices" in field.metadata:
            owned(require_choice, key, value, field.metadata["choices"])
        if "must_be" in field.metadata and value is not None:
            owned(require, _within(value, field.metadata["must_be"]), key, field.metadata["must_be"], value)
    owned(loss_spec, cfg)
    owned(token_settings, cfg)
    if cfg.teacher_resident and cfg.teacher_offload:
        fail("teacher_resident", "teacher_resident keeps the teacher on the device, teacher_offload keeps it on CPU; "
                                 "choose one")
    if cfg.teacher_ranks and (cfg.teacher_model is None or cfg.teacher_cache is not None):
        fail("teacher_ranks", "teacher_ranks runs the teacher_model on ranks of its own: set teacher_model, and no "
                              "teacher_cache (a cache needs no teacher ranks)")
    if cfg.teacher_ranks and "hybrid_shard" in (cfg.sharding_strategy, cfg.teacher_sharding_strategy):
        fail("teacher_ranks", "teacher_ranks shards each side over its own ranks (full_shard); hybrid_shard is not "
                              "supported with it yet")
    if cfg.teacher_ranks and cfg.on_policy_ratio > 0 and not cfg.generate_gather_once:
        fail("generate_gather_once", "with teacher_ranks, on-policy generation holds the student gathered "
                                     "(generate_gather_once true): transformers' per-token sync across ranks would "
                                     "wait for the teacher ranks too")
    if cfg.dataset_probs is not None:
        try:
            probs = [float(p) for p in cfg.dataset_probs.split(",")]
        except ValueError:
            fail("dataset_probs", f"dataset_probs must be comma-separated numbers, got {cfg.dataset_probs!r}")
        if len(probs) != len(cfg.dataset.split(",")) or min(probs) < 0 or sum(probs) <= 0:
            fail("dataset_probs", f"dataset_probs needs one non-negative weight per dataset "
                                  f"({len(cfg.dataset.split(','))}), got {cfg.dataset_probs!r}")
    if cfg.on_policy_ratio > 0 and (cfg.teacher_model is None or cfg.teacher_cache is not None):
        fail("on_policy_ratio", "on-policy distillation needs a live teacher (teacher_model, no teacher_cache): a "
                                "cache cannot grade responses written after it was built")
    if cfg.cross_tokenizer and cfg.teacher_model is None and cfg.teacher_cache is None:
        fail("cross_tokenizer", "cross_tokenizer needs the teacher: set teacher_model (or a teacher_cache built "
                                "with cross_tokenizer)")
    if cfg.cross_tokenizer and cfg.teacher_cache is not None and (cfg.cache_mode != "topk" or cfg.uld_weight > 0):
        fail("uld_weight" if cfg.cache_mode == "topk" else "cache_mode",
             "a teacher cache across tokenizers holds the exact part only, over the teacher's top-k (cache_mode "
             "topk; ULD needs both models' whole distributions): set cache_mode topk and uld_weight 0, or train "
             "with the live teacher")
    if cfg.cross_tokenizer and cfg.teacher_cache is not None and cfg.span_weight > 0:
        fail("span_weight", "a teacher cache across tokenizers holds no span term (the teacher's probabilities along "
                            "groups of several tokens): set span_weight 0, or train with the live teacher")
    if cfg.cross_tokenizer and cfg.teacher_cache is not None and cfg.prefix_buckets:
        fail("prefix_buckets", "a teacher cache across tokenizers folds the teacher's tokens without a counterpart "
                               "into its rest bucket: set prefix_buckets false, or train with the live teacher")
    if cfg.cross_tokenizer and DIVERGENCES[cfg.kd_loss].student_buckets:
        fail("kd_loss", f"{cfg.kd_loss} takes its buckets from the student's own top tokens, which have no "
                        "counterpart in the teacher's vocabulary; choose another kd_loss with cross_tokenizer")
    context = next((k for k in ("teacher_context_key", "teacher_system_prompt") if getattr(cfg, k) is not None), None)
    if context and cfg.teacher_model is None and cfg.teacher_cache is None:
        fail(context, f"{context} is what the teacher reads: set teacher_model (self: the student's initial weights)")
    if context and cfg.cross_tokenizer:
        fail(context, f"{context} with cross_tokenizer is not supported yet: privileged context needs a teacher "
                      "with the student's tokenizer (or teacher_model self)")
    if context and cfg.pretrain_mode:
        fail(context, f"{context} goes before a prompt, and pretrain_mode has none: drop one of them")
    if cfg.teacher_system_prompt is not None and not cfg.apply_chat_template:
        fail("teacher_system_prompt", "teacher_system_prompt is a chat template's system turn: set "
                                      "apply_chat_template, or put the text in a record field named by "
                                      "teacher_context_key")
    if cfg.uld_weight < 0 or cfg.uld_topk < 1:
        fail("uld_weight" if cfg.uld_weight < 0 else "uld_topk",
             f"uld_weight must be >= 0 and uld_topk >= 1, got {cfg.uld_weight} and {cfg.uld_topk}")
    if cfg.span_weight < 0:
        fail("span_weight", f"span_weight must be >= 0, got {cfg.span_weight}")
    if cfg.generate_temperature < 0 or not 0 < cfg.generate_top_p <= 1 or cfg.generate_max_new_tokens < 1:
        fail("generate_temperature" if cfg.generate_temperature < 0 else "generate_top_p"
             if not 0 < cfg.generate_top_p <= 1 else "generate_max_new_tokens",
             "generate_temperature must be >= 0, generate_top_p in (0, 1], generate_max_new_tokens >= 1")
    if cfg.cache_k < 1 or not 1 <= cfg.cache_n <= 255:
        fail("cache_k" if cfg.cache_k < 1 else "cache_n", "cache_k must be >= 1 and cache_n in [1, 255] (counts are "
                                                          f"stored in a byte), got {cfg.cache_k} and {cfg.cache_n}")


# ------------------------------------------------------------------------------ what the parts below the trainer take
def loss_spec(cfg: TrainConfig, **overrides) -> LossSpec:
    """The loss's settings as the config gives them (`overrides` win, e.g. kd_coef 0 without a teacher)."""
    return LossSpec(**{**dict(kd_coef=cfg.kd_coef, divergence=cfg.kd_loss, jsd_beta=cfg.jsd_beta,
                              skew_alpha=cfg.skew_alpha, akl_mu=cfg.akl_mu, student_topk=cfg.student_topk,
                              temperature=cfg.kd_temperature, convention=cfg.kd_loss_convention,
                              vocab_chunk=cfg.kd_vocab_chunk, token_chunk=cfg.kd_token_chunk,
                              chunk_budget_mb=cfg.kd_chunk_budget_mb, compile=cfg.compile_loss), **overrides})


def token_settings(cfg: TrainConfig) -> TokenSettings:
    return TokenSettings(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(TokenSettings)})


def data_sources(cfg: TrainConfig) -> DataSources:
    return DataSources(tuple(cfg.dataset.split(",")), cfg.dataset_split, cfg.max_samples, cfg.eval_dataset,
                       cfg.eval_split, cfg.max_eval_samples, cfg.data_cache_dir, token_settings(cfg), cfg.teacher_key,
                       cfg.span_weight > 0)


def gradient_accumulation_steps(cfg: TrainConfig, world_size: int) -> int:
    """train_batch_size = micro_train_batch_size × accumulation steps × world size, exactly."""
    per_step = cfg.micro_train_batch_size * world_size
    if cfg.train_batch_size % per_step:
        raise ConfigError(
            f"key train_batch_size: {cfg.train_batch_size} is not a multiple of micro_train_batch_size "
            f"{cfg.micro_train_batch_size} × world size {world_size} = {per_step}; "
            f"use e.g. {max(per_step, cfg.train_batch_size // per_step * per_step)}")
    return cfg.train_batch_size // per_step


def resume_mismatches(saved: dict, now: dict) -> list[str]:
    """Keys that matter for a checkpoint and differ between the saved run's config and this one's (`to_dict`). A key
    the saved run did not have (a checkpoint from before the key existed) ran with that key's default."""
    then = {k: saved.get(k, TrainConfig.__dataclass_fields__[k].default) for k in RESUME_SENSITIVE_KEYS}
    return [f"{k} ({then[k]!r} -> {now[k]!r})" for k in RESUME_SENSITIVE_KEYS if then[k] != now[k]]


def config_to_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


__all__ = ["TrainConfig", "parse_config", "validate", "loss_spec", "token_settings", "data_sources",
           "gradient_accumulation_steps", "resume_mismatches", "config_to_yaml"]
