"""Runs under torchrun for the multi-rank tests and dumps what a test compares; one function per mode.

    python -m torch.distributed.run --nproc_per_node N tests/dist_worker.py MODE OUT_FILE [ARGS ...]

MODE grads    one step's accumulated gradients (full tensors), before the optimizer step    ARGS: train.py flags
MODE dense    the kernel's loss and gradients, and the dense reference's, on the same batch  ARGS: train.py flags
MODE logits   train, export, then the FSDP model's logits on a fixed batch                   ARGS: train.py flags
MODE gathers  teacher parameters all-gathered for one micro-batch's targets                  ARGS: train.py flags
MODE families for each model, shard, train a step, export, and compare the export's logits   ARGS: FAMILY=DIR ...
MODE load     each model loaded into shards (as student, and as an offloaded teacher) against
              from_pretrained: the largest difference of any tensor                            ARGS: NAME=DIR ...
MODE generate every rank's on-policy responses to its prompts (gathered once, and re-gathered per token), and
              single-process HF generate of the same weights, each prompt alone with its seed  ARGS: train.py flags
MODE teacher_logits  the teacher's logits at the trained rows of the first samples, and of their on-policy
              rewrites                                                                         ARGS: train.py flags
MODE preempt  train.py's run whole (its exit code), with a signal raised in one rank's own process at a chosen
              point, as a scheduler's would arrive: "step:N" after step N, "save:N" as step N's save begins, "serve:N"
              after a teacher rank's Nth micro-batch received, "chunk:N" after a cache build's chunk N (the flags are
              then cache_teacher's); RANK -1: every rank
                                                                                    ARGS: WHEN SIGNAL RANK flags
"""

import dataclasses
import os
import signal
import sys

import torch

from fsdp_kd.config import parse_config
from fsdp_kd.data import collate
from fsdp_kd.distill import hidden_at_targets
from fsdp_kd.distributed import exit_process, init_distributed, seed_everything, teardown
from fsdp_kd.testing.reference import dense_distillation_loss
from fsdp_kd.trainer import Trainer


def trainer_from(flags, env) -> Trainer:
    cfg = parse_config(flags)
    seed_everything(cfg.seed, env.rank)
    return Trainer(cfg, env)


def full_grads(trainer):
    return {n: p.grad.full_tensor().clone() for n, p in trainer.student.named_parameters() if p.grad is not None}


def grads(env, flags, out_file):
    trainer = trainer_from(flags, env)
    work = trainer.forward_backward(0)
    return {"grads": full_grads(trainer), "metrics": trainer._reduce(work.sums)[0]}


def dense_loss(lm, batch, spec, vocab_size, targets):
    hidden = hidden_at_targets(lm, batch)
    with targets as teacher:
        return dense_distillation_loss(hidden, lm.get_output_embeddings().weight, batch.target_ids, spec,
                                       vocab_size, teacher.hidden, teacher.head.weight)


def dense(env, flags, out_file):
    trainer = trainer_from(flags, env)
    batch = collate([trainer.data.train[i] for i in range(env.rank * 4, env.rank * 4 + 4)], trainer.data.pad_id)
    result = {}
    for name, fn in (("kernel", None), ("dense", dense_loss)):
        trainer.optimizer.zero_grad(set_to_none=True)
        if fn is None:
            loss, _ = trainer._run_micro_batch(batch, trainer.spec)
        else:
            targets = trainer.teacher.targets(batch)
            loss, _ = trainer.student(fn, batch, trainer.spec, trainer.vocab_size, targets)
        loss.backward()
        total = loss.detach().clone()
        torch.distributed.all_reduce(total)
        result[name] = {"loss": total, "grads": full_grads(trainer)}
    return result


def gathers(env, flags, out_file):
    import torch.distributed.fsdp._fully_shard._fsdp_param_group as param_group

    trainer = trainer_from(flags, env)
    gathered, all_gather = [], param_group.foreach_all_gather

    def counting(fsdp_params, *args, **kwargs):
        gathered.append(sum(p._orig_size.numel() for p in fsdp_params))
        return all_gather(fsdp_params, *args, **kwargs)

    param_group.foreach_all_gather = counting
    batch = collate([trainer.data.train[i] for i in range(2)], trainer.data.pad_id).to(env.device)
    per_micro_batch = []
    try:
        for _ in range(2):
            gathered.clear()
            with trainer.teacher.targets(batch):
                pass
            per_micro_batch.append(sum(gathered))
    finally:
        param_group.foreach_all_gather = all_gather  # a case host runs later cases in this process
    return {"gathered": per_micro_batch, "parameters": sum(p.numel() for p in trainer.teacher.root.parameters())}


def logits(env, flags, out_file):
    trainer = trainer_from(flags, env)
    trainer.train()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12], [13, 14, 15, 16, 17, 18, 19, 20]])
    with torch.no_grad():
        out = trainer.student(lambda lm, x: lm(input_ids=x).logits, ids)
    return {"input_ids": ids, "logits": out}


def families(env, pairs, out_file):
    from transformers import AutoConfig, AutoModelForCausalLM

    from fsdp_kd.config import TrainConfig
    from fsdp_kd.testing.tiny import build_char_tokenizer
    from fsdp_kd.distill import student_loss
    from fsdp_kd.export import export_student
    from fsdp_kd.loading import LoadSpec, load_sharded
    from fsdp_kd.loss import LossSpec
    from fsdp_kd.sharding import StudentSharding
    from test_families import V, batch_of

    work = os.path.dirname(out_file)
    tokenizer = build_char_tokenizer(os.path.join(work, f"tok_rank{env.rank}"))
    errors = {}
    for family, path in (pair.split("=", 1) for pair in pairs):
        cfg = TrainConfig(pretrain=path, dataset="-", kd_coef=0.0, param_dtype="fp32", attn_implementation="eager")
        root = load_sharded(path, LoadSpec.of(cfg), env, torch.float32, StudentSharding.of(cfg), "student", V)
        optimizer = torch.optim.AdamW(root.parameters(), lr=1e-2)
        loss, _ = root(student_loss, batch_of(env.rank), LossSpec(kd_coef=0.0), V)
        loss.backward()
        optimizer.step()
        ids = batch_of(0).input_ids
        with torch.no_grad():
            trained = root(lambda lm, x: lm(input_ids=x).logits, ids)
        root.reshard_everything()
        export_dir = os.path.join(work, f"export_{family}")
        export_student(root, AutoConfig.from_pretrained(path), tokenizer, export_dir, env.rank)
        if env.is_main:
            reloaded = AutoModelForCausalLM.from_pretrained(export_dir, attn_implementation="eager").eval()
            with torch.no_grad():
                exported = reloaded(input_ids=ids).logits
            errors[family] = float((exported - trained).abs().max() / trained.abs().max())
    return errors


def load(env, pairs, out_file):
    from transformers import AutoModelForCausalLM

    from fsdp_kd.config import TrainConfig
    from fsdp_kd.loading import LoadSpec, load_sharded
    from fsdp_kd.sharding import StudentSharding, TeacherSharding

    differences = {}
    for name, path in (pair.split("=", 1) for pair in pairs):
        reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()
        for role, sharding, offload in (("student", StudentSharding, False), ("teacher", TeacherSharding, True)):
            cfg = TrainConfig(pretrain=path, dataset="-", kd_coef=0.0, param_dtype="fp32", teacher_offload=offload)
            root = load_sharded(path, LoadSpec.of(cfg), env, torch.float32, sharding.of(cfg), role)
            loaded = {n: p.full_tensor() for n, p in root.lm.named_parameters()}
            differences[f"{name} as {role}"] = max(float((loaded[n] - reference[n]).abs().max()) for n in loaded)
    return differences


def generate(env, flags, out_file):
    from transformers import AutoModelForCausalLM

    from fsdp_kd.distributed import all_gather_object
    from fsdp_kd.on_policy import generate as fsdp_generate, prompt_of
    from fsdp_kd.testing.reference import hf_generate

    trainer = trainer_from(flags, env)
    settings = trainer.on_policy.settings
    prompts = [prompt_of(trainer.data.train[i]) for i in range(env.rank * 5, env.rank * 5 + 5)]
    seeds = [1234 + 10 * env.rank + row for row in range(len(prompts))]
    once, _ = fsdp_generate(trainer.student, prompts, settings, seeds, env.device)
    per_token, _ = fsdp_generate(trainer.student, prompts, dataclasses.replace(settings, gather_once=False), seeds,
                                  env.device)
    reference_model = AutoModelForCausalLM.from_pretrained(trainer.cfg.pretrain, dtype=torch.float32).eval()
    reference = [hf_generate(reference_model, [p], settings, seed)[0] for p, seed in zip(prompts, seeds)]
    unmasked = [hf_generate(reference_model, [p], dataclasses.replace(settings, vocab_size=None), seed)[0]
                for p, seed in zip(prompts, seeds)]  # the padded head rows left in: the control
    step_groups, flags_, stats = trainer.on_policy.rewrite(trainer.student, 0, [[trainer.data.train[i]]
                                                                               for i in range(4)])
    return all_gather_object({"once": once, "per_token": per_token, "reference": reference, "unmasked": unmasked,
                              "stop_ids": list(settings.stop_ids), "max_new_tokens": settings.max_new_tokens,
                              "rewritten": [[(s.input_ids, s.targets) for s in g] for g in step_groups],
                              "flags": flags_})


def teacher_logits(env, flags, out_file):
    """The teacher's logits at each trained row of a packed micro-batch of the first four samples, and of the same
    prompts with the student's own responses (`on_policy_ratio` 1)."""
    from fsdp_kd.data import collate_packed

    trainer = trainer_from(flags, env)
    samples = [trainer.data.train[i] for i in range(4)]
    groups, _, _ = trainer.on_policy.rewrite(trainer.student, 0, [samples])
    out = {}
    for name, group in (("data", samples), ("on_policy", groups[0])):
        batch = collate_packed(group, 4 * trainer.cfg.max_len, trainer.data.pad_id).to(env.device)
        with trainer.teacher.targets(batch) as targets:
            logits = targets.hidden.float() @ targets.head.weight.float().T  # a plain head: the tiny Llama's
        out[name] = {"logits": logits, "samples": [(s.input_ids, s.targets) for s in group]}
    return out


def preempt(args, out_file) -> int:
    import fsdp_kd.cache_teacher as cache_teacher
    import fsdp_kd.teacher_ranks as teacher_ranks
    from fsdp_kd.checkpoint import CheckpointWriter
    from fsdp_kd.cli import run_training

    (kind, at), name, rank, flags = args[0].split(":"), args[1], int(args[2]), args[3:]

    def fire(when: int) -> None:
        if when == int(at) and rank in (-1, int(os.environ["RANK"])):  # -1: every rank, as torchrun forwards it
            signal.raise_signal(signal.Signals[name])

    if kind == "step":
        return run_training(parse_config(flags), on_step=lambda done, total: fire(done))
    owner, attribute = {"save": (CheckpointWriter, "save"), "chunk": (cache_teacher, "write_part"),
                        "serve": (teacher_ranks, "receive_layout")}[kind]
    original, received = getattr(owner, attribute), []

    def firing(*a, **k):
        if kind == "save":
            fire(a[3])  # (writer, root, optimizer, step)
            return original(*a, **k)
        out = original(*a, **k)
        received.append(out)
        fire(int(a[1].split("-")[1]) if kind == "chunk" else len(received))  # a part's name: part-CHUNK-...
        return out

    setattr(owner, attribute, firing)
    try:
        return cache_teacher.main(flags) if kind == "chunk" else run_training(parse_config(flags))
    finally:
        setattr(owner, attribute, original)  # a case host runs later cases in this process


MODES = {"grads": grads, "dense": dense, "gathers": gathers, "logits": logits, "families": families, "load": load,
         "generate": generate, "teacher_logits": teacher_logits}


def main(argv: list[str]) -> int:
    mode, out_file, args = argv[0], argv[1], argv[2:]
    if mode == "preempt":  # a whole run: its own process group handling and exit code
        return preempt(args, out_file)
    env = init_distributed()
    result = MODES[mode](env, args, out_file)
    if env.is_main:
        torch.save(result, out_file)
    teardown()
    return 0


if __name__ == "__main__":
    exit_process(main(sys.argv[1:]))
