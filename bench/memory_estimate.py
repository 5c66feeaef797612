"""Paper estimate of per-GPU memory and step time for a distillation run, from parameter counts and activation sizes.

    python bench/memory_estimate.py                                  # Llama-3-70B → Llama-3-8B, 2 and 4 nodes of 8
    python bench/memory_estimate.py --tokens 8192 --gpu_gb 80 --nodes 2 4 8

Nothing is run: every figure is arithmetic on the formulas below, so others can rerun it for their own models.

Memory per GPU, bytes (N = parameters, S = ranks a model is sharded over, L layers, H hidden, I MLP width, V vocab,
T tokens per micro-batch):
  student state     16·N_s / S_s        fp32 master weights 4 + fp32 gradients 4 + AdamW moments 8
  student gathered  2·N_layer_s·2 + 2·V·H_s·2 + N_layer_s·4
                    two bf16 layers in flight (current + prefetched), the root's embedding and head in bf16, one
                    layer's fp32 gradient before its reduce-scatter (a tied embedding is the head: 1·V·H, here
                    and wherever a formula counts both vocabulary matrices)
  teacher shards    2·N_t / S_t on the GPU, or 0 with teacher_offload (then it sits in host RAM)
  teacher gathered  2·N_layer_t·2 + 2·V·H_t·2       two bf16 layers in flight and its root
  activations       student, activation checkpointing: L_s·T·H_s·2 (layer inputs) + T·(34·H_s + 4·I_s)·2/2
                    (one layer recomputed); teacher: T·(4·H_t + 2·I_t)·2 (one layer, no grad)
  loss kernel       2·128·V·4 (two logit caches) + V·H_s·4 (head gradient) + T·(H_s + H_t)·4
Time per micro-batch: compute (6·N_s + 2·N_t)·T FLOP at `--tflops` sustained; all-gathers move every parameter of a
model to every GPU once per forward (student twice: forward and backward), at `--intra_gbps` inside a node or
`--inter_gbps` across nodes; offloaded teacher shards also cross PCIe (`--pcie_gbps`).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

GB = 1e9


@dataclass
class Shape:
    name: str
    hidden: int
    layers: int
    mlp: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = False  # one matrix for the input embedding and the output head

    @property
    def vocab_matrices(self) -> int:
        return 1 if self.tied else 2

    @property
    def layer_params(self) -> int:
        head_dim = self.hidden // self.heads
        attention = 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_heads * head_dim
        return attention + 3 * self.hidden * self.mlp + 2 * self.hidden

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.vocab_matrices * self.vocab * self.hidden + self.hidden


LLAMA3_70B = Shape("Llama-3-70B", 8192, 80, 28672, 64, 8, 128256)
LLAMA3_8B = Shape("Llama-3-8B", 4096, 32, 14336, 32, 8, 128256)


def memory_per_gpu(teacher: Shape, student: Shape, shard: int, tokens: int, offload: bool) -> dict[str, float]:
    """Bytes per GPU by part (the docstring's formulas), each model sharded over `shard` ranks."""
    s, t = student, teacher
    return {
        "student state": 16 * s.params / shard,
        "student gathered": 2 * s.layer_params * 2 + s.vocab_matrices * s.vocab * s.hidden * 2 + s.layer_params * 4,
        "teacher shards": 0 if offload else 2 * t.params / shard,
        "teacher gathered": 2 * t.layer_params * 2 + t.vocab_matrices * t.vocab * t.hidden * 2,
        "activations": (s.layers * tokens * s.hidden * 2 + tokens * (34 * s.hidden + 4 * s.mlp)
                        + tokens * (4 * t.hidden + 2 * t.mlp) * 2),
        "loss kernel": 2 * 128 * s.vocab * 4 + s.vocab * s.hidden * 4 + tokens * (s.hidden + t.hidden) * 4,
    }


def estimate(teacher: Shape, student: Shape, nodes: int, per_node: int, tokens: int, hybrid: bool, offload: bool,
             args) -> dict:
    world = nodes * per_node
    shard = per_node if hybrid else world
    s, t = student, teacher
    memory = memory_per_gpu(teacher, student, shard, tokens, offload)
    compute = (6 * s.params + 2 * t.params) * tokens / (args.tflops * 1e12)
    # bytes each GPU receives per micro-batch; with HSDP all of it moves inside the node
    gather_bw = args.intra_gbps if (hybrid or nodes == 1) else args.inter_gbps
    student_comm = (2 * 2 * s.params + 4 * s.params) / (gather_bw * GB)  # 2 bf16 all-gathers + fp32 reduce-scatter
    teacher_comm = 2 * t.params / (gather_bw * GB)
    pcie = 2 * t.params / shard / (args.pcie_gbps * GB) if offload else 0.0
    return {"memory": memory, "total": sum(memory.values()), "compute": compute, "student_comm": student_comm,
            "teacher_comm": teacher_comm, "pcie": pcie, "host": 2 * t.params / shard * per_node if offload else 0}


def split_estimate(teacher: Shape, student: Shape, teacher_gpus: int, student_gpus: int, per_node: int, tokens: int,
                   args) -> dict:
    """The teacher on its own ranks (issue 24's `--teacher_ranks`, not built yet): `teacher_gpus` hold the teacher's
    body full-sharded among themselves, `student_gpus` the student and the teacher's head (sharded like the
    student), and each teacher GPU runs the forwards of student_gpus / teacher_gpus student ranks and sends each its
    final hidden states (T·H_t bf16). Per round every student GPU trains one micro-batch. A group inside one node
    gathers at `intra_gbps`, else at `inter_gbps`; the hidden states cross nodes at `inter_gbps`. Both sides prefetch
    (communication under compute) and the teacher runs a micro-batch ahead, so a round takes the longest of the
    student's side, the teacher's side and the transfer."""
    s, t = student, teacher
    head_t = t.vocab * t.hidden
    body_t = t.params - head_t  # what the teacher ranks hold: all but the output head
    served = student_gpus / teacher_gpus  # student micro-batches each teacher GPU computes per round
    hidden_bytes = tokens * t.hidden * 2
    student_mem = {
        "student state": 16 * s.params / student_gpus,
        "student gathered": 2 * s.layer_params * 2 + s.vocab_matrices * s.vocab * s.hidden * 2 + s.layer_params * 4,
        "teacher head": 2 * head_t / student_gpus + 2 * head_t,  # its shard, and gathered for the loss
        "activations": s.layers * tokens * s.hidden * 2 + tokens * (34 * s.hidden + 4 * s.mlp),
        "loss kernel": 2 * 128 * s.vocab * 4 + s.vocab * s.hidden * 4 + tokens * (s.hidden + t.hidden) * 4,
        "received hidden": 2 * hidden_bytes,  # the current micro-batch's and the next one's
    }
    teacher_mem = {
        "teacher shards": 2 * body_t / teacher_gpus,
        "teacher gathered": 2 * t.layer_params * 2 + t.vocab * t.hidden * 2,  # two layers and the embedding
        "activations": 2 * tokens * (4 * t.hidden + 2 * t.mlp) * 2,  # one layer, two micro-batches in flight
        "sent hidden": 2 * hidden_bytes * served,
    }

    def bandwidth(gpus: int) -> float:
        return (args.intra_gbps if gpus <= per_node else args.inter_gbps) * GB

    student_compute = (6 * s.params + 2 * head_t) * tokens / (args.tflops * 1e12)  # the head's logits: in the loss
    student_comm = (2 * 2 * s.params + 4 * s.params + 2 * head_t) / bandwidth(student_gpus)
    teacher_compute = 2 * body_t * tokens * served / (args.tflops * 1e12)
    teacher_comm = 2 * body_t * served / bandwidth(teacher_gpus)  # one gather of the body per forward
    transfer = hidden_bytes * served / (args.inter_gbps * GB)
    student_side, teacher_side = max(student_compute, student_comm), max(teacher_compute, teacher_comm)
    round_time = max(student_side, teacher_side, transfer)
    return {"student": student_mem, "teacher": teacher_mem, "student_side": student_side,
            "teacher_side": teacher_side, "transfer": transfer, "round": round_time,
            "per_micro_batch": round_time / student_gpus, "hidden_bytes": hidden_bytes}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--gpus_per_node", type=int, default=8)
    parser.add_argument("--gpu_gb", type=float, default=80)
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per micro-batch per GPU")
    parser.add_argument("--tflops", type=float, default=400, help="sustained bf16 TFLOP/s per GPU")
    parser.add_argument("--intra_gbps", type=float, default=150, help="all-gather GB/s per GPU inside a node")
    parser.add_argument("--inter_gbps", type=float, default=40, help="all-gather GB/s per GPU across nodes")
    parser.add_argument("--pcie_gbps", type=float, default=25, help="host-to-device GB/s per GPU")
    parser.add_argument("--splits", default="8:8,12:4,4:12",
                        help="teacher:student GPUs of the teacher-ranks layouts, on --nodes[0] nodes")
    args = parser.parse_args()
    t, s = LLAMA3_70B, LLAMA3_8B
    print(f"{t.name} ({t.params / 1e9:.1f}B) → {s.name} ({s.params / 1e9:.2f}B), {args.tokens} tokens per "
          f"micro-batch per GPU, {args.gpus_per_node}×{args.gpu_gb:.0f} GB per node, activation checkpointing on\n")
    print("| nodes | layout | teacher offload | student state | teacher shards | gathered (s+t) | activations + loss | "
          "total / GPU | fits | compute | student comm | teacher comm | PCIe | host RAM / node |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for nodes in args.nodes:
        for hybrid in (False, True):
            for offload in (False, True):
                r = estimate(t, s, nodes, args.gpus_per_node, args.tokens, hybrid, offload, args)
                m = r["memory"]
                print(f"| {nodes} | {'HSDP' if hybrid else 'full shard'} | {'on' if offload else 'off'} | "
                      f"{m['student state'] / GB:.1f} GB | {m['teacher shards'] / GB:.1f} GB | "
                      f"{(m['student gathered'] + m['teacher gathered']) / GB:.1f} GB | "
                      f"{(m['activations'] + m['loss kernel']) / GB:.1f} GB | {r['total'] / GB:.1f} GB | "
                      f"{'yes' if r['total'] < 0.9 * args.gpu_gb * GB else 'NO'} | {r['compute']:.2f} s | "
                      f"{r['student_comm']:.2f} s | {r['teacher_comm']:.2f} s | {r['pcie']:.2f} s | "
                      f"{r['host'] / GB:.0f} GB |")

    print_splits(t, s, args)


def print_splits(t: Shape, s: Shape, args) -> None:
    """The teacher on its own ranks against co-location, per student micro-batch, on --nodes[0] nodes."""
    nodes, per_node = args.nodes[0], args.gpus_per_node
    world = nodes * per_node
    hidden, logits = args.tokens * t.hidden * 2, args.tokens * t.vocab * 4
    print(f"\nThe teacher on its own ranks (not built yet: issue 24), {nodes} nodes of {per_node}. Sent per student "
          f"micro-batch: its final hidden states, {hidden / 1e6:.0f} MB in bf16, against {logits / 1e6:.0f} MB of "
          f"fp32 logits ({logits / hidden:.0f}×) or {logits / 2 / hidden:.0f}× in bf16.\n")
    print("| layout | student GPU memory | teacher GPU memory | student side | teacher side | transfer | round | "
          "per micro-batch (round / student GPUs) |")
    print("|---|---|---|---|---|---|---|---|")
    for hybrid in (False, True):
        r = estimate(t, s, nodes, per_node, args.tokens, hybrid, False, args)
        step = max(r["compute"], r["student_comm"] + r["teacher_comm"])
        print(f"| co-located, {'HSDP' if hybrid else 'full shard'} on {world} | {r['total'] / GB:.1f} GB | (same GPUs) "
              f"| | | | {step:.2f} s | {step / world:.3f} s |")
    for split in args.splits.split(","):
        teacher_gpus, student_gpus = (int(x) for x in split.split(":"))
        if teacher_gpus + student_gpus != world:
            continue
        r = split_estimate(t, s, teacher_gpus, student_gpus, per_node, args.tokens, args)
        print(f"| {teacher_gpus} teacher + {student_gpus} student | {sum(r['student'].values()) / GB:.1f} GB | "
              f"{sum(r['teacher'].values()) / GB:.1f} GB | {r['student_side']:.2f} s | {r['teacher_side']:.2f} s | "
              f"{r['transfer'] * 1e3:.1f} ms | {r['round']:.2f} s | {r['per_micro_batch']:.3f} s |")


if __name__ == "__main__":
    main()
