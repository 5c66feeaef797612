"""Convert a training checkpoint into an HF model directory, with any number of ranks (one process is fine).

    python -m fsdp_kd.export CKPT_PATH/step_N OUT_DIR
    torchrun --nproc_per_node 4 -m fsdp_kd.export CKPT_PATH/step_N OUT_DIR

The student's architecture and tokenizer come from the run's `pretrain`, recorded in the checkpoint. The weights are
read sharded across the ranks and written through the same code as the end-of-training export.
"""

from __future__ import annotations

import argparse
import os
import sys

from .config import ConfigError, TrainConfig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a complete checkpoint directory, e.g. out/checkpoints/step_200")
    parser.add_argument("out_dir", help="a new directory for the HF model")
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

    import torch
    from transformers import AutoConfig

    from .distributed import init_distributed, teardown
    from .models import load_sharded, load_tokenizer, shard_student

    env = init_distributed()
    try:
        model_config = AutoConfig.from_pretrained(cfg.pretrain, trust_remote_code=cfg.trust_remote_code)
        root = load_sharded(cfg.pretrain, cfg, env, torch.float32, shard_student, "student")
        ckpt.load_model_weights(root, args.checkpoint)
        ckpt.export_student(root, model_config, load_tokenizer(cfg.pretrain, cfg.trust_remote_code),
                            args.out_dir, env.rank)
        if env.is_main:
            print(f"exported {args.checkpoint} to {args.out_dir}")
    finally:
        teardown()
    return 0


if __name__ == "__main__":
    from .distributed import exit_process

    exit_process(main())
