"""The size sweep's worker (tests/test_size_sweep.py): every case of one world size, in turn, in one process group.

    python -m torch.distributed.run --nproc_per_node W tests/sweep_worker.py PLAN_JSON OUT_JSON

PLAN_JSON holds {"root": a working directory, "flags": TrainConfig keys every case shares, "cases": [{"name", "flags":
its own keys, "cache": {"cache_mode", "cache_chunk_samples"} to build a teacher cache and train from it, or
null}]}. One launch per world size instead of one per case: a torchrun start costs more than a tiny case.

Each case: the cache built in-process (`CacheBuilder`, as `python -m fsdp_kd.cache_teacher` does), then a `Trainer`
as train.py makes one; an evaluation of the untrained student, the training run (which evaluates after its last step),
and what the test compares. OUT_JSON gets {case name: result}, rewritten after every case, so a case that crashes
leaves the ones before it readable.
"""

import dataclasses
import json
import os
import sys

import torch

from fsdp_kd.cache_teacher import CacheBuilder
from fsdp_kd.config import TrainConfig, validate
from fsdp_kd.distributed import all_gather_object, all_reduce_sum, exit_process, run_ranked, seed_everything
from fsdp_kd.teacher_cache import CacheMeta
from fsdp_kd.run_log import METRICS_FILE
from fsdp_kd.trainer import Trainer


def sampled_tokens(trainer: Trainer) -> float:
    """The trainable tokens of the samples the run's steps draw from the epoch order, each counted once: what the
    `tokens` metric must add up to over the steps, however the ranks and micro-batches split them."""
    tbs = trainer.cfg.train_batch_size
    total = 0
    for step in range(trainer.total_steps):
        epoch, index = divmod(step, trainer.data.sampler.steps_per_epoch)
        for i in trainer.data.order(epoch)[index * tbs:(index + 1) * tbs].tolist():
            total += trainer.data.train[i].trainable_tokens
    return float(total)


class TrainedByPolicy:
    """Wraps `OnPolicy.rewrite` to add up the trainable tokens and samples of the micro-batches a step trains, after
    the student wrote its responses: on-policy, the token count is known only once they are written."""

    def __init__(self, rewrite):
        self.rewrite, self.tokens, self.samples = rewrite, 0, 0

    def __call__(self, root, step, groups):
        out, flags, stats = self.rewrite(root, step, groups)
        self.tokens += sum(s.trainable_tokens for group in out for s in group)
        self.samples += sum(map(len, out))
        return out, flags, stats

    def totals(self) -> list[float]:
        """[tokens, samples] over every rank."""
        return all_reduce_sum(torch.tensor([self.tokens, self.samples], dtype=torch.float64)).tolist()


def run_case(env, plan: dict, case: dict) -> dict:
    name = case["name"]
    save_path = os.path.join(plan["root"], f"world{env.world_size}", name)
    cfg = TrainConfig(**plan["flags"], **case["flags"], save_path=save_path)
    validate(cfg)
    result = {}
    if case["cache"]:
        cfg = dataclasses.replace(cfg, teacher_cache=save_path + "_cache", **case["cache"])
        CacheBuilder(cfg, env).run()  # the teacher the keys name; the run below loads none
        # what each rank finds on disk the moment its build returns, where a run started right after it (the demo's)
        # reads the cache; rank 0 joins the gather only once it has finished the cache, so the run below finds it
        result["cache_complete_on_ranks"] = all_gather_object(CacheMeta.load(cfg.teacher_cache).complete)
        cfg = dataclasses.replace(cfg, teacher_model=None)
    seed_everything(cfg.seed, env.rank)
    trainer = Trainer(cfg, env, log=lambda *a, **k: None)
    counter = None
    if trainer.on_policy is not None:
        counter = TrainedByPolicy(trainer.on_policy.rewrite)
        trainer.on_policy.rewrite = counter
    result.update(eval_before=trainer.evaluate(),
                  eval_tokens_expected=float(sum(s.trainable_tokens for s in trainer.data.held_out)),
                  train_tokens_expected=sampled_tokens(trainer),
                  train_samples_expected=trainer.total_steps * cfg.train_batch_size)
    summary = trainer.train()
    result["eval_after"] = summary["final_eval"]
    if counter is not None:
        result["train_tokens_rewritten"], result["train_samples_rewritten"] = counter.totals()
    if env.is_main:
        with open(os.path.join(save_path, METRICS_FILE)) as f:
            result["steps"] = [m for m in map(json.loads, f) if "loss" in m]
    return result


def sweep(env, plan_file: str, out_file: str) -> None:
    with open(plan_file) as f:
        plan = json.load(f)
    results = {}
    for case in plan["cases"]:
        if env.is_main:
            print(f"sweep case {case['name']} on {env.world_size} ranks", flush=True)
        results[case["name"]] = run_case(env, plan, case)
        if env.is_main:
            with open(out_file, "w") as f:
                json.dump(results, f, indent=1)


def main(argv: list[str]) -> int:
    return run_ranked(lambda env: sweep(env, argv[0], argv[1]))


if __name__ == "__main__":
    exit_process(main(sys.argv[1:]))
