"""Bad input through the real entry point: one line on stderr, a non-zero exit, nothing written, no traceback."""

import os
import re
import shutil

import pytest

from conftest import REPO, python_run, torchrun, train_args


def run_train(args, cwd, fresh=False, **extra_env):
    return python_run([REPO / "train.py", *args], cwd, timeout=120, fresh=fresh, **extra_env)


def assert_one_line_error(proc, pattern):
    import re

    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and re.search(pattern, lines[0]), lines[0]


@pytest.fixture
def mismatched_teacher(tiny, tmp_path, chat_bpe_tok):
    """The tiny teacher's weights with another tokenizer (a BPE, more ids than the student's): refused at id 0."""
    path = tmp_path / "other_teacher"
    shutil.copytree(tiny["teacher"], path)
    for name in os.listdir(chat_bpe_tok):
        shutil.copy(os.path.join(chat_bpe_tok, name), path / name)
    return str(path)


def test_missing_model_path(tiny, tmp_path):
    """A process of its own: nothing imported or warned before the one line."""
    proc = run_train(train_args(tiny, tmp_path / "out", pretrain=str(tmp_path / "nope")), tmp_path, fresh=True)
    assert_one_line_error(proc, r"key pretrain: model directory not found: .*nope")
    assert not (tmp_path / "out").exists()


def test_missing_dataset(tiny, tmp_path):
    proc = run_train(train_args(tiny, tmp_path / "out", dataset=str(tmp_path / "missing.jsonl")), tmp_path)
    assert_one_line_error(proc, r"key dataset: path not found: .*missing\.jsonl")


def test_unknown_key(tiny, tmp_path):
    proc = run_train(train_args(tiny, tmp_path / "out") + ["--micro_batch_size", "2"], tmp_path)
    assert_one_line_error(proc, r"unknown key 'micro_batch_size'; valid keys: .*micro_train_batch_size")


def test_wrong_type(tiny, tmp_path):
    proc = run_train(train_args(tiny, tmp_path / "out", learning_rate="fast"), tmp_path)
    assert_one_line_error(proc, r"key 'learning_rate' expects a float, got 'fast'")


def test_different_tokenizers(tiny, tmp_path, mismatched_teacher):
    proc = run_train(train_args(tiny, tmp_path / "out", teacher_model=mismatched_teacher), tmp_path)
    assert_one_line_error(proc, r"tokenizers differ at id 0")
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_empty_dataset(tiny, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    proc = run_train(train_args(tiny, tmp_path / "out", dataset=str(empty)), tmp_path)
    assert_one_line_error(proc, r"empty\.jsonl: no usable samples")


def test_earlier_outputs_are_never_overwritten(tiny, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    proc = run_train(train_args(tiny, out), tmp_path)
    assert_one_line_error(proc, r"already holds a model or metrics from an earlier run")
    assert (out / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_a_plain_single_process_run_works(tiny, tmp_path):
    """A process of its own: a world of one made without torchrun, and its own exit."""
    proc = run_train(train_args(tiny, tmp_path / "out", max_steps=2, train_batch_size=8), tmp_path, fresh=True)
    assert proc.returncode == 0, proc.stderr
    assert "step 2/2" in proc.stdout and (tmp_path / "out" / "config.json").is_file()


def test_missing_logger_package_is_named_before_any_work(tiny, tmp_path):
    proc = run_train(train_args(tiny, tmp_path / "out", use_wandb="my-project"), tmp_path)
    assert_one_line_error(proc, r"key use_wandb: the wandb package is not installed; pip install wandb")
    assert not (tmp_path / "out").exists()


def test_tensorboard_mirrors_the_metrics(tiny, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = tmp_path / "tb"
    proc = run_train(train_args(tiny, tmp_path / "out", max_steps=3, train_batch_size=8, use_tensorboard=str(logs)),
                     tmp_path)
    assert proc.returncode == 0, proc.stderr
    events = EventAccumulator(str(logs))
    events.Reload()
    assert [e.step for e in events.Scalars("kl")] == [1, 2, 3]
    assert {"loss", "ce", "teacher_entropy", "lr", "grad_norm", "peak_mem_gb"} <= set(events.Tags()["scalars"])


def test_sft_without_a_teacher_logs_no_teacher_metrics(tiny, tmp_path):
    from conftest import read_metrics

    proc = run_train(train_args(tiny, tmp_path / "out", teacher_model=None, kd_coef=0, max_steps=2, train_batch_size=8),
                     tmp_path)
    assert proc.returncode == 0, proc.stderr
    first = read_metrics(tmp_path / "out")[0]
    assert "ce" in first and first["loss"] == first["ce"]
    assert not {"kl", "teacher_entropy", "kd", "top1_agreement"} & first.keys()  # not zeros: absent


def test_unknown_model_name_is_one_line(tiny, tmp_path):
    proc = run_train(train_args(tiny, tmp_path / "out", pretrain="models/no-such-student"), tmp_path,
                     HF_HUB_OFFLINE="1")
    assert_one_line_error(proc, r"key pretrain: cannot load a tokenizer from 'models/no-such-student'")


@pytest.mark.parametrize("key", ["save_path", "ckpt_path"])
def test_an_output_path_that_is_a_file_is_one_line(tiny, tmp_path, key):
    target = tmp_path / "a_file"
    target.write_text("not a directory")
    save_path = target if key == "save_path" else tmp_path / "out"
    extra = {"ckpt_path": str(target)} if key == "ckpt_path" else {}
    proc = run_train(train_args(tiny, save_path, **extra), tmp_path)
    assert_one_line_error(proc, rf"key {key}: .*a_file is a file, not a directory")
    assert target.read_text() == "not a directory"


def test_a_truncated_safetensors_shard_is_refused_with_its_name(tiny, tmp_path):
    """A download cut short: the file's header promises more bytes than it has."""
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny["teacher"], teacher)
    weights = teacher / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:len(data) // 2])
    proc = run_train(train_args(tiny, tmp_path / "out", teacher_model=str(teacher)), tmp_path)
    assert_one_line_error(proc, r"key teacher_model: .*teacher/model\.safetensors is truncated or not a safetensors "
                                r"file .*re-download it")
    assert not (tmp_path / "out").exists()


def test_a_tokenizer_without_a_chat_template_is_one_line_before_any_model_loads(tiny, tmp_path):
    """The tiny character tokenizer has no chat template. train.py and cache_teacher (2 ranks: rank 0 says it once)
    stop on --apply_chat_template with one line naming the tokenizer's directory and the fix; the fix it names
    (a template file in tokenizer_chat_template) makes the same run train."""
    fix = r"set tokenizer_chat_template \(a Jinja template or a file\), or drop --apply_chat_template"
    proc = run_train(train_args(tiny, tmp_path / "out", apply_chat_template=True), tmp_path)
    assert_one_line_error(proc, rf"key apply_chat_template: the tokenizer of pretrain \({tiny['student']}\) has no "
                                rf"chat template; {fix}")
    assert not (tmp_path / "out").exists()

    cache = tmp_path / "cache"
    proc = torchrun(["-m", "fsdp_kd.cache_teacher", *train_args(tiny, tmp_path / "unused", apply_chat_template=True,
                                                                teacher_cache=str(cache))], check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode != 0 and len(errors) == 1 and re.search(fix, errors[0]), proc.stderr[-3000:]
    assert "ValueError" not in proc.stderr and not cache.exists()  # not transformers' error, and nothing written

    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    proc = run_train(train_args(tiny, tmp_path / "fixed", apply_chat_template=True, tokenizer_chat_template=template,
                                max_steps=1, train_batch_size=8), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
