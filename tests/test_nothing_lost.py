"""Nothing a run wrote is lost: adapter names, --overwrite, the output_dir lock, half-written
checkpoints and full disks. Kills and signals are tested on real subprocesses."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import main
import run_files
import training
from conftest import PROJECT_DIR, QUICK, SHORT, tree

ENV = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")


def start_main(args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(PROJECT_DIR / "main.py"), *map(str, args)], cwd=PROJECT_DIR, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_training(proc, deadline_s=240) -> str:
    """Read the process's output until the first loss line (training is under way); returns what was read."""
    seen, deadline = [], time.time() + deadline_s
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("step ") and "| loss" in line or time.time() > deadline:
            break
    return "".join(seen)


def fake_earlier_run(out: Path) -> dict:
    """checkpoint-1, checkpoint-2, an adapter and a user's own notes, as a finished run leaves them."""
    for name in ("checkpoint-1", "checkpoint-2"):
        (out / name).mkdir(parents=True)
        (out / name / "trainer_state.json").write_text('{"global_step": 1}')
    adapter = out / "tiny-llama-finetune"
    adapter.mkdir()
    for name in ("adapter_config.json", "run_config.json"):
        (adapter / name).write_text("{}")
    (out / "my_notes.txt").write_text("precious")
    return tree(out)


# ---------------------------------------------------------------------------- item 1: adapter names

@pytest.mark.parametrize("name", [".", "..", "", "/tmp/elsewhere", "sub/dir", "..\\up", ".hidden"])
def test_adapter_names_outside_output_dir_are_refused_and_nothing_changes(tmp_path, name, capsys):
    out = tmp_path / "run"
    out.mkdir()
    before = fake_earlier_run(out)
    assert main.main(QUICK + ["--output_dir", out, "--max_steps", "2", "--new_model", name, "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert f"new_model={name!r}" in err and "Traceback" not in err
    assert tree(out) == before


@pytest.mark.parametrize("name", ["checkpoint-3", "runs", "metrics.json", "report.md"])
def test_adapter_names_of_run_files_are_refused(tmp_path, tiny_model_dir, name, capsys):
    assert main.main(QUICK + ["--output_dir", tmp_path / "run", "--max_steps", "2", "--new_model", name]) == 2
    assert "is the name of a file the run itself writes" in capsys.readouterr().err


def test_a_save_replaces_only_its_own_folder(make_config, tmp_path):
    """Even if a bad name got past the config check, the atomic save never replaces output_dir or a user's folder."""
    from test_model_and_training import setup

    cfg = make_config()
    _, tokenizer, model = setup(cfg)
    out = Path(cfg.output_dir)
    out.mkdir()
    (out / "notes").mkdir()
    (out / "notes" / "mine.txt").write_text("precious")
    before = tree(out)
    for name in (".", "notes"):
        with pytest.raises(run_files.OutputDirError, match="refusing to"):
            training.save_adapter(model, tokenizer, dataclasses.replace(cfg, new_model=name))
        assert tree(out) == before


# ---------------------------------------------------------------------------- item 2: --overwrite checks first

@pytest.mark.parametrize("extra, message", [
    (["--dataset_name", "typo.jsonl"], "does not exist"),
    (["--model_name", "/no/such/model"], "model folder '/no/such/model' does not exist"),
    (["--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "200"], "is more than the 108 forward passes of one epoch"),
    (["--lora_r", "512"], "lora_r=512 is larger"),
    (["--free_disk"], "MiB free"),
])
def test_overwrite_removes_nothing_until_every_check_passed(run_copy, monkeypatch, capsys, extra, message):
    if extra == ["--free_disk"]:
        monkeypatch.setattr(run_files, "free_bytes", lambda path: 10 * 2**20)
        extra = []
    before = tree(run_copy)
    assert main.main(SHORT + ["--output_dir", run_copy, "--overwrite", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert tree(run_copy) == before


def test_overwrite_puts_the_earlier_run_back_if_the_new_one_fails_before_saving(run_copy, monkeypatch):
    before = tree(run_copy)
    seen = {}

    def crash(trainer, runtime, resume_from):
        seen["aside"] = sorted(p.name for p in (run_copy / run_files.SET_ASIDE_NAME).iterdir())
        raise RuntimeError("the new run died at step 1")

    monkeypatch.setattr(main, "run_training", crash)
    with pytest.raises(RuntimeError, match="died at step 1"):
        main.run(SHORT + ["--output_dir", str(run_copy), "--overwrite"])
    assert "checkpoint-4" in seen["aside"] and "tiny-llama-finetune" in seen["aside"]  # it was out of the way
    assert tree(run_copy) == before


def test_overwrite_replaces_the_run_and_keeps_the_users_files(run_copy):
    (run_copy / "my_notes.txt").write_text("precious")
    old_adapter = (run_copy / "tiny-llama-finetune" / "adapter_model.safetensors").read_bytes()
    main.run(SHORT + ["--output_dir", str(run_copy), "--overwrite", "--max_steps", "2", "--save_steps", "0"])
    assert (run_copy / "my_notes.txt").read_text() == "precious"
    assert not list(run_copy.glob("checkpoint-*")) and not (run_copy / run_files.SET_ASIDE_NAME).exists()
    assert (run_copy / "tiny-llama-finetune" / "adapter_model.safetensors").read_bytes() != old_adapter
    assert json.loads((run_copy / "metrics.json").read_text())["train"]["global_step"] == 2


# ---------------------------------------------------------------------------- item 3: one run per output_dir

def test_a_second_run_is_refused_while_the_first_holds_output_dir(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "run"
    first = start_main(QUICK + ["--output_dir", out, "--num_train_epochs", "50", "--save_steps", "0", "--logging_steps", "1"])
    try:
        wait_for_training(first)
        assert main.main(QUICK + ["--output_dir", out, "--max_steps", "2", "--overwrite"]) == 2  # this process
        err = capsys.readouterr().err
        assert f"is in use by another run (pid {first.pid}" in err and "Traceback" not in err
        assert first.poll() is None, "the second run disturbed the first"
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=240)
    finally:
        first.kill()
    assert first.returncode == 128 + signal.SIGTERM
    assert not (out / run_files.LOCK_NAME).exists(), "the lock outlived its run"


def test_kill_9_during_overwrite_loses_nothing_and_its_stale_lock_is_taken_over(run_copy, capsys):
    """A run killed outright leaves its lock file and the earlier run set aside: the next run detects
    the stale lock, puts the earlier run back, and finds it complete."""
    before = tree(run_copy)
    proc = start_main(SHORT + ["--output_dir", run_copy, "--overwrite", "--max_steps", "200", "--save_steps", "100"])
    wait_for_training(proc)
    assert (run_copy / run_files.SET_ASIDE_NAME / "checkpoint-4").is_dir()
    proc.kill()
    proc.communicate(timeout=60)
    assert (run_copy / run_files.LOCK_NAME).exists()
    assert main.main(SHORT + ["--output_dir", run_copy, "--resume", "latest"]) == 0
    again = capsys.readouterr().out
    assert f"an earlier run (pid {proc.pid}" in again and "stale" in again
    assert "put the run it was replacing back" in again and "nothing was missing" in again
    assert {k: v for k, v in tree(run_copy).items() if not k.startswith("runs/")} == \
        {k: v for k, v in before.items() if not k.startswith("runs/")}


def test_the_lock_is_released_after_an_error(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    out.mkdir()
    assert main.main(QUICK + ["--output_dir", out, "--dataset_name", "typo.jsonl"]) == 2
    assert list(out.iterdir()) == []


def test_an_output_dir_that_cannot_be_written(tmp_path, tiny_model_dir, monkeypatch, capsys):
    (tmp_path / "a_file").write_text("x")
    assert main.main(QUICK + ["--output_dir", tmp_path / "a_file" / "run"]) == 2
    assert "cannot write to output_dir" in capsys.readouterr().err
    real_open = os.open

    def read_only(path, flags, *args):
        if str(path).endswith(run_files.LOCK_NAME):
            raise OSError(30, "Read-only file system", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(run_files.os, "open", read_only)
    assert main.main(QUICK + ["--output_dir", tmp_path]) == 2
    err = capsys.readouterr().err
    assert "cannot write to output_dir" in err and "Read-only file system" in err and "Traceback" not in err


# ---------------------------------------------------------------------------- item 9: incomplete checkpoints

def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


BREAKAGES = {
    "no trainer_state.json": (lambda c: (c / "trainer_state.json").unlink(), "has no trainer_state.json"),
    "truncated trainer_state.json": (lambda c: truncate(c / "trainer_state.json"), "trainer_state.json is truncated"),
    "truncated optimizer.pt": (lambda c: truncate(c / "optimizer.pt", 0.9), "optimizer.pt is truncated"),
    "truncated adapter": (lambda c: truncate(c / "adapter_model.safetensors", 0.9), "adapter_model.safetensors is truncated"),
    # the run's settings, which resume compares against (shape_changes): a broken one was a JSONDecodeError traceback
    "truncated run_config.json": (lambda c: truncate(c / "run_config.json"), "run_config.json is truncated"),
}


@pytest.mark.parametrize("breakage", BREAKAGES)
def test_an_incomplete_checkpoint_is_never_resumed(run_copy, breakage, capsys):
    brake, why = BREAKAGES[breakage]
    assert run_files.checkpoint_problem(run_copy / "checkpoint-4") is None
    brake(run_copy / "checkpoint-4")
    assert why in run_files.checkpoint_problem(run_copy / "checkpoint-4")
    cfg = main.parse_config(SHORT + ["--output_dir", str(run_copy), "--resume", "latest"])
    start = run_files.inspect_output_dir(cfg)
    assert start.checkpoint == run_copy / "checkpoint-2" and start.incomplete == [run_copy / "checkpoint-4"]
    out = capsys.readouterr().out
    assert "skipped checkpoint-4, which is incomplete: " in out and why in out
    # Asked for by path, it is refused, naming what is broken and the complete ones.
    assert main.main(SHORT + ["--output_dir", run_copy, "--resume", run_copy / "checkpoint-4"]) == 2
    err = capsys.readouterr().err
    assert "this checkpoint is incomplete" in err and why in err and "checkpoints in" in err and "checkpoint-2" in err


def test_resume_latest_skips_a_truncated_checkpoint_and_matches_the_run(run_copy, short_run, capsys):
    truncate(run_copy / "checkpoint-4" / "optimizer.pt", 0.9)
    for name in ("metrics.json", "report.md"):
        (run_copy / name).unlink()
    main.run(SHORT + ["--output_dir", str(run_copy), "--resume", "latest"])
    out = capsys.readouterr().out
    assert "skipped checkpoint-4, which is incomplete: optimizer.pt is truncated" in out
    assert "renamed the incomplete checkpoint-4 to incomplete-checkpoint-4" in out
    assert run_files.checkpoint_problem(run_copy / "checkpoint-4") is None  # written again, completely
    expected = {p["step"]: p["loss"] for p in json.loads((short_run / "metrics.json").read_text())["train_loss_per_step"]}
    got = {p["step"]: p["loss"] for p in json.loads((run_copy / "metrics.json").read_text())["train_loss_per_step"]}
    for step in (3, 4):
        assert got[step] == pytest.approx(expected[step], abs=1e-4), step


# ---------------------------------------------------------------------------- item 11: a full disk

def fail_when_writing(monkeypatch, module, name, marker):
    real = getattr(module, name)

    def write(obj, path, *args, **kwargs):
        if marker in str(path):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")  # torch's ENOSPC
        return real(obj, path, *args, **kwargs)

    monkeypatch.setattr(module, name, write)


def test_a_full_disk_during_a_checkpoint_keeps_the_last_complete_one(run_copy, monkeypatch, capsys):
    import torch

    shutil.rmtree(run_copy / "checkpoint-4")  # died after checkpoint-2: resume, and the disk fills at checkpoint-4
    adapter_before = tree(run_copy / "tiny-llama-finetune")
    checkpoint_before = tree(run_copy / "checkpoint-2")
    fail_when_writing(monkeypatch, torch, "save", "checkpoint-4")
    assert main.main(SHORT + ["--output_dir", run_copy, "--resume", "latest"]) == 2
    err = capsys.readouterr().err
    assert "could not write checkpoint" in err and "MiB free" in err and "Removed the partial checkpoint-4" in err
    assert "resume with: python main.py" in err and "Traceback" not in err
    assert not (run_copy / "checkpoint-4").exists()
    assert tree(run_copy / "checkpoint-2") == checkpoint_before and run_files.checkpoint_problem(run_copy / "checkpoint-2") is None
    assert tree(run_copy / "tiny-llama-finetune") == adapter_before
    assert not (run_copy / run_files.LOCK_NAME).exists()


def test_a_full_disk_during_the_adapter_save_keeps_the_previous_adapter(run_copy, monkeypatch, capsys):
    import peft.peft_model

    (run_copy / "checkpoint-4" / "trainer_state.json").unlink()  # resume from 2: train 3-4, then save the adapter
    adapter_before = tree(run_copy / "tiny-llama-finetune")
    fail_when_writing(monkeypatch, peft.peft_model, "safe_save_file", ".tiny-llama-finetune.saving")
    assert main.main(SHORT + ["--output_dir", run_copy, "--resume", "latest"]) == 2
    err = capsys.readouterr().err
    assert "could not write the adapter to" in err and "from before is untouched" in err and "Traceback" not in err
    assert tree(run_copy / "tiny-llama-finetune") == adapter_before
    assert run_files.checkpoint_problem(run_copy / "checkpoint-4") is None  # training is safe: resume finishes it
    assert not list(run_copy.glob(".*.saving"))


def test_a_full_disk_while_recording_a_checkpoints_settings_is_a_clear_error(run_copy, monkeypatch, capsys):
    """run_config.json is written into each checkpoint after the Trainer's own files. A full disk there
    was an OSError traceback; now it is the checkpoint save's error, and no truncated file is left."""
    import errno

    import config
    import training

    shutil.rmtree(run_copy / "checkpoint-4")
    real = config.json.dump

    def full_disk(obj, f, *args, **kwargs):
        if "checkpoint-4" in getattr(f, "name", ""):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(config.json, "dump", full_disk)
    monkeypatch.setattr(training, "save_config", config.save_config)
    assert main.main(SHORT + ["--output_dir", run_copy, "--resume", "latest"]) == 2
    err = capsys.readouterr().err
    assert "could not write checkpoint" in err and "lacks its run_config.json" in err and "Traceback" not in err
    assert not (run_copy / "checkpoint-4" / "run_config.json").exists()
    assert not (run_copy / "checkpoint-4" / "run_config.json.partial").exists()
    assert not (run_copy / run_files.LOCK_NAME).exists()
