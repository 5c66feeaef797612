"""`train.py` and `fsdp-kd-train`: parse, set up the ranks, train, tear down; bad input exits with one line."""

from __future__ import annotations

import os
import sys

from .config import parse_config
from .errors import ConfigError
from .usage import KEYS_NOTE, asks_for_help, key_sections, print_help, render

USAGE = "torchrun --nproc_per_node N train.py [--config FILE.yaml] [--key value ...]"
SUMMARY = ("Distils a teacher into a student on FSDP2 (plain SFT without a teacher), then exports the student as an HF "
           "model; with no arguments, runs the built-in demo instead.")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        from .demo import main as demo_main

        return demo_main([])  # it says what it is, and how to start a real run
    if asks_for_help(argv):
        return print_help(render(USAGE, SUMMARY, key_sections(), KEYS_NOTE))
    try:
        cfg = parse_config(argv)
    except ConfigError as e:
        from .distributed import report_failure

        return report_failure(e, int(os.environ.get("RANK", "0")))  # before the process group: said by rank 0
    return run_training(cfg)


def run_training(cfg, on_step=None) -> int:
    """Trains on every rank (on the student ranks, with teacher_ranks: the others serve the teacher, a block of
    ranks per teacher with several, `teacher_ranks.serve`); a failure on any one rank ends the job at once (see
    `report_failure`). A stop signal (`preemption`) ends it after a step, saved, with `PREEMPTED_EXIT_CODE`; a teacher
    rank serves on until the student ranks stop, then exits with that code too. `on_step(done, total)` runs after each
    step (`Trainer.train`)."""
    from .distributed import run_ranked, seed_everything, split_world
    from .preemption import Preempted, StopSignals
    from .routing import rank_blocks
    from .startup import CLOCK
    from .trainer import Trainer

    CLOCK.lap("imports")

    stop = StopSignals(cfg.preempt_signal, cfg.preempt_grace_s)

    def work(env):
        CLOCK.lap("process group")
        blocks = rank_blocks(cfg)
        if blocks:
            env = split_world(env, blocks, cfg.dist_timeout_minutes)
            if env.split.is_teacher(env.global_rank):
                if serve_teacher(cfg, env, stop)["preempted"]:  # the student ranks stopped on a signal
                    raise Preempted("a teacher rank stopped with the student ranks")
                return
        seed_everything(cfg.seed, env.rank)
        trainer = Trainer(cfg, env, stop=stop)
        try:
            trainer.train(on_step)
        except Preempted:
            trainer.close(failed=False, preempted=True)  # saved: teacher ranks are told to stop, preempted
            raise
        except BaseException:
            trainer.close(failed=True)
            raise
        trainer.close(failed=False)

    with stop.installed():  # until the teardown is over: a second SIGTERM then must not kill a rank that saved
        return run_ranked(work, cfg.dist_timeout_minutes)


def serve_teacher(cfg, env, stop) -> dict[str, int]:
    """A teacher rank's run: after the student ranks' checks, the teacher_model they would run (the one its block
    serves, `Split.name`: with several teachers, that one's own config), with the student's tokenizer (or, with
    cross_tokenizer, its own) for the vocabulary; a frozen forward needs no seed."""
    from .dtypes import resolve_dtype
    from .routing import teacher_configs
    from .teacher_model import model_teacher
    from .teacher_ranks import serve, students_checked
    from .tokenizer_compat import student_tokenizer

    students_checked(env.split)
    own = cfg if env.split.name is None else teacher_configs(cfg)[env.split.name]
    tokenizer = student_tokenizer(cfg.pretrain, cfg.trust_remote_code, cfg.tokenizer_chat_template,
                                  cfg.apply_chat_template)
    return serve(model_teacher(own, tokenizer), env, resolve_dtype(own.param_dtype, env.device), stop)


def console_main() -> None:
    """`train.py` and the `fsdp-kd-train` script: main, then a finalization-free exit (see exit_process)."""
    from .distributed import exit_process

    exit_process(main())
