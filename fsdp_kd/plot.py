"""Render one or more runs' metrics.jsonl into a PNG: train loss, CE, KL, eval curves and learning rate.

    python -m fsdp_kd.plot out/run_a [out/run_b ...] [--labels KD CE-only] [--out curves.png]

Several runs share each panel's axes, so a KD run and a CE-only run can be compared at a glance. Needs matplotlib
(`pip install -e ".[plot]"`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

PANELS = [("loss", "train loss"), ("ce", "train CE"), ("kl", "train KL(teacher‖student)"),
          ("eval_ce_loss", "eval CE"), ("eval_kl", "eval KL(teacher‖student)"), ("lr", "learning rate")]


def read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl") if os.path.isdir(run_dir) else run_dir
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_runs(run_dirs: list[str], labels: list[str], out_path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for run_dir, label in zip(run_dirs, labels):
        lines = read_metrics(run_dir)
        for ax, (key, title) in zip(axes.flat, PANELS):
            points = [(m["step"], m[key]) for m in lines if key in m]
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, label=label, marker="o" if key.startswith("eval") else None, markersize=3)
            ax.set_title(title)
            ax.set_xlabel("step")
    for ax in axes.flat:
        if ax.lines:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_path, dpi=90)
    plt.close(fig)
    return out_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="save_path directories (or metrics.jsonl files)")
    parser.add_argument("--labels", nargs="+", help="one legend label per run (default: directory names)")
    parser.add_argument("--out", help="PNG path (default: <first run>/curves.png)")
    args = parser.parse_args(argv)
    labels = args.labels or [os.path.basename(os.path.normpath(r)) for r in args.runs]
    if len(labels) != len(args.runs):
        print(f"error: {len(labels)} labels for {len(args.runs)} runs", file=sys.stderr)
        return 2
    for run in args.runs:
        path = os.path.join(run, "metrics.jsonl") if os.path.isdir(run) else run
        if not os.path.isfile(path):
            print(f"error: no metrics at {path}", file=sys.stderr)
            return 2
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print('error: plotting needs matplotlib: pip install -e ".[plot]"', file=sys.stderr)
        return 2
    out = args.out or os.path.join(args.runs[0] if os.path.isdir(args.runs[0]) else ".", "curves.png")
    print(plot_runs(args.runs, labels, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
