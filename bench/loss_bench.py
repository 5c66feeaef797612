"""The chunked KD loss against the dense reference and the bare matrix products, forward + backward, fp32, CPU.

    python bench/loss_bench.py                      # H=896, V=151936, T in 1024 2048 4096
    python bench/loss_bench.py --tokens 1024 --vocab 32000

Each measurement runs in a fresh subprocess so its peak RSS (ru_maxrss) is its own, and times the second of two calls
(the first pays for page faults). Four numbers per T:
  fused   the project's kernel (`fsdp_kd.loss.distillation_loss`), student + teacher, forward_kl, kd_coef 0.5
  dense   the obvious implementation: full fp32 logits for both models, log-softmax, CE + forward KL, autograd
  floor   the four matrix products the loss cannot avoid (student and teacher logits, grad of hidden, grad of head),
          2·T·H·V FLOP each, timed as plain torch.mm calls in the same run
  eval    the kernel under torch.no_grad() (evaluation: no gradient passes), as a fraction of `fused`, both timed
          in the `fused` process, alternating, best of two
"Overhead" is peak RSS minus what the process holds before the loss plus the bytes that the weights, the head's
gradient and the hidden states (and their gradient) need; the goal is at most 0.3 GB.

    python bench/loss_bench.py --launches           # the launch profile only
    python bench/loss_bench.py --vs_liger           # Liger's published shape on CUDA; on a CPU, issue 21's shape
    python bench/loss_bench.py --cross_tokenizer    # a Qwen2.5-vocabulary teacher into a SmolLM-vocabulary student

The cross-tokenizer comparison (issue 23) times one training call (forward + backward, fp32, T = 4096, H = 896,
forward KL) of `cross_vocab.CrossVocabTargets`, a teacher head of Qwen2.5's 151936 rows against a student head of
SmolLM's 49152, with the two real tokenizers' shared vocabulary (`cross_tokenizer.shared_vocabulary`, from
../shared/realdata) and ULD over each side's top 64 unshared tokens, against same-tokenizer KD at V = 151936 (the
teacher's vocabulary on both sides) and at V = 49152 (the student's). Each in a fresh process: the second of two
calls, and the process's peak RSS.

The launch profile counts, with the torch profiler, what one training call (forward + backward) of the kernel would
launch on a GPU, per 1k tokens, for every divergence: kernels, host syncs (`.item()`, `nonzero`) and matrix
products. It does so at the CPU block shape and at the CUDA one (`choose_chunks` for a CUDA device, forced here);
the counts do not depend on the device, only on the block shape.

The Liger comparison runs the kernel at the shape of Liger-Kernel's distillation benchmark
(`benchmark_distill_jsd_loss.py`: student H = 2048, teacher H = 4096, V = 128256, 8192 tokens, bf16, JSD β = 0.5
with CE and JSD weighted 0.5 each), and Liger's own `LigerFusedLinearJSDLoss` when it is installed. Each kernel runs
in a fresh process: the median of 10 forward + backward calls after 2 warm-ups, and the peak of the CUDA allocator
over them (inputs and weights included, as Liger measures it). Without CUDA it runs `CPU_SHAPE` instead (T = 4096 of
which 3072 have a label, H = 896, V = 151936, fp32; one call after one warm-up, max RSS), where Liger's shape would
take hours; install Liger beside torch in a bench-only venv and run this script with that venv's python.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

GB = 1024**3


def _rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(kind: str, tokens: int, hidden: int, vocab: int, token_chunk: int, vocab_chunk: int) -> dict:
    """One kind, timed on its second call (the first warms up), with the process's peak RSS."""
    import torch

    from fsdp_kd.loss import LossSpec

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
    run_once(kind, h_s, w_s, h_t, w_t, labels, spec, vocab)  # warm-up: the first call also pays for page faults
    h_s.grad = w_s.grad = None
    start = time.perf_counter()
    run_once(kind, h_s, w_s, h_t, w_t, labels, spec, vocab)
    seconds = time.perf_counter() - start
    peak = _rss_bytes()
    result = {"kind": kind, "tokens": tokens, "seconds": seconds, "peak_gb": peak / GB,
              "overhead_gb": (peak - base - needed) / GB}
    if kind == "fused":  # evaluation against training in the same process, alternating, best of two each
        times = {"eval": [], "fused": []}
        for _ in range(2):
            for name in times:
                h_s.grad = w_s.grad = None
                start = time.perf_counter()
                run_once(name, h_s, w_s, h_t, w_t, labels, spec, vocab)
                times[name].append(time.perf_counter() - start)
        result["eval_ratio"] = min(times["eval"]) / min(times["fused"])
    return result


def run_once(kind, h_s, w_s, h_t, w_t, labels, spec, vocab) -> None:
    import torch
    import torch.nn.functional as F

    from fsdp_kd.loss import distillation_loss

    if kind == "eval":
        with torch.no_grad():
            distillation_loss(h_s, w_s, labels, spec, vocab, h_t, w_t)
    elif kind == "floor":
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


def launch_table(args) -> None:
    import torch

    from fsdp_kd.divergences import DIVERGENCES
    from fsdp_kd.loss import choose_chunks
    from fsdp_kd.loss import LossSpec, distillation_loss
    from fsdp_kd.testing.profiling import profile_launches

    tokens = args.tokens[0]
    g = torch.Generator().manual_seed(0)
    h_s = torch.randn(tokens, args.profile_hidden, generator=g).requires_grad_()
    w_s = (torch.randn(args.vocab, args.profile_hidden, generator=g) * 0.02).requires_grad_()
    h_t = torch.randn(tokens, args.profile_hidden, generator=g)
    w_t = torch.randn(args.vocab, args.profile_hidden, generator=g) * 0.02
    labels = torch.randint(0, args.vocab, (tokens,), generator=g)
    shapes = {"cpu": choose_chunks(LossSpec(), torch.device("cpu"), tokens, args.vocab, 2),
              "cuda": choose_chunks(LossSpec(), torch.device("cuda"), tokens, args.vocab, 2)}
    print(f"\nlaunch profile: one training call (forward + backward), T={tokens}, V={args.vocab}, "
          f"H={args.profile_hidden} (H does not change the counts); per 1k tokens")
    print("| divergence | block shape (rows × columns) | kernel launches | host syncs | matmuls |")
    print("|---|---|---|---|---|")

    def training_call(spec):
        loss, _ = distillation_loss(h_s, w_s, labels, spec, args.vocab, h_t, w_t)
        loss.backward()

    for device, (rows, cols) in shapes.items():
        for name in DIVERGENCES:
            spec = LossSpec(kd_coef=0.5, divergence=name, token_chunk=rows, vocab_chunk=cols)
            _, profile = profile_launches(training_call, spec)
            launches, syncs, matmuls = profile.per_1k(tokens)
            print(f"| {name} | {device}: {rows} × {cols} | {launches:.0f} | {syncs:.0f} | {matmuls:.0f} |", flush=True)


@dataclass
class KernelShape:
    """One fused-loss call: tokens × hidden sizes × vocabulary, its dtype and the loss it computes."""
    tokens: int
    student_hidden: int
    teacher_hidden: int
    vocab: int
    dtype: str = "bf16"
    divergence: str = "jsd"
    jsd_beta: float = 0.5
    kd_coef: float = 0.5  # Liger's weight_soft_loss; its weight_hard_loss (CE) is 1 - kd_coef
    repeats: int = 10
    trained: int | None = None  # rows with a label (the rest are prompt: ignore_index); None: every row


# Liger-Kernel's benchmark_distill_jsd_loss.py: H = 4096 for the teacher, H // 2 for the student, bf16, BT up to 8192
LIGER_SHAPE = KernelShape(tokens=8192, student_hidden=2048, teacher_hidden=4096, vocab=128256)
# the CPU comparison (issue 21): a Qwen2.5-0.5B-sized head and a 4k-token micro-batch of which 3/4 are response
# tokens, fp32; fsdp-kd is handed the trained rows only, as the trainer does, Liger every row with ignore_index
CPU_SHAPE = KernelShape(tokens=4096, student_hidden=896, teacher_hidden=896, vocab=151936, dtype="fp32", repeats=1,
                        trained=3072)

KERNELS = {"fsdp_kd": "fsdp_kd.loss.distillation_loss", "liger": "Liger's LigerFusedLinearJSDLoss"}


def kernel_call(impl: str, shape: KernelShape, h_s, w_s, h_t, w_t, labels):
    """A forward + backward call of one kernel on these tensors; ImportError when that kernel is not installed."""
    if impl == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        liger = LigerFusedLinearJSDLoss(weight_hard_loss=1 - shape.kd_coef, weight_soft_loss=shape.kd_coef,
                                        beta=shape.jsd_beta)

        def call():
            out = liger(h_s, w_s, h_t, w_t, labels, None, None)
            (out[0] if isinstance(out, tuple) else out).backward()
        return call

    from fsdp_kd.loss import LossSpec, distillation_loss

    spec = LossSpec(kd_coef=shape.kd_coef, divergence=shape.divergence, jsd_beta=shape.jsd_beta)

    def call():
        loss, _ = distillation_loss(h_s, w_s, labels, spec, shape.vocab, h_t, w_t)
        loss.backward()
    return call


def timed_child(impl: str, shape: KernelShape) -> dict:
    """Median milliseconds of a forward + backward call and the peak memory over them, on CUDA if there is one."""
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[shape.dtype]
    torch.manual_seed(0)
    make = lambda *size, scale=1.0: (torch.randn(*size, device=device) * scale).to(dtype)  # noqa: E731
    h_s, w_s = make(shape.tokens, shape.student_hidden).requires_grad_(), make(
        shape.vocab, shape.student_hidden, scale=0.02).requires_grad_()
    h_t, w_t = make(shape.tokens, shape.teacher_hidden), make(shape.vocab, shape.teacher_hidden, scale=0.02)
    labels = torch.randint(0, shape.vocab, (shape.tokens,), device=device)
    if shape.trained is not None and impl == "liger":
        labels[shape.trained:] = -100  # Liger's ignore_index
    elif shape.trained is not None:  # the trainer hands the loss the rows with a label only
        h_s = h_s.detach()[:shape.trained].requires_grad_()
        h_t, labels = h_t[:shape.trained], labels[:shape.trained]
    try:
        call = kernel_call(impl, shape, h_s, w_s, h_t, w_t, labels)
    except ImportError:
        return {"impl": impl, "missing": "not installed"}

    def clock():
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    for _ in range(2 if device.type == "cuda" else 1):  # warm-up: kernel selection, compilation, allocator pools
        call()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(shape.repeats):
        h_s.grad = w_s.grad = None
        start = clock()
        call()
        times.append(clock() - start)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else _rss_bytes()
    return {"impl": impl, "ms": statistics.median(times) * 1000, "peak_gb": peak / GB, "device": device.type}


def timed(impl: str, shape: KernelShape) -> dict:
    """`timed_child` in a fresh process, so that its peak memory is its own; raises with the child's stderr."""
    cmd = [sys.executable, __file__, "--timed_child", impl, "--shape", json.dumps(dataclasses.asdict(shape))]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"loss_bench {impl} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def cross_child(kind: str, tokens: int, hidden: int, shared_ids: str) -> dict:
    """One training call of same-tokenizer KD at V = `kind` ("151936", "49152") or of the cross-vocabulary loss
    ("cross", with the shared ids saved by the parent at `shared_ids`, so that loading the tokenizers does not count
    in this process's peak), timed on its second call, with the process's peak RSS."""
    import numpy as np
    import torch

    from fsdp_kd.cross_vocab import CrossVocabTargets, VocabMap
    from fsdp_kd.kernel import Head
    from fsdp_kd.targets import LiveTargets
    from fsdp_kd.loss import LossSpec, loss_against

    torch.manual_seed(0)
    s_vocab, t_vocab = (49152, 151936) if kind == "cross" else (int(kind), int(kind))
    h_s = torch.randn(tokens, hidden).requires_grad_()
    w_s = (torch.randn(s_vocab, hidden) * 0.02).requires_grad_()
    h_t, w_t = torch.randn(tokens, hidden), torch.randn(t_vocab, hidden) * 0.02
    labels = torch.randint(0, s_vocab, (tokens,))
    if kind == "cross":
        s_ids, t_ids = torch.from_numpy(np.load(shared_ids))
        targets = CrossVocabTargets(h_t, Head(w_t), torch.randint(0, t_vocab, (tokens,)),
                                    VocabMap(s_ids, t_ids, s_vocab, t_vocab), uld_weight=1.0, uld_topk=64)
    else:
        targets = LiveTargets(h_t, Head(w_t))
    spec = LossSpec(kd_coef=0.5)
    for _ in range(2):  # the first call also pays for page faults
        h_s.grad = w_s.grad = None
        start = time.perf_counter()
        loss, _ = loss_against(h_s, w_s, labels, spec, s_vocab, targets)
        loss.backward()
        seconds = time.perf_counter() - start
    return {"kind": kind, "seconds": seconds, "peak_gb": _rss_bytes() / GB}


def real_shared_vocabulary():
    """SmolLM's and Qwen2.5's shared tokens, [2, m]: student ids, teacher ids, from the real tokenizers."""
    import numpy as np
    from transformers import AutoTokenizer

    from fsdp_kd.cross_tokenizer import TokenBytes, shared_vocabulary
    from realdata import realdata

    student, teacher = (TokenBytes.of(AutoTokenizer.from_pretrained(realdata(name)))
                        for name in ("tok_smollm_360m_instruct", "tok_qwen2.5_instruct"))
    shared = shared_vocabulary(student, teacher)
    return np.stack([shared.student_ids, shared.teacher_ids])


def cross_tokenizer_table(args) -> None:
    import tempfile

    import numpy as np

    tokens = 4096
    shared_ids = os.path.join(tempfile.mkdtemp(), "shared_ids.npy")
    np.save(shared_ids, real_shared_vocabulary())
    print(f"T={tokens}, H={args.hidden}, fp32, forward KL, kd_coef 0.5, forward + backward; cross: SmolLM student "
          "(V = 49152) against a Qwen2.5 teacher (V = 151936), ULD over each side's top 64 unshared tokens")
    print("| loss | time | peak RSS |\n|---|---|---|")
    results = {}
    for kind, name in (("151936", "same tokenizer, V = 151936"), ("49152", "same tokenizer, V = 49152"),
                       ("cross", "cross-tokenizer, 49152 / 151936")):
        cmd = [sys.executable, __file__, "--cross_child", kind, "--hidden", str(args.hidden), "--shared_ids", shared_ids]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"loss_bench cross {kind} failed:\n{out.stderr[-3000:]}")
        r = results[kind] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {name} | {r['seconds']:.1f} s | {r['peak_gb']:.2f} GB |", flush=True)
    for kind in ("151936", "49152"):
        print(f"cross / same at V = {kind}: time {results['cross']['seconds'] / results[kind]['seconds']:.2f}×, "
              f"peak RSS {results['cross']['peak_gb'] / results[kind]['peak_gb']:.2f}×")


def liger_table() -> None:
    import torch

    s = LIGER_SHAPE if torch.cuda.is_available() else CPU_SHAPE
    trained = "" if s.trained is None else f" ({s.trained} with a label)"
    print(f"T={s.tokens}{trained}, student H={s.student_hidden}, teacher H={s.teacher_hidden}, V={s.vocab}, {s.dtype}, "
          f"(1 - {s.kd_coef})·CE + {s.kd_coef}·JSD(β = {s.jsd_beta}); median of {s.repeats} forward + backward "
          "calls")
    print("| kernel | device | time | peak memory |\n|---|---|---|---|")
    results = {}
    for impl, name in KERNELS.items():
        r = results[impl] = timed(impl, s)
        if "missing" in r:
            print(f"| {name} | — | {r['missing']} | — |")
        else:
            print(f"| {name} | {r['device']} | {r['ms']:.1f} ms | {r['peak_gb']:.2f} GB |", flush=True)
    if all("ms" in r for r in results.values()):
        print(f"fsdp-kd / Liger: time {results['fsdp_kd']['ms'] / results['liger']['ms']:.2f}×, "
              f"peak memory {results['fsdp_kd']['peak_gb'] / results['liger']['peak_gb']:.2f}×")


def run_child(kind, args, tokens) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--tokens", str(tokens), "--hidden", str(args.hidden),
           "--vocab", str(args.vocab)]
    for flag in ("token_chunk", "vocab_chunk"):
        if getattr(args, flag) is not None:
            cmd += [f"--{flag}", str(getattr(args, flag))]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--hidden", type=int, default=896)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--token_chunk", type=int, help="default: chosen per device (loss.choose_chunks)")
    parser.add_argument("--vocab_chunk", type=int)
    parser.add_argument("--launches", action="store_true", help="print the launch profile only")
    parser.add_argument("--profile_hidden", type=int, default=64, help="hidden size for the launch profile")
    parser.add_argument("--skip_dense", action="store_true", help="the dense loss needs ~16.5 GB at T=4096")
    parser.add_argument("--vs_liger", action="store_true", help="Liger's published shape, against Liger's kernel")
    parser.add_argument("--cross_tokenizer", action="store_true",
                        help="the cross-tokenizer loss against same-tokenizer KD (T = 4096)")
    parser.add_argument("--cross_child", help=argparse.SUPPRESS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--timed_child", help=argparse.SUPPRESS)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    parser.add_argument("--shared_ids", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.timed_child:
        print(json.dumps(timed_child(args.timed_child, KernelShape(**json.loads(args.shape)))))
        return
    if args.vs_liger:
        liger_table()
        return
    if args.cross_child:
        print(json.dumps(cross_child(args.cross_child, 4096, args.hidden, args.shared_ids)))
        return
    if args.cross_tokenizer:
        cross_tokenizer_table(args)
        return
    if args.child:
        print(json.dumps(child(args.child, args.tokens[0], args.hidden, args.vocab, args.token_chunk, args.vocab_chunk)))
        return
    if args.launches:
        launch_table(args)
        return

    import torch

    from fsdp_kd.loss import choose_chunks
    from fsdp_kd.loss import LossSpec

    rows, cols = choose_chunks(LossSpec(token_chunk=args.token_chunk, vocab_chunk=args.vocab_chunk),
                               torch.device("cpu"), max(args.tokens), args.vocab, 2)
    print(f"H={args.hidden} V={args.vocab} fp32, forward+backward, blocks of {rows} tokens × {cols} columns, "
          f"torch threads={os.environ.get('OMP_NUM_THREADS', 'default')}")
    print("| T | fused time | dense time | matmul floor | fused / floor | fused / dense | eval / fused | "
          "fused peak RSS | fused overhead | dense peak RSS |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for tokens in args.tokens:
        floor = run_child("floor", args, tokens)
        fused = run_child("fused", args, tokens)
        dense = None if args.skip_dense else run_child("dense", args, tokens)
        dense_time = f"{dense['seconds']:.1f} s" if dense else "—"
        ratio_dense = f"{fused['seconds'] / dense['seconds']:.2f}×" if dense else "—"
        dense_peak = f"{dense['peak_gb']:.2f} GB" if dense else "—"
        print(f"| {tokens} | {fused['seconds']:.1f} s | {dense_time} | {floor['seconds']:.1f} s | "
              f"{fused['seconds'] / floor['seconds']:.2f}× | {ratio_dense} | {fused['eval_ratio']:.2f}× | "
              f"{fused['peak_gb']:.2f} GB | "
              f"{fused['overhead_gb']:+.2f} GB | {dense_peak} |", flush=True)
    launch_table(args)


if __name__ == "__main__":
    main()
