"""Exports as faithful as the input: the student's own generation config, its tokenizer exactly as loaded (no pad
token added), and its remote-code files; with the real Qwen2.5 and Phi-3 tokenizers (tests/assets.py)."""

import json
import os
import shutil

import pytest

from fsdp_kd.testing.tiny import write_jsonl

from assets import real_asset
from conftest import REPO, python_run, qa_records

# As the instruct models publish them: two stop tokens for Qwen2.5 (<|im_end|>, <|endoftext|>); three for Phi-3,
# whose end of turn <|end|> is not its EOS.
GENERATION = {
    "tok_qwen2.5_instruct": {"bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True,
                             "eos_token_id": [151645, 151643], "repetition_penalty": 1.05, "temperature": 0.7,
                             "top_p": 0.8, "top_k": 20},
    "tok_phi3_mini_instruct": {"bos_token_id": 1, "eos_token_id": [32000, 32001, 32007], "pad_token_id": 32000},
}


def student_dir(root, tokenizer_name: str, drop_pad: bool):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = root / "student"
    path.mkdir()
    tokenizer = real_asset(tokenizer_name)
    for name in os.listdir(tokenizer):
        shutil.copy(tokenizer / name, path / name)
    if drop_pad:  # a tokenizer without a pad token, as several base models ship
        config_file = path / "tokenizer_config.json"
        config = json.loads(config_file.read_text())
        config.pop("pad_token", None)
        config_file.write_text(json.dumps(config))
    vocab = len(AutoTokenizer.from_pretrained(path))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=-(-vocab // 64) * 64, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
    model.save_pretrained(path)
    (path / "generation_config.json").write_text(json.dumps(GENERATION[tokenizer_name]))
    (path / "custom_helper.py").write_text("# a remote-code file the model directory ships\n")
    return path


@pytest.mark.parametrize("tokenizer_name,drop_pad", [("tok_qwen2.5_instruct", False), ("tok_phi3_mini_instruct", True)])
def test_export_keeps_generation_config_tokenizer_and_remote_code(tmp_path, tokenizer_name, drop_pad):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    student = student_dir(tmp_path, tokenizer_name, drop_pad)
    data = tmp_path / "qa.jsonl"
    write_jsonl(str(data), qa_records(8))
    out = tmp_path / "out"
    args = ["--pretrain", str(student), "--dataset", str(data), "--input_key",
            "question", "--output_key", "answer", "--apply_chat_template", "--max_samples", "8", "--max_len", "96",
            "--train_batch_size", "8", "--micro_train_batch_size", "4", "--max_steps", "1", "--kd_coef", "0",
            "--save_path", str(out), "--trust_remote_code"]
    proc = python_run([REPO / "train.py", *args], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    exported, original = GenerationConfig.from_pretrained(out), GenerationConfig.from_pretrained(student)
    assert exported.eos_token_id == GENERATION[tokenizer_name]["eos_token_id"]
    assert exported.to_diff_dict() == original.to_diff_dict()

    before, after = AutoTokenizer.from_pretrained(student), AutoTokenizer.from_pretrained(out)
    assert after.pad_token == before.pad_token and (before.pad_token is None) == drop_pad
    assert after.eos_token == before.eos_token and len(after) == len(before)
    assert after.chat_template == before.chat_template
    conversation = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    assert after.apply_chat_template(conversation) == before.apply_chat_template(conversation)

    assert (out / "custom_helper.py").read_text() == (student / "custom_helper.py").read_text()
    AutoModelForCausalLM.from_pretrained(out)  # loads
