"""Runs under torchrun for the multi-rank tests: builds a real Trainer and dumps what a test compares.

    python -m torch.distributed.run --nproc_per_node N tests/dist_worker.py MODE OUT_FILE [train.py flags]

MODE grads   one step's accumulated gradients (full tensors), before the optimizer step
MODE dense   the kernel's loss and gradients, and the dense reference's, on the same FSDP-sharded batch
MODE logits  train, export, then the FSDP model's logits on a fixed batch (compared with from_pretrained)
MODE gathers how many teacher parameters FSDP all-gathers for one micro-batch's targets (forward and head)
"""

import sys

import torch

from fsdp_kd.config import parse_config
from fsdp_kd.distributed import exit_process, init_distributed, seed_everything, teardown
from fsdp_kd.reference import dense_distillation_loss
from fsdp_kd.data import collate
from fsdp_kd.distill import hidden_at_targets
from fsdp_kd.trainer import Trainer


def full_grads(trainer):
    return {n: p.grad.full_tensor().clone() for n, p in trainer.student.named_parameters() if p.grad is not None}


def dense_loss(lm, batch, spec, vocab_size, targets):
    hidden = hidden_at_targets(lm, batch)
    with targets.head() as teacher_head:
        return dense_distillation_loss(hidden, lm.get_output_embeddings().weight, batch.target_ids, spec,
                                       vocab_size, targets.hidden, teacher_head.weight)


def main():
    mode, out_file, flags = sys.argv[1], sys.argv[2], sys.argv[3:]
    cfg = parse_config(flags)
    env = init_distributed()
    seed_everything(cfg.seed, env.rank)
    trainer = Trainer(cfg, env)
    result = {}
    if mode == "grads":
        sums, _ = trainer.forward_backward(0)
        result = {"grads": full_grads(trainer), "metrics": trainer._reduce(sums)[0]}
    elif mode == "dense":
        batch = collate([trainer.train_samples[i] for i in range(env.rank * 4, env.rank * 4 + 4)],
                        trainer.tokenizer.pad_token_id)
        for name, fn in (("kernel", None), ("dense", dense_loss)):
            trainer.optimizer.zero_grad(set_to_none=True)
            if fn is None:
                loss, _ = trainer._run_micro_batch(batch)
            else:
                targets = trainer.teacher_source.targets(batch)
                loss, _ = trainer.student(fn, batch, trainer.spec, trainer.vocab_size, targets)
            loss.backward()
            total = loss.detach().clone()
            torch.distributed.all_reduce(total)
            result[name] = {"loss": total, "grads": full_grads(trainer)}
    elif mode == "gathers":
        import torch.distributed.fsdp._fully_shard._fsdp_param_group as param_group

        gathered, all_gather = [], param_group.foreach_all_gather

        def counting(fsdp_params, *args, **kwargs):
            gathered.append(sum(p._orig_size.numel() for p in fsdp_params))
            return all_gather(fsdp_params, *args, **kwargs)

        param_group.foreach_all_gather = counting
        batch = collate(trainer.train_samples[:2], trainer.tokenizer.pad_token_id).to(env.device)
        per_micro_batch = []
        for _ in range(2):
            gathered.clear()
            with trainer.teacher_source.targets(batch).head():
                pass
            per_micro_batch.append(sum(gathered))
        result = {"gathered": per_micro_batch, "parameters": sum(p.numel() for p in trainer.teacher.parameters())}
    elif mode == "logits":
        trainer.train()
        ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12], [13, 14, 15, 16, 17, 18, 19, 20]])
        with torch.no_grad():
            logits = trainer.student(lambda lm, x: lm(input_ids=x).logits, ids)
        result = {"input_ids": ids, "logits": logits}
    if env.is_main:
        torch.save(result, out_file)
    teardown()


if __name__ == "__main__":
    main()
    exit_process(0)
