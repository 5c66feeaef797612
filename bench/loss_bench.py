"""The chunked KD loss against the dense reference and the bare matrix products, forward + backward, fp32, CPU.

    python bench/loss_bench.py                      # H=896, V=151936, T in 1024 2048 4096
    python bench/loss_bench.py --tokens 1024 --vocab 32000

Each measurement runs in a fresh subprocess so its peak RSS (ru_maxrss) is its own. Three numbers per T:
  fused   the project's kernel (`fsdp_kd.loss.distillation_loss`), student + teacher, forward_kl, kd_coef 0.5
  dense   the obvious implementation: full fp32 logits for both models, log-softmax, CE + forward KL, autograd
  floor   the four matrix products the loss cannot avoid (student and teacher logits, grad of hidden, grad of head),
          2·T·H·V FLOP each, timed as plain torch.mm calls in the same run
"Overhead" is peak RSS minus what the process holds before the loss plus the bytes that the weights, the head's
gradient and the hidden states (and their gradient) need; the goal is at most 0.3 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

GB = 1024**3


def _rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(kind: str, tokens: int, hidden: int, vocab: int, token_chunk: int, vocab_chunk: int) -> dict:
    import torch

    import torch.nn.functional as F

    from fsdp_kd.loss import LossSpec, distillation_loss

    torch.manual_seed(0)
    base = _current_rss()
    h_s = torch.randn(tokens, hidden).requires_grad_()
    w_s = (torch.randn(vocab, hidden) * 0.02).requires_grad_()
    h_t = torch.randn(tokens, hidden)
    w_t = torch.randn(vocab, hidden) * 0.02
    labels = torch.randint(0, vocab, (tokens,))
    # weights, head gradient, hidden states and their gradient: what any implementation must hold
    needed = 4 * (2 * vocab * hidden + vocab * hidden + 2 * tokens * hidden + tokens * hidden)
    spec = LossSpec(kd_coef=0.5, token_chunk=token_chunk, vocab_chunk=vocab_chunk)
    start = time.perf_counter()
    if kind == "floor":
        with torch.no_grad():
            z = torch.mm(h_s, w_s.t())
            torch.mm(h_t, w_t.t())
            torch.mm(z, w_s)
            torch.mm(z.t(), h_s)
    elif kind == "fused":
        loss, _ = distillation_loss(h_s, w_s, labels, spec, vocab, h_t, w_t)
        loss.backward()
    else:
        z_s = h_s @ w_s.t()
        with torch.no_grad():
            log_p = F.log_softmax(h_t @ w_t.t(), dim=-1)
        log_q = F.log_softmax(z_s, dim=-1)
        kl = F.kl_div(log_q, log_p, log_target=True, reduction="sum")
        loss = 0.5 * F.nll_loss(log_q, labels, reduction="sum") + 0.5 * kl
        loss.backward()
    seconds = time.perf_counter() - start
    peak = _rss_bytes()
    return {"kind": kind, "tokens": tokens, "seconds": seconds, "peak_gb": peak / GB,
            "overhead_gb": (peak - base - needed) / GB}


def run_child(kind, args, tokens) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--tokens", str(tokens), "--hidden", str(args.hidden),
           "--vocab", str(args.vocab), "--token_chunk", str(args.token_chunk), "--vocab_chunk", str(args.vocab_chunk)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    from fsdp_kd.loss import LossSpec

    defaults = LossSpec()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--hidden", type=int, default=896)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--token_chunk", type=int, default=defaults.token_chunk)
    parser.add_argument("--vocab_chunk", type=int, default=defaults.vocab_chunk)
    parser.add_argument("--skip_dense", action="store_true", help="the dense loss needs ~16.5 GB at T=4096")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.tokens[0], args.hidden, args.vocab, args.token_chunk, args.vocab_chunk)))
        return

    print(f"H={args.hidden} V={args.vocab} fp32, forward+backward, token_chunk={args.token_chunk} "
          f"vocab_chunk={args.vocab_chunk}, torch threads={os.environ.get('OMP_NUM_THREADS', 'default')}")
    print("| T | fused time | dense time | matmul floor | fused / floor | fused / dense | fused peak RSS | "
          "fused overhead | dense peak RSS |")
    print("|---|---|---|---|---|---|---|---|---|")
    for tokens in args.tokens:
        floor = run_child("floor", args, tokens)
        fused = run_child("fused", args, tokens)
        dense = None if args.skip_dense else run_child("dense", args, tokens)
        dense_time = f"{dense['seconds']:.1f} s" if dense else "—"
        ratio_dense = f"{fused['seconds'] / dense['seconds']:.2f}×" if dense else "—"
        dense_peak = f"{dense['peak_gb']:.2f} GB" if dense else "—"
        print(f"| {tokens} | {fused['seconds']:.1f} s | {dense_time} | {floor['seconds']:.1f} s | "
              f"{fused['seconds'] / floor['seconds']:.2f}× | {ratio_dense} | {fused['peak_gb']:.2f} GB | "
              f"{fused['overhead_gb']:+.2f} GB | {dense_peak} |", flush=True)


if __name__ == "__main__":
    main()
