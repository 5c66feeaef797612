"""The plot command: one PNG with several runs on shared axes, and one-line errors."""

import json

from fsdp_kd.plot import main


def write_run(path, kl_scale):
    path.mkdir()
    with open(path / "metrics.jsonl", "w") as f:
        for step in range(1, 6):
            f.write(json.dumps({"step": step, "loss": 2 / step, "ce": 3 / step, "kl": kl_scale / step, "lr": 1e-3}) + "\n")
        f.write(json.dumps({"step": 5, "eval_ce_loss": 0.7, "eval_kl": 0.1 * kl_scale}) + "\n")


def test_overlays_runs_into_one_png(tmp_path):
    from PIL import Image

    write_run(tmp_path / "kd", 1.0)
    write_run(tmp_path / "ce", 2.0)
    out = tmp_path / "curves.png"
    assert main([str(tmp_path / "kd"), str(tmp_path / "ce"), "--labels", "KD", "CE", "--out", str(out)]) == 0
    with Image.open(out) as image:
        assert image.size[0] > 1000 and image.size[1] > 500


def test_errors_are_one_line(tmp_path, capsys):
    assert main([str(tmp_path / "missing")]) == 2
    assert "no metrics at" in capsys.readouterr().err
    write_run(tmp_path / "run", 1.0)
    assert main([str(tmp_path / "run"), "--labels", "a", "b"]) == 2
    assert "2 labels for 1 runs" in capsys.readouterr().err
