"""Distil a teacher into a student: `torchrun --nproc_per_node N train.py --config configs/X.yaml [--key value ...]`.

With no arguments it runs the built-in demo. The work lives in `fsdp_kd/`; this file only starts it.
"""

from fsdp_kd.cli import console_main

if __name__ == "__main__":
    console_main()
