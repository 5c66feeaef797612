"""TRL's GKDTrainer on `bench/startup_bench.py`'s job, under torchrun; prints a marker when its first step ends.

Runs in a separate venv that has trl (1.x keeps GKD under trl.experimental.gkd); fsdp-kd never imports it.
Off-policy forward KL like the fsdp-kd side: lmbda 0 (no student generations), beta 0 (KL), micro-batch 4, fp32.
The character tokenizer has no chat template, so a minimal ChatML-like one is set here for TRL's collator.
"""

from __future__ import annotations

import argparse
import json
import time

FIRST_STEP_MARKER = "first step finished"  # bench/startup_bench.py waits for this line
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}"
                 "{% endif %}{% endfor %}{% if add_generation_prompt %}{% endif %}")


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("student", "teacher", "data", "out"):
        parser.add_argument(f"--{name}", required=True)
    args = parser.parse_args()

    import torch.distributed as dist
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    try:
        from trl.experimental.gkd import GKDConfig, GKDTrainer
    except ImportError:
        from trl import GKDConfig, GKDTrainer

    class FirstStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1 and (not dist.is_initialized() or dist.get_rank() == 0):
                print(f"{FIRST_STEP_MARKER} at {time.time():.3f}", flush=True)

    tok = AutoTokenizer.from_pretrained(args.student)
    tok.chat_template = CHAT_TEMPLATE
    with open(args.data) as f:
        records = [json.loads(line) for line in f]
    data = Dataset.from_list([{"messages": [{"role": "user", "content": r["input"]},
                                            {"role": "assistant", "content": r["output"]}]} for r in records])
    config = GKDConfig(output_dir=args.out, per_device_train_batch_size=4, gradient_accumulation_steps=1,
                       max_steps=50, learning_rate=1e-3, lmbda=0.0, beta=0.0, temperature=1.0, max_length=32,
                       logging_steps=1000, save_strategy="no", report_to=[], use_cpu=True, bf16=False, fp16=False,
                       dataloader_num_workers=0, seed=42)
    trainer = GKDTrainer(model=AutoModelForCausalLM.from_pretrained(args.student),
                         teacher_model=AutoModelForCausalLM.from_pretrained(args.teacher), args=config,
                         train_dataset=data, processing_class=tok, callbacks=[FirstStep()])
    trainer.train()


if __name__ == "__main__":
    main()
