"""fsdp-kd: knowledge distillation for causal language models on FSDP2, in pure PyTorch."""
