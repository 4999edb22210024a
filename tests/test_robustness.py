"""Runs that survive: resume, interruption, refusal to overwrite, numerical faults, failed saves."""

import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch

import main
import training
from conftest import PROJECT_DIR, QUICK


def test_existing_run_is_never_overwritten_silently(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "run"
    adapter = out / "tiny-llama-finetune"
    adapter.mkdir(parents=True)
    (adapter / "adapter_model.safetensors").write_bytes(b"precious")
    assert main.main(QUICK + ["--output_dir", str(out), "--max_steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--overwrite" in err and "--resume latest" in err
    assert (adapter / "adapter_model.safetensors").read_bytes() == b"precious"


def test_resume_without_checkpoint_says_so(tmp_path, tiny_model_dir, capsys):
    assert main.main(QUICK + ["--output_dir", str(tmp_path / "empty"), "--resume", "latest"]) == 2
    assert "no checkpoint-* folder" in capsys.readouterr().err


def test_sigterm_saves_the_adapter_and_says_how_to_resume(tmp_path, tiny_model_dir):
    out = tmp_path / "run dir"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    args = [*QUICK, "--output_dir", str(out), "--num_train_epochs", "50", "--save_steps", "0", "--logging_steps", "1",
            "--example_prompt", "What's the symbol for gold?"]
    proc = subprocess.Popen([sys.executable, str(PROJECT_DIR / "main.py"), *args],
                            cwd=PROJECT_DIR, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    for line in proc.stdout:  # wait until training is really under way
        if line.startswith("step ") and "| loss" in line or time.time() > deadline:
            break
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "interrupted at step" in stderr and "--resume latest" in stderr
    adapter = out / "tiny-llama-finetune"
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "run_config.json").is_file()
    assert not list(out.glob(".*.saving")), "a half-written adapter was left behind"
    assert list(out.glob("checkpoint-*")), "no checkpoint to resume from"
    assert not (out / ".lock").exists(), "the output_dir lock outlived the run"
    # The printed command works when pasted: quoted, so that the shell gives main.py these arguments.
    command = next(line for line in stderr.splitlines() if line.startswith("resume with: "))[len("resume with: "):]
    assert shlex.split(command) == ["python", "main.py", *args, "--resume", "latest"]


def test_nan_loss_stops_at_once_naming_the_step(make_config):
    from test_model_and_training import rows, setup

    cfg = make_config("--max_steps", "6", "--gradient_accumulation_steps", "1")
    runtime, tokenizer, model = setup(cfg)
    calls = {"n": 0}

    def poison(module, inputs, output):  # from the third forward on, the hidden states are NaN
        calls["n"] += 1
        return output * float("nan") if calls["n"] >= 3 else output

    model.base_model.model.model.norm.register_forward_hook(poison)  # feeds the output layer
    trainer = training.build_trainer(model, tokenizer, rows(tokenizer), None, cfg, runtime)
    with pytest.raises(training.TrainingError, match=r"training loss became nan at step 3.*fp16.*learning rate"):
        trainer.train()
    assert trainer.state.global_step == 2


def test_out_of_memory_names_the_settings_to_lower(tmp_path, tiny_model_dir, monkeypatch, capsys):
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(main, "run_training", oom)
    assert main.main(QUICK + ["--output_dir", str(tmp_path / "o")]) == 3
    err = capsys.readouterr().err
    assert "per_device_train_batch_size=1" in err and "max_seq_length=256" in err and "gradient_checkpointing=True" in err


def test_failed_save_keeps_the_previous_adapter(make_config, monkeypatch):
    from test_model_and_training import setup

    cfg = make_config()
    _, tokenizer, model = setup(cfg)
    first = training.save_adapter(model, tokenizer, cfg)
    before = {p.name: p.read_bytes() for p in first.iterdir()}

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tokenizer, "save_pretrained", disk_full)
    with pytest.raises(training.SaveFailed, match=r"could not write the adapter.*No space left.*from before is untouched"):
        training.save_adapter(model, tokenizer, cfg)
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before
    assert not list(first.parent.glob(".*.saving"))


@pytest.mark.parametrize("extra, message", [
    (["--dataset_name", "no/such/file.jsonl"], "does not exist"),
    (["--lora_target_modules", "c_attn"], "match no linear layer"),
    (["--max_seq_length", "3"], "leaves no answer token"),
])
def test_bad_input_through_main_loses_nothing(tmp_path, tiny_model_dir, capsys, extra, message):
    out = tmp_path / "run"
    assert main.main(QUICK + ["--output_dir", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists() or not any(out.iterdir())
