"""Self-distillation with privileged context (`teacher_context_key`, `teacher_system_prompt`, `teacher_model: self`):
the teacher's own rendering of each sample matched one to one with the student's response tokens, its logits against
a dense reference of the teacher on its full rendering (off-policy and on-policy), `self` against a copy of the
student, an empty context against plain live KD, a cache built with the context, and the refusals. The tiny
character models and the toy translation task; a chat template of characters the tokenizer has."""

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import CHAR_CHAT, REPO, python_run, read_metrics, torchrun, train_args
from fsdp_kd.config import parse_config
from fsdp_kd.cross_tokenizer import teacher_fields
from fsdp_kd.errors import ConfigError
from fsdp_kd.privileged import CONTEXT_SEPARATOR, PrivilegedTokenization, TeacherContext
from fsdp_kd.records import IGNORE_INDEX, Sample, TokenSettings, record_to_sample

TRAIN = str(REPO / "train.py")
WORKER = str(REPO / "tests" / "dist_worker.py")
NO_SYSTEM = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
             "{% endif %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}")
SYSTEM = "You translate."


@pytest.fixture(scope="module")
def hinted(tiny, tmp_path_factory):
    """The tiny training data with a `hint` field on every record (the response's first half), and a copy where
    every hint is empty."""
    root = tmp_path_factory.mktemp("hinted")
    records = [json.loads(line) for line in open(tiny["train"])]
    paths = {}
    for name, hint in (("hint", lambda r: "starts " + r["output"][:3]), ("empty", lambda r: "")):
        paths[name] = str(root / f"{name}.jsonl")
        with open(paths[name], "w") as f:
            f.writelines(json.dumps({**r, "hint": hint(r)}) + "\n" for r in records)
    return paths


@pytest.fixture(scope="module")
def char_tok(tiny):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny["tok"])
    tok.chat_template = CHAR_CHAT
    return tok


def _settings(chat: bool, max_len: int = 64, multiturn: bool = False) -> TokenSettings:
    return TokenSettings("input", "output", None if chat else "Q: {}\nA: ", chat, multiturn, False, max_len, False)


def _teacher_sample(record, sample, settings, tok, context):
    fields = teacher_fields(*PrivilegedTokenization(context, tok).record_columns(record, sample, settings, "d:1"),
                            len(sample.input_ids))
    return fields["teacher_ids"], fields["teacher_positions"]


@pytest.mark.parametrize("chat", [False, True])
def test_the_teachers_rows_are_its_own_prompt_then_the_students_response(char_tok, chat):
    """The teacher's ids are its own rendering of the prompt with the context (and the system turn with a chat
    template), rendered as a whole by the template, then the student's response tokens; each trained student position
    maps to the teacher position that predicts the same token."""
    record = {"input": "abcdef:", "output": "ABCDEFGH", "hint": "the hint."}
    settings = _settings(chat)
    sample = record_to_sample(record, settings, char_tok, "d:1")[0]
    context = TeacherContext("hint", SYSTEM if chat else None)
    teacher_ids, positions = _teacher_sample(record, sample, settings, char_tok, context)
    prompt = "the hint." + CONTEXT_SEPARATOR + "abcdef:"
    if chat:
        text = char_tok.apply_chat_template([{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}],
                                            tokenize=False, add_generation_prompt=True)
    else:
        text = f"Q: {prompt}\nA: "
    teacher_prompt = char_tok(text, add_special_tokens=False)["input_ids"]
    trained = [p for p, t in enumerate(sample.targets) if t != IGNORE_INDEX]
    response = sample.input_ids[trained[0] + 1:]
    assert teacher_ids == teacher_prompt + response
    assert [positions[p] for p in trained] == list(range(len(teacher_prompt) - 1, len(teacher_ids) - 1))
    assert all(teacher_ids[positions[p] + 1] == sample.targets[p] for p in trained)


def test_a_cut_sample_and_a_conversation_match_where_their_tokens_are(char_tok):
    """A response cut by max_len is matched from its start (the teacher keeps its whole prompt, context included);
    a multi-turn conversation cut from the left keeps its later turns matched from their ends, the context in the
    first user turn and the system prompt merged into the conversation's own."""
    record = {"input": "abcdefgh:", "output": "ABCDEFGHABCDEFGH", "hint": "hint"}
    settings = _settings(False, max_len=20)
    sample, cut = record_to_sample(record, settings, char_tok, "d:1")
    assert cut
    teacher_ids, positions = _teacher_sample(record, sample, settings, char_tok, TeacherContext("hint", None))
    trained = [p for p, t in enumerate(sample.targets) if t != IGNORE_INDEX]
    assert all(teacher_ids[positions[p] + 1] == sample.targets[p] for p in trained)
    whole = char_tok(f"Q: hint{CONTEXT_SEPARATOR}abcdefgh:\nA: ", add_special_tokens=False)["input_ids"]
    assert teacher_ids[:len(whole)] == whole

    turns = [{"role": "system", "content": "own."}, {"role": "user", "content": "ab:"},
             {"role": "assistant", "content": "AB"}, {"role": "user", "content": "cd:"},
             {"role": "assistant", "content": "CDCD"}]
    record = {"messages": turns, "hint": "hh"}
    for max_len in (200, 28):
        settings = _settings(True, max_len=max_len, multiturn=True)
        sample = record_to_sample(record, settings, char_tok, "d:1")[0]
        teacher_ids, positions = _teacher_sample(record, sample, settings, char_tok, TeacherContext("hint", SYSTEM))
        trained = [p for p, t in enumerate(sample.targets) if t != IGNORE_INDEX]
        assert trained and all(positions[p] >= 0 and teacher_ids[positions[p] + 1] == sample.targets[p]
                               for p in trained)
        start = char_tok(f"system: {SYSTEM}{CONTEXT_SEPARATOR}own.\nuser: hh{CONTEXT_SEPARATOR}ab:\n",
                         add_special_tokens=False)["input_ids"]
        assert teacher_ids[:len(start)] == start
    assert len(trained) < 8  # the cut left the first answer partly or wholly out


def test_an_empty_context_is_the_students_own_rendering(char_tok):
    record = {"input": "abcdef:", "output": "ABCDEFGH", "hint": ""}
    for chat in (False, True):
        sample = record_to_sample(record, _settings(chat), char_tok, "d:1")[0]
        teacher_ids, positions = _teacher_sample(record, sample, _settings(chat), char_tok, TeacherContext("hint", None))
        assert teacher_ids == sample.input_ids
        assert all(positions[p] == p for p, t in enumerate(sample.targets) if t != IGNORE_INDEX)


def test_an_on_policy_response_keeps_the_teachers_own_prompt(char_tok):
    """A rewritten sample (the student's prompt, a new response) gets the teacher's prompt of the original sample
    and the new response, matched one to one."""
    from fsdp_kd.on_policy import prompt_of, with_response

    record = {"input": "abcdef:", "output": "ABCDEFGH", "hint": "the hint."}
    settings = _settings(True)
    sample = record_to_sample(record, settings, char_tok, "d:1")[0]
    retokenize = PrivilegedTokenization(TeacherContext("hint", SYSTEM), char_tok)
    teacher_ids, positions = _teacher_sample(record, sample, settings, char_tok, TeacherContext("hint", SYSTEM))
    original = Sample(sample.input_ids, sample.targets, teacher_ids=teacher_ids, teacher_positions=positions)
    prompt = prompt_of(original)
    rewritten = with_response(prompt, [20, 21, 22, 1])
    fields = retokenize.rewritten(original, rewritten)
    teacher_prompt = teacher_ids[:positions[len(prompt) - 1] + 1]
    assert fields["teacher_ids"] == teacher_prompt + [20, 21, 22, 1]
    trained = [p for p, t in enumerate(rewritten.targets) if t != IGNORE_INDEX]
    assert [fields["teacher_positions"][p] for p in trained] == list(range(len(teacher_prompt) - 1,
                                                                         len(teacher_prompt) + 3))


def _privileged_flags(tiny, hinted, **overrides):
    return {**dict(pretrain=tiny["student"], teacher_model="self", dataset=hinted["hint"], teacher_context_key="hint",
                   teacher_system_prompt=SYSTEM, apply_chat_template="true", tokenizer_chat_template=CHAR_CHAT,
                   kd_coef=0.9, train_batch_size=4, max_steps=1), **overrides}


def test_the_teachers_logits_are_its_full_renderings(tiny, hinted, tmp_path):
    """At each student response token, off-policy and on the student's own responses, the teacher's logits (packed,
    FSDP, one rank) equal the teacher model's on its own full rendering, system turn + context + prompt + response,
    run dense in this process and read at its response positions."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "logits.pt"
    torchrun([WORKER, "teacher_logits", str(out), *train_args(tiny, tmp_path / "run", **_privileged_flags(
        tiny, hinted, teacher_model=tiny["teacher"], packing_samples="true", on_policy_ratio=1.0,
        generate_max_new_tokens=6))], nproc=1)
    got = torch.load(out, weights_only=True)
    tok = AutoTokenizer.from_pretrained(tiny["tok"])
    tok.chat_template = CHAR_CHAT
    teacher = AutoModelForCausalLM.from_pretrained(tiny["teacher"], dtype=torch.float32).eval()
    records = [json.loads(line) for line in open(hinted["hint"])][:4]
    for name in ("data", "on_policy"):
        rows, reference = 0, []
        for record, (ids, targets) in zip(records, got[name]["samples"]):
            start = next(p for p, t in enumerate(targets) if t != IGNORE_INDEX)
            response = [t for t in targets if t != IGNORE_INDEX]
            assert ids[start + 1:start + 1 + len(response)] == response
            text = tok.apply_chat_template([{"role": "system", "content": SYSTEM}, {
                "role": "user", "content": record["hint"] + CONTEXT_SEPARATOR + record["input"]}], tokenize=False,
                add_generation_prompt=True)
            prompt = tok(text, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logits = teacher(torch.tensor([prompt + response])).logits[0]
            reference.append(logits[len(prompt) - 1:len(prompt) - 1 + len(response)])
            rows += len(response)
        reference = torch.cat(reference)
        assert got[name]["logits"].shape[0] == rows
        torch.testing.assert_close(got[name]["logits"][:, :reference.shape[1]], reference, rtol=1e-4, atol=1e-4)


def _losses(tiny, tmp_path, name, **flags) -> list[dict]:
    proc = python_run([TRAIN, *train_args(tiny, tmp_path / name, **flags)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return read_metrics(tmp_path / name)


def _first_loss(tiny, tmp_path, name, **flags) -> dict:
    return _losses(tiny, tmp_path, name, **flags)[0]


def test_self_is_a_copy_of_the_students_initial_weights(tiny, hinted, tmp_path):
    """`teacher_model: self` with a system prompt and a context is bitwise the run with a copy of the student's
    directory as teacher_model, at step 1 and after the student has moved (the teacher stays the initial weights);
    an empty context is bitwise plain live KD from that copy."""
    copy = str(tmp_path / "student_copy")
    shutil.copytree(tiny["student"], copy)
    own = _losses(tiny, tmp_path, "self", **_privileged_flags(tiny, hinted, max_steps=2))
    copied = _losses(tiny, tmp_path, "copy", **_privileged_flags(tiny, hinted, teacher_model=copy, max_steps=2))
    assert len(own) == 2 and [(m["loss"], m["kl"]) for m in own] == [(m["loss"], m["kl"]) for m in copied]
    assert own[0]["kl"] > 0 and own[1]["kl"] != own[0]["kl"]
    copied = copied[0]
    empty = _first_loss(tiny, tmp_path, "empty", **_privileged_flags(tiny, hinted, dataset=hinted["empty"],
                                                                     teacher_system_prompt=None))
    live = _first_loss(tiny, tmp_path, "live", **_privileged_flags(tiny, hinted, dataset=hinted["empty"],
                                                                   teacher_model=copy, teacher_context_key=None,
                                                                   teacher_system_prompt=None))
    assert empty["loss"] == live["loss"] and empty["kl"] == live["kl"] == 0.0  # the student is its own teacher
    assert copied["kl"] != live["kl"]  # the context changes the teacher


def test_a_cache_built_with_the_context_trains_as_the_live_teacher(tiny, hinted, tmp_path):
    """cache_teacher renders the teacher's context as training does: a float32 hidden-state cache built with it
    gives the live privileged run's loss at step 1, with no teacher loaded; a run naming another context is refused
    in one line."""
    flags = _privileged_flags(tiny, hinted, teacher_model=tiny["teacher"])
    cache = str(tmp_path / "cache")
    proc = python_run(["-m", "fsdp_kd.cache_teacher", *train_args(tiny, tmp_path / "unused", teacher_cache=cache,
                                                                   cache_mode="hidden", cache_hidden_dtype="float32",
                                                                   **flags)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    live = _first_loss(tiny, tmp_path, "live", **flags)
    cached = _first_loss(tiny, tmp_path, "cached", **{**flags, "teacher_model": None}, teacher_cache=cache)
    assert cached["loss"] == pytest.approx(live["loss"], rel=1e-5) and cached["kl"] > 0
    proc = python_run([TRAIN, *train_args(tiny, tmp_path / "other", **{**flags, "teacher_model": None,
                                                                       "teacher_system_prompt": "Other."},
                                          teacher_cache=cache)])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "key teacher_context_key" in lines[0], proc.stderr[-2000:]


@pytest.mark.parametrize("flags,key,message", [
    (dict(teacher_system_prompt="s"), "teacher_system_prompt", "set apply_chat_template"),
    (dict(teacher_context_key="hint", cross_tokenizer="true"), "teacher_context_key", "not supported yet"),
    (dict(teacher_context_key="hint", pretrain_mode="true"), "teacher_context_key", "pretrain_mode has none"),
    (dict(teacher_context_key="hint", teacher_model=None, kd_coef=0), "teacher_context_key", "set teacher_model"),
])
def test_what_privileged_context_refuses_in_the_config(flags, key, message):
    args = ["--pretrain", "s", "--dataset", "d.jsonl"]
    for name, value in {"teacher_model": "self", **flags}.items():
        args += [] if value is None else [f"--{name}", str(value)]
    with pytest.raises(ConfigError, match=f"--{key}: .*{message}"):
        parse_config(args)


def test_self_is_the_students_path():
    cfg = parse_config(["--pretrain", "student/dir", "--teacher_model", "self", "--dataset", "d.jsonl"])
    assert cfg.teacher_model == "student/dir"


def test_a_template_without_a_system_role_and_a_record_without_the_field_are_refused(tiny, hinted, tmp_path):
    """Each in one line before any model loads: the chat template that cannot place teacher_system_prompt (key,
    fix), and a record without the teacher_context_key field (file, line, key, fix)."""
    proc = python_run([TRAIN, *train_args(tiny, tmp_path / "a", **_privileged_flags(
        tiny, hinted, tokenizer_chat_template=NO_SYSTEM))])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert "key teacher_system_prompt" in lines[0] and "System role not supported" in lines[0]
    assert "teacher_context_key instead" in lines[0] and "loading the teacher" not in proc.stdout
    proc = python_run([TRAIN, *train_args(tiny, tmp_path / "b", **_privileged_flags(
        tiny, hinted, dataset=tiny["train"], teacher_system_prompt=None))])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert f"{tiny['train']}:1: missing key 'hint' (teacher_context_key" in lines[0] and "loading the teacher" not in proc.stdout


def test_self_distillation_trains_on_policy_through_train_py(tiny, hinted, tmp_path):
    """`teacher_model: self` with teacher_system_prompt and a context, every micro-batch on-policy, 2 ranks, a few
    steps: the student's own responses are graded by the teacher with its context, every step is taken, the KL on
    the student's text is logged."""
    torchrun([TRAIN, *train_args(tiny, tmp_path / "out", **_privileged_flags(
        tiny, hinted, on_policy_ratio=1.0, generate_max_new_tokens=8, max_steps=4, train_batch_size=8,
        micro_train_batch_size=2, learning_rate=1e-2, kd_loss="reverse_kl"))])
    train = [m for m in read_metrics(tmp_path / "out") if "loss" in m]
    assert len(train) == 4 and not any(m.get("skipped") for m in train)
    assert all(m["on_policy_share"] == 1.0 and np.isfinite(m["kl_on_policy"]) for m in train)
    assert train[0]["kl_on_policy"] > 0
