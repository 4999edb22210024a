"""inference.py: the prompt format, the adapter checks, and the command line."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

import data_preparation as dp
from conftest import PROJECT_DIR
from inference import InferenceError, GenerationSettings, generate, load_for_inference, make_generator, read_adapter_config
from model_setup import add_lora, load_base_model, load_tokenizer, resolve_runtime
from training import save_adapter


@pytest.fixture
def untrained_adapter(make_config):
    """An adapter saved straight after LoRA init: enough to test loading and formats quickly."""
    cfg = make_config()
    tokenizer = load_tokenizer(cfg)
    model = add_lora(load_base_model(cfg, resolve_runtime(cfg)), cfg)
    return save_adapter(model, tokenizer, cfg), model, tokenizer, cfg


def test_pipeline_feeds_exactly_the_training_prefix(untrained_adapter, monkeypatch):
    """What the text-generation pipeline gives the model == the prompt tokens training saw (one BOS)."""
    _, model, tokenizer, _ = untrained_adapter
    seen = {}
    real_generate = model.generate

    def spy(*args, **kwargs):
        seen["ids"] = kwargs["input_ids"][0].tolist()
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(model, "generate", spy)
    generate(make_generator(model, tokenizer), "Who wrote Hamlet?", GenerationSettings(max_new_tokens=2))
    row = dp.tokenize_text("[INST] Who wrote Hamlet? [/INST] William Shakespeare. </s>", tokenizer, 256, True)
    assert seen["ids"] == row["input_ids"][:len(seen["ids"])]
    assert seen["ids"].count(tokenizer.bos_token_id) == 1
    assert tokenizer.decode(seen["ids"][-3:]).endswith("[/INST]")


def test_greedy_generation_is_deterministic(untrained_adapter):
    _, model, tokenizer, _ = untrained_adapter
    generator = make_generator(model, tokenizer)
    settings = GenerationSettings(max_new_tokens=12)
    assert generate(generator, "Name a fruit.", settings) == generate(generator, "Name a fruit.", settings)


def test_missing_adapter_folder(tmp_path):
    with pytest.raises(InferenceError, match=r"does not exist"):
        read_adapter_config(tmp_path / "nothing-here")


def test_incomplete_adapter_folder(untrained_adapter):
    path = untrained_adapter[0]
    (path / "adapter_model.safetensors").unlink()
    with pytest.raises(InferenceError, match=r"missing adapter_model.safetensors"):
        read_adapter_config(path)


def test_corrupt_adapter_weights(untrained_adapter):
    path = untrained_adapter[0]
    (path / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(InferenceError, match=r"could not load the adapter"):
        load_for_inference(path)


def test_corrupt_adapter_config(untrained_adapter):
    path = untrained_adapter[0]
    (path / "run_config.json").write_text("{ half a file", encoding="utf-8")
    with pytest.raises(InferenceError, match=r"corrupt"):
        read_adapter_config(path)


def test_adapter_for_a_different_base(untrained_adapter):
    with pytest.raises(InferenceError, match=r"trained on 'tiny-llama', not on 'NousResearch/Llama-2-7b-chat-hf'"):
        load_for_inference(untrained_adapter[0], base="NousResearch/Llama-2-7b-chat-hf")


def test_command_line_reports_a_missing_adapter_cleanly(tmp_path):
    proc = subprocess.run([sys.executable, str(PROJECT_DIR / "inference.py"), "--adapter", str(tmp_path / "x"), "Hi"],
                          capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": ""}, timeout=300)
    assert proc.returncode == 2 and "error:" in proc.stderr and "does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr
