"""Loading into shards, teacher/student tokenizer agreement (padded rows are fine, a different tokenizer is
refused), and the table that picks a teacher kind."""

import pytest
import torch

from fsdp_kd.errors import ConfigError
from fsdp_kd.testing.tiny import build_char_tokenizer
from fsdp_kd.tokenizer_compat import load_tokenizer, shared_vocab_size

from assets import real_asset
from conftest import REPO, torchrun


def test_same_tokenizer_shares_its_full_range(tiny):
    tok = load_tokenizer(tiny["tok"], False)
    assert shared_vocab_size(tok, tok) == len(tok)


def test_teacher_with_extra_tokens_beyond_the_students_range_is_fine(tiny, tmp_path):
    student = load_tokenizer(tiny["tok"], False)
    teacher = build_char_tokenizer(str(tmp_path / "t"), extra_chars="äöü")
    assert shared_vocab_size(student, teacher) == len(student) < len(teacher)


def test_tokenizers_that_differ_are_refused_with_the_first_differing_id(tiny, chat_bpe_tok):
    chars, bpe = load_tokenizer(tiny["tok"], False), load_tokenizer(chat_bpe_tok, False)
    assert len(chars) < len(bpe)
    with pytest.raises(ConfigError, match=r"tokenizers differ at id 0: student '<pad>' vs teacher '<\|endoftext\|>'"):
        shared_vocab_size(chars, bpe)
    with pytest.raises(ConfigError, match="fewer than the student's"):
        shared_vocab_size(bpe, chars)


def test_qwen_tokenizer_range_is_its_length_not_the_padded_embedding():
    qwen = load_tokenizer(str(real_asset("tok_qwen2.5_instruct")), False)
    assert shared_vocab_size(qwen, qwen) == 151665  # models pad their embeddings to 151936; those rows are ignored


def test_each_rank_reads_its_own_shards_from_disk(tiny, tmp_path):
    """Untied (Llama) and tied (Qwen2) models, as student and as offloaded teacher, sharded over 2 ranks from their
    safetensors equal from_pretrained exactly; an MoE checkpoint (per-expert tensors that transformers fuses at load
    time) takes rank 0's broadcast path and is exact too."""
    from test_families import build

    moe = tmp_path / "mixtral"
    build("mixtral", seed=0).save_pretrained(moe)
    sharded = tmp_path / "sharded"  # an indexed checkpoint of several files
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tiny["teacher"]).save_pretrained(sharded, max_shard_size="60KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    out = tmp_path / "load.pt"
    proc = torchrun([str(REPO / "tests" / "dist_worker.py"), "load", str(out), f"llama={tiny['teacher']}",
                     f"qwen={tiny['qwen_student']}", f"indexed={sharded}", f"mixtral={moe}"])
    differences = torch.load(out, weights_only=True)
    assert len(differences) == 8 and all(d == 0.0 for d in differences.values()), differences
    assert proc.stdout.count("each rank reads its own shards from the safetensors files") == 6
    assert "its tensor names differ from the model's" in proc.stdout


def test_a_hub_id_is_fetched_once_per_node_and_read_shard_by_shard(tiny, tmp_path):
    """`--pretrain org/name` with the model in the HF cache (offline: nothing is reachable here): local rank 0
    resolves it while the other rank waits, then both read their own shards from the snapshot's safetensors."""
    import os
    import shutil

    from conftest import read_metrics, train_args

    commit = "0" * 40
    repo = tmp_path / "hub" / "models--fsdpkd--tiny-student"
    shutil.copytree(tiny["student"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        out = torchrun([str(REPO / "train.py"), *train_args(tiny, tmp_path / "out", pretrain="fsdpkd/tiny-student",
                                                            max_steps=1)])
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    assert "loading the student from" in out.stdout and "each rank reads its own shards" in out.stdout
    assert out.stdout.count("downloading fsdpkd/tiny-student from the hub") == 1
    assert len(read_metrics(tmp_path / "out")) == 1


@pytest.mark.parametrize("keys, kind", [
    ({}, "none"), ({"teacher_model": "t"}, "live"),
    ({"teacher_model": "t", "cross_tokenizer": True}, "cross_tokenizer"),
    ({"teacher_model": "t", "teacher_ranks": 1}, "teacher_ranks"),
    ({"teacher_model": "t", "teacher_ranks": 1, "cross_tokenizer": True}, "teacher_ranks"),
    ({"teacher_cache": "c"}, "cache"),
    ({"teacher_model": "t", "teacher_cache": "c", "cross_tokenizer": True}, "cache")])
def test_a_config_names_one_teacher_kind(keys, kind):
    from fsdp_kd.config import TrainConfig
    from fsdp_kd.teacher import TEACHERS, teacher_kind

    assert teacher_kind(TrainConfig(pretrain="s", dataset="d", **keys)) == kind and kind in TEACHERS


def test_every_teacher_kind_answers_what_a_run_asks():
    import inspect

    from fsdp_kd.teacher import TEACHERS, Teacher

    asked = [name for name, member in vars(Teacher).items() if inspect.isfunction(member) or
             isinstance(member, classmethod)]
    assert {"from_config", "check", "load", "verify", "describe", "begin", "targets", "close"} <= set(asked)
    for name, kind in TEACHERS.items():
        assert all(callable(getattr(kind, method, None)) for method in asked), name
        assert isinstance(kind.distills, bool) and hasattr(kind, "metric_names"), name
