"""`train.py` and `fsdp-kd-train`: parse, set up the ranks, train, tear down; bad input exits with one line."""

from __future__ import annotations

import sys

from .config import ConfigError, parse_config


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        from .demo import main as demo_main

        print("fsdp-kd: no arguments, running the built-in demo (see README for real runs)", flush=True)
        return demo_main([])
    try:
        cfg = parse_config(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return run_training(cfg)


def run_training(cfg) -> int:
    from .distributed import init_distributed, seed_everything, teardown
    from .trainer import Trainer

    env = init_distributed()
    try:
        seed_everything(cfg.seed, env.rank)
        Trainer(cfg, env).train()
    except ConfigError as e:
        if env.is_main:
            print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        teardown()
    return 0


def console_main() -> None:
    """`train.py` and the `fsdp-kd-train` script: main, then a finalization-free exit (see exit_process)."""
    from .distributed import exit_process

    exit_process(main())
