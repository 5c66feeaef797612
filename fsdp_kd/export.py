"""The HF export: the trained student as a directory `from_pretrained` loads, written from the shards.

At the end of training the trainer calls `export_student`; a checkpoint is converted with any number of ranks (one
process is fine):

    python -m fsdp_kd.export CKPT_PATH/step_N OUT_DIR
    torchrun --nproc_per_node 4 -m fsdp_kd.export CKPT_PATH/step_N OUT_DIR

The safetensors are written through DCP's HuggingFace storage writer: each rank writes its own shard files, and rank 0
stitches them into full tensors file by file, so no rank ever holds the whole model. The weights are checked to be
finite first: a model with NaN or inf is never exported. For the command, the student's architecture and tokenizer
come from the run's `pretrain`, recorded in the checkpoint.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

import torch
import torch.distributed.checkpoint as dcp

from .config import TrainConfig
from .distributed import barrier, side_group
from .errors import ConfigError

MAX_SHARD_BYTES = 4 * 1024**3


def export_student(root, model_config, tokenizer, out_dir: str, rank: int, source: str | None = None,
                   trust_remote_code: bool = False) -> None:
    """Collective. The student as an HF directory, in the dtype its original checkpoint was published in, with the
    student's own generation config (from `source`, its original directory or hub id) and tokenizer."""
    dtype = getattr(model_config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    model_config.dtype = dtype
    from .checkpoint import check_finite

    check_finite(root, f"the export to {out_dir}")
    export_hf(export_state_dict(root.lm, dtype), model_config, tokenizer, out_dir, rank,
              generation_config=generation_config_of(source, model_config))
    if rank == 0 and trust_remote_code and source and os.path.isdir(source):
        copy_remote_code(source, out_dir)


def generation_config_of(source: str | None, model_config):
    """The student's own generation_config.json (Qwen2.5-Instruct's two stop tokens and sampling defaults, say);
    built from the model config only when the student has none. Dropping it makes `generate` and vLLM stop at the
    wrong token."""
    from transformers import GenerationConfig

    if source:
        try:
            return GenerationConfig.from_pretrained(source)
        except OSError:
            pass
    return GenerationConfig.from_model_config(model_config)


def copy_remote_code(source: str, out_dir: str) -> None:
    """A model loaded with trust_remote_code needs its modeling/configuration/tokenization .py files beside the
    weights for the export to load the same way."""
    for name in os.listdir(source):
        if name.endswith(".py"):
            shutil.copy2(os.path.join(source, name), os.path.join(out_dir, name))


def export_state_dict(lm: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The HF state dict: parameters once each (a tied head is saved under the embedding's name only) plus
    persistent buffers, cast to the export dtype shard by shard."""
    names = {n for n, _ in lm.named_parameters()}
    names |= {n for n, _ in lm.named_buffers()}
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in lm.state_dict().items() if k in names}


def _file_assignment(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """Tensors to safetensors files of at most MAX_SHARD_BYTES, in order (1-based, as HF names them)."""
    mapping, index, used = {}, 1, 0
    for name, tensor in state.items():
        size = tensor.numel() * tensor.element_size()
        if used and used + size > MAX_SHARD_BYTES:
            index, used = index + 1, 0
        mapping[name] = index
        used += size
    return mapping


def export_hf(state: dict[str, torch.Tensor], model_config, tokenizer, out_dir: str, rank: int,
              generation_config=None) -> None:
    """Collective. Writes config, generation config, safetensors with index, and tokenizer into `out_dir`."""
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    writer = HuggingFaceStorageWriter(path=out_dir, save_distributed=True, enable_consolidation=True,
                                      fqn_to_index_mapping=_file_assignment(state))
    dcp.save(state, storage_writer=writer, process_group=side_group())
    barrier()
    if rank == 0:
        shutil.rmtree(os.path.join(out_dir, "sharded"), ignore_errors=True)
        shutil.rmtree(os.path.join(out_dir, ".metadata"), ignore_errors=True)
        model_config.save_pretrained(out_dir)
        (generation_config or generation_config_of(None, model_config)).save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
    barrier()




def main(argv: list[str] | None = None) -> int:
    from .usage import asks_for_help, parser_sections, print_help, render

    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m fsdp_kd.export", add_help=False)
    parser.add_argument("checkpoint", metavar="CHECKPOINT",
                        help="a complete checkpoint directory of a run, e.g. out/checkpoints/step_200")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="a new (or empty) directory for the HF model")
    if asks_for_help(argv):
        return print_help(render(
            "python -m fsdp_kd.export CHECKPOINT OUT_DIR  (or torchrun --nproc_per_node N -m fsdp_kd.export ...)",
            "Turns a training checkpoint into an HF model directory that from_pretrained loads, with the student's "
            "config, generation config and tokenizer taken from the run's pretrain.", parser_sections(parser)))
    args = parser.parse_args(argv)
    from . import checkpoint as ckpt

    try:
        if not os.path.isfile(os.path.join(args.checkpoint, ckpt.TRAIN_STATE)):
            raise ConfigError(f"{args.checkpoint}: not a complete checkpoint (no {ckpt.TRAIN_STATE}); "
                              "pick a step_N directory without .partial")
        if os.path.exists(args.out_dir) and os.listdir(args.out_dir):
            raise ConfigError(f"{args.out_dir}: exists and is not empty; choose a new directory")
        cfg = TrainConfig(**{k: tuple(v) if k == "adam_betas" else v
                             for k, v in ckpt.read_train_state(args.checkpoint)["config"].items()})
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from transformers import AutoConfig

    from .distributed import run_ranked
    from .loading import LoadSpec, load_sharded
    from .sharding import StudentSharding
    from .tokenizer_compat import load_tokenizer

    def work(env):
        model_config = AutoConfig.from_pretrained(cfg.pretrain, trust_remote_code=cfg.trust_remote_code)
        root = load_sharded(cfg.pretrain, LoadSpec.of(cfg), env, torch.float32, StudentSharding.of(cfg), "student")
        ckpt.load_model_weights(root, args.checkpoint)
        tokenizer = load_tokenizer(cfg.pretrain, cfg.trust_remote_code, cfg.tokenizer_chat_template)
        export_student(root, model_config, tokenizer, args.out_dir, env.rank, source=cfg.pretrain,
                       trust_remote_code=cfg.trust_remote_code)
        if env.is_main:
            print(f"exported {args.checkpoint} to {args.out_dir}")

    return run_ranked(work, cfg.dist_timeout_minutes)


if __name__ == "__main__":
    from .distributed import exit_process

    exit_process(main())
