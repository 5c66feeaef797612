"""YAML + flags parsing and the one-line errors that point at the file, line and key."""

import re

import pytest

from fsdp_kd.config import FIELDS, TrainConfig, gradient_accumulation_steps, parse_config, resume_mismatches
from fsdp_kd.errors import ConfigError
from fsdp_kd.loss import LossSpec

REQUIRED = ["--pretrain", "s", "--dataset", "d.jsonl", "--teacher_model", "t"]


def write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return str(path)


def test_yaml_with_flag_overrides(tmp_path):
    path = write(tmp_path, "pretrain: s\nteacher_model: t\ndataset: d.jsonl\nkd_coef: 0.7\nadam_betas: [0.8, 0.9]\n")
    cfg = parse_config(["--config", path, "--kd_coef", "0.2", "--gradient_checkpointing"])
    assert cfg.kd_coef == 0.2 and cfg.adam_betas == (0.8, 0.9) and cfg.gradient_checkpointing is True


def test_flags_alone_in_openrlhf_style():
    cfg = parse_config(REQUIRED + ["--adam_betas", "0.9", "0.95", "--max_len", "512", "--teacher_offload",
                                   "--load_checkpoint", "false", "--max_samples=100"])
    assert cfg.adam_betas == (0.9, 0.95) and cfg.max_len == 512 and cfg.teacher_offload
    assert cfg.load_checkpoint is False and cfg.max_samples == 100


def test_unknown_yaml_key_names_file_line_and_valid_keys(tmp_path):
    path = write(tmp_path, "pretrain: s\ndataset: d.jsonl\nlearning_rat: 1e-5\n")
    with pytest.raises(ConfigError, match=r"run\.yaml:3: unknown key 'learning_rat'; valid keys: .*learning_rate"):
        parse_config(["--config", path])


def test_wrong_type_names_file_line_and_key(tmp_path):
    path = write(tmp_path, "pretrain: s\ndataset: d.jsonl\nteacher_model: t\nmax_len: long\n")
    with pytest.raises(ConfigError, match=r"run\.yaml:4: key 'max_len' expects a int, got 'long'"):
        parse_config(["--config", path])
    with pytest.raises(ConfigError, match=r"--micro_train_batch_size: key 'micro_train_batch_size' expects a int"):
        parse_config(REQUIRED + ["--micro_train_batch_size", "1.5"])


@pytest.mark.parametrize("flag,replacement", [("zero_stage", "--sharding_strategy full_shard"),
                                              ("adam_offload", "optimizer offload"), ("bf16", "--param_dtype bf16")])
def test_deepspeed_flags_explain_their_replacement(flag, replacement):
    with pytest.raises(ConfigError, match=f"'{flag}' is a DeepSpeed-only option: .*{replacement}"):
        parse_config(REQUIRED + [f"--{flag}", "1"])


def test_kd_without_teacher_is_refused():
    with pytest.raises(ConfigError, match="no teacher_model or teacher_cache is set; set kd_coef 0"):
        parse_config(["--pretrain", "s", "--dataset", "d.jsonl"])
    assert parse_config(["--pretrain", "s", "--dataset", "d.jsonl", "--kd_coef", "0"]).teacher_model is None


def test_invalid_yaml_names_the_line(tmp_path):
    path = write(tmp_path, "pretrain: s\ndataset: [unclosed\n")
    with pytest.raises(ConfigError, match=r"run\.yaml:\d+: not valid YAML"):
        parse_config(["--config", path])


def test_batch_sizes_must_divide():
    cfg = parse_config(REQUIRED + ["--train_batch_size", "12", "--micro_train_batch_size", "4"])
    assert gradient_accumulation_steps(cfg, 1) == 3
    with pytest.raises(ConfigError, match=r"12 is not a multiple of micro_train_batch_size 4 × world size 2 = 8"):
        gradient_accumulation_steps(cfg, 2)


def test_resume_mismatch_lists_only_keys_that_matter():
    saved = parse_config(REQUIRED).to_dict()
    now = parse_config(REQUIRED + ["--logging_steps", "7", "--eval_steps", "3", "--train_batch_size", "32"])
    assert resume_mismatches(saved, now.to_dict()) == ["train_batch_size (16 -> 32)"]
    # a checkpoint from before a key existed ran with its default, so it resumes alike, and differs from another value
    del saved["kd_loss_convention"]
    assert resume_mismatches(saved, now.to_dict()) == ["train_batch_size (16 -> 32)"]
    assert resume_mismatches(saved, parse_config(REQUIRED + ["--kd_loss_convention", "trl"]).to_dict()) == [
        "kd_loss_convention ('fsdp_kd' -> 'trl')"]


def test_divergence_keys_name_what_they_accept():
    with pytest.raises(ConfigError, match=r"--kd_loss_convention: kd_loss_convention must be one of fsdp_kd, trl, "
                                          r"liger, got 'openrlhf'"):
        parse_config(REQUIRED + ["--kd_loss_convention", "openrlhf"])
    with pytest.raises(ConfigError, match=r"--skew_alpha: skew_alpha must be in \[0, 1\), got 1.0"):
        parse_config(REQUIRED + ["--kd_loss", "skew_kl", "--skew_alpha", "1"])
    with pytest.raises(ConfigError, match=r"--akl_mu: akl_mu must be in \(0, 1\), got 0.0"):
        parse_config(REQUIRED + ["--kd_loss", "akl", "--akl_mu", "0"])
    cfg = parse_config(REQUIRED + ["--kd_loss", "skew_reverse_kl", "--skew_alpha", "0.2"])
    assert (cfg.kd_loss, cfg.skew_alpha, cfg.kd_loss_convention) == ("skew_reverse_kl", 0.2, "fsdp_kd")


def test_unknown_attention_implementation_lists_the_accepted_ones():
    with pytest.raises(ConfigError, match=r"command line --attn_implementation: attn_implementation must be one of "
                                          r"sdpa, eager, flash_attention_2, flash_attention_3, flex_attention"):
        parse_config(REQUIRED + ["--attn_implementation", "paged_attention"])
    assert parse_config(REQUIRED + ["--attn_implementation", "flash_attention_2"]).attn_implementation == \
        "flash_attention_2"


def test_config_that_is_not_utf8_is_one_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_bytes(b"pretrain: s\n\xff\xfe: x\n")
    with pytest.raises(ConfigError, match=r"run\.yaml: not UTF-8 text .* re-save the config as UTF-8"):
        parse_config(["--config", str(path)])


@pytest.mark.parametrize("key", [name for name, f in FIELDS.items() if "choices" in f.metadata])
def test_a_keys_choices_are_one_list_for_help_and_validation(key):
    """`--help` and validation both read the choices that `opt` was given; a value outside them is refused."""
    choices = FIELDS[key].metadata["choices"]
    assert getattr(TrainConfig, key) in choices
    assert f"{', '.join(choices[:-1])} or {choices[-1]}" in FIELDS[key].metadata["help"]
    with pytest.raises(ConfigError, match=rf"command line --{key}: {key} must be one of {', '.join(choices)}, "
                                          "got 'nonesuch'"):
        parse_config(REQUIRED + [f"--{key}", "nonesuch"])


def test_the_loss_checks_its_own_fields_and_the_config_says_where(tmp_path):
    with pytest.raises(ConfigError, match=r"^kd_temperature must be > 0, got 0.0$") as refused:
        LossSpec(temperature=0.0)
    assert refused.value.key == "kd_temperature"
    path = write(tmp_path, "pretrain: s\ndataset: d.jsonl\nteacher_model: t\nkd_token_chunk: 0\n")
    with pytest.raises(ConfigError, match=r"run\.yaml:4: kd_token_chunk must be >= 1, got 0$"):
        parse_config(["--config", path])


@pytest.mark.parametrize("key", [name for name, f in FIELDS.items() if "must_be" in f.metadata])
def test_a_keys_range_is_checked_where_the_key_is_declared(key):
    rule = FIELDS[key].metadata["must_be"]
    outside = {">= 1": "0", "> 0": "0", ">= 0": "-1", "in [0, 1)": "1", "in [0, 1]": "2"}[rule]
    with pytest.raises(ConfigError, match=rf"command line --{key}: {key} must be {re.escape(rule)}, "
                                          rf"got {outside}(\.0)?$"):
        parse_config(REQUIRED + [f"--{key}", outside])
