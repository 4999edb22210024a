"""Merge, GGUF export and the saved 4-bit copy when things go wrong: nothing replaced, nothing half-done
left where a finished result belongs, and an error line instead of a traceback."""

import errno
import json
import os
import subprocess
import sys

import pytest

import merging
import staging
from conftest import PROJECT_DIR
from inference import InferenceError, load_base, main, parse_args, read_adapter_config
from model_setup import resolve_runtime


@pytest.fixture(scope="module")
def adapter(tiny_run):
    return tiny_run[0] / "tiny-llama-finetune"


def no_staging_left(folder) -> bool:
    return not [p for p in folder.iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------------------- staging.place

def test_place_never_replaces_a_file_and_keeps_the_staging_copy(tmp_path):
    target, aside = tmp_path / "m.gguf", tmp_path / ".m.gguf.writing-x"
    target.write_bytes(b"user's")
    aside.write_bytes(b"new")
    with pytest.raises(FileExistsError):
        staging.place(aside, target)
    assert target.read_bytes() == b"user's" and aside.read_bytes() == b"new"
    target.unlink()
    staging.place(aside, target)
    assert target.read_bytes() == b"new" and not aside.exists()


def test_place_takes_an_empty_folder_but_not_a_full_one(tmp_path):
    aside = staging.staging_folder(tmp_path / "out", "merging")
    (aside / "model.safetensors").write_bytes(b"w")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError):
        staging.place(aside, tmp_path / "out")
    assert (tmp_path / "out" / "notes.txt").read_text() == "keep"
    (tmp_path / "out" / "notes.txt").unlink()
    staging.place(aside, tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == b"w"


def test_staging_names_are_unique_and_files_get_the_umask_permissions(tmp_path):
    first, second = (staging.staging_folder(tmp_path / "m", "merging") for _ in range(2))
    assert first != second and first.name.startswith(".m.merging-")
    (first / "model.safetensors").write_bytes(b"w")
    os.chmod(first / "model.safetensors", 0o600)  # as safetensors writes it
    staging.publish_permissions(first)
    expected = 0o666 & ~staging.user_umask()
    assert (first / "model.safetensors").stat().st_mode & 0o777 == expected
    assert first.stat().st_mode & 0o777 == 0o777 & ~staging.user_umask()


# ---------------------------------------------------------------------------- the merge

def test_merge_errors_reach_the_command_line_as_one_line(adapter, tmp_path):
    """Run as a script, inference.py is `__main__`; merging raises inference.InferenceError, which main catches."""
    proc = subprocess.run([sys.executable, "inference.py", "--adapter", str(adapter), "--merge-to", str(tmp_path / "m"),
                           "--base", "NousResearch/Llama-2-7b-chat-hf"], cwd=PROJECT_DIR, capture_output=True, text=True,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith("error: ") and "was trained on" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "m").exists()


def test_a_merge_leaves_a_look_alike_folder_of_the_user_alone(adapter, tmp_path):
    mine = tmp_path / ".m.merging"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    merging.merge_adapter(adapter, tmp_path / "m", "float32", check_rows=0)
    assert (mine / "notes.txt").read_text() == "keep"
    assert (tmp_path / "m" / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [".m.merging"]


def test_an_interrupted_merge_check_leaves_no_merged_folder(adapter, tmp_path, monkeypatch):
    """The check runs before the folder is put in place: a folder at the target always has its merge_check.json."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(merging, "compare_with_adapter", interrupted)
    assert main(["--adapter", str(adapter), "--merge-to", str(tmp_path / "m"), "--check_rows", "2"]) == 130
    assert not (tmp_path / "m").exists() and no_staging_left(tmp_path)


def test_a_merge_that_cannot_write_fails_before_loading(adapter, tmp_path, monkeypatch, capsys):
    def no_permission(target, purpose):
        raise PermissionError(errno.EACCES, "Permission denied", str(target.parent))

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the write check")

    monkeypatch.setattr(merging, "staging_folder", no_permission)
    monkeypatch.setattr(merging, "merged_model", must_not_load)
    assert main(["--adapter", str(adapter), "--merge-to", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "cannot write in" in err and "Permission denied" in err and "Traceback" not in err


def test_a_full_disk_is_refused_before_writing_and_a_failed_write_leaves_nothing(adapter, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(merging, "free_bytes", lambda folder: 1000)
    assert main(["--adapter", str(adapter), "--merge-to", str(tmp_path / "m"), "--check_rows", "0"]) == 2
    assert "needs about" in capsys.readouterr().err
    assert not (tmp_path / "m").exists() and no_staging_left(tmp_path)

    monkeypatch.setattr(merging, "free_bytes", lambda folder: 2**50)
    import transformers

    def disk_full(self, folder, **kwargs):
        (folder / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", disk_full)
    assert main(["--adapter", str(adapter), "--merge-to", str(tmp_path / "m"), "--check_rows", "0"]) == 2
    err = capsys.readouterr().err
    assert "writing failed (No space left on device)" in err and "free some space" in err
    assert not (tmp_path / "m").exists() and no_staging_left(tmp_path)


def test_merge_targets_inside_the_training_run_are_refused(adapter, tmp_path):
    with pytest.raises(InferenceError, match="belongs to the training run"):
        parse_args(["--adapter", str(adapter), "--merge-to", str(adapter / "merged")])
    with pytest.raises(InferenceError, match="belongs to the training run"):
        parse_args(["--adapter", str(adapter), "--export-gguf", str(adapter / "m.gguf")])
    parse_args(["--adapter", str(adapter), "--merge-to", str(adapter.parent / "merged-beside")])  # beside it: fine


def test_flags_a_mode_does_not_use_are_refused_not_ignored(adapter, tmp_path):
    with pytest.raises(InferenceError) as caught:
        parse_args(["--adapter", str(adapter), "--export-gguf", str(tmp_path / "m.gguf"), "--do_sample", "--check_rows", "3"])
    assert "--do_sample does not apply to --export-gguf" in str(caught.value)
    assert "--check_rows does not apply to --export-gguf" in str(caught.value)
    with pytest.raises(InferenceError, match="--merge_dtype does not apply to --chat"):
        parse_args(["--adapter", str(adapter), "--chat", "--merge_dtype", "float32"])
    with pytest.raises(InferenceError, match="--quantized_cache is empty"):
        parse_args(["--adapter", str(adapter), "--chat", "--quantized_cache", ""])
    parse_args(["--adapter", str(adapter), "--merge-to", str(tmp_path / "m"), "--check_rows", "3", "--merge-base", "dequantized"])


# ---------------------------------------------------------------------------- GGUF

def test_a_file_that_appears_during_the_export_is_kept(adapter, tmp_path, monkeypatch, capsys):
    import gguf_export

    path = tmp_path / "model.gguf"
    write = gguf_export.write_gguf

    def user_writes_meanwhile(*args, **kwargs):
        result = write(*args, **kwargs)
        path.write_bytes(b"precious")
        return result

    monkeypatch.setattr(gguf_export, "write_gguf", user_writes_meanwhile)
    assert main(["--adapter", str(adapter), "--export-gguf", str(path), "--gguf-type", "q8_0"]) == 2
    assert "appeared while this ran" in capsys.readouterr().err
    assert path.read_bytes() == b"precious" and no_staging_left(tmp_path)


def test_an_export_is_read_back_before_it_is_put_in_place(adapter, tmp_path, monkeypatch, capsys):
    import gguf_export

    def bad_check(staged, model, gguf_type, shown_as=None):
        assert staged != shown_as and staged.parent == shown_as.parent  # the staging file is what is read
        raise InferenceError(f"{shown_as}: blk.0.attn_q.weight differs")

    monkeypatch.setattr(gguf_export, "check_gguf", bad_check)
    assert main(["--adapter", str(adapter), "--export-gguf", str(tmp_path / "m.gguf")]) == 2
    assert f"{tmp_path / 'm.gguf'}: blk.0.attn_q.weight differs" in capsys.readouterr().err
    assert not (tmp_path / "m.gguf").exists() and no_staging_left(tmp_path)


# ---------------------------------------------------------------------------- the saved 4-bit copy

def test_a_damaged_4bit_copy_is_replaced_and_then_used(adapter, tmp_path):
    cfg = read_adapter_config(adapter)
    runtime = resolve_runtime(cfg)
    notes = []
    load_base(cfg, runtime, True, tmp_path, notes.append)
    (copy,) = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    assert "saved to" in notes[-1]
    weights = copy / "model.safetensors"
    whole = weights.read_bytes()
    for damage, said in ((lambda: weights.write_bytes(whole[: len(whole) // 2]), "model.safetensors is truncated"),
                         (lambda: (copy / "config.json").unlink(), "it has no config.json"),
                         (lambda: (copy / "config.json").write_text("{not json"), "config.json is truncated")):
        damage()
        notes.clear()
        load_base(cfg, runtime, True, tmp_path, notes.append)
        assert said in notes[0] and "quantising again to replace it" in notes[0], notes
        assert "saved to" in notes[1], notes
        notes.clear()
        load_base(cfg, runtime, True, tmp_path, notes.append)
        assert notes[0].startswith("base: 4-bit copy loaded from"), notes
    assert no_staging_left(tmp_path)
    assert json.loads((copy / "config.json").read_text())["quantization_config"]["bnb_4bit_quant_type"] == "nf4"


def test_a_copy_saved_meanwhile_by_another_process_is_reported_as_such(adapter, tmp_path, monkeypatch):
    import inference

    cfg = read_adapter_config(adapter)
    runtime = resolve_runtime(cfg)
    place = inference.place

    def another_process_first(aside, copy):
        copy.mkdir()
        (copy / "config.json").write_text("{}")
        place(aside, copy)

    monkeypatch.setattr(inference, "place", another_process_first)
    notes = []
    load_base(cfg, runtime, True, tmp_path, notes.append)
    assert "another process saved the same 4-bit copy" in notes[-1] and no_staging_left(tmp_path)


# ---------------------------------------------------------------------------- the command line's slips

def test_an_unquoted_prompt_gets_a_hint_not_a_traceback(adapter):
    with pytest.raises(InferenceError, match="put the whole prompt in quotes") as caught:
        parse_args(["--adapter", str(adapter), "What", "is", "gold?"])
    assert '"What is gold?"' in str(caught.value)
    with pytest.raises(InferenceError, match="the prompt is empty"):
        parse_args(["--adapter", str(adapter), "   "])


def test_max_new_tokens_that_fill_the_context_are_refused_before_any_answer(adapter, capsys):
    assert main(["--adapter", str(adapter), "--chat", "--max_new_tokens", "5000"]) == 2
    assert "max_new_tokens=5000 leaves no room for a prompt in the model's context of 1,024 tokens" in capsys.readouterr().err


@pytest.mark.parametrize("stored", ['{"lora_r": 8}', '["model_name"]'])
def test_a_run_config_without_its_base_is_refused_clearly(adapter, tmp_path, stored):
    import shutil

    copy = tmp_path / "adapter"
    shutil.copytree(adapter, copy)
    (copy / "run_config.json").write_text(stored)
    with pytest.raises(InferenceError, match="does not name the base model"):
        read_adapter_config(copy)


@pytest.mark.parametrize("script", ["inference.py", "main.py"])
def test_ctrl_c_while_the_libraries_import_ends_quietly(script):
    import signal
    import time

    proc = subprocess.Popen([sys.executable, script, "--help"], cwd=PROJECT_DIR, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    time.sleep(0.6)  # inside `import torch` (seconds on this machine), before main() runs
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err, err[-2000:]


def test_export_without_the_gguf_package_says_so_before_any_work(adapter, tmp_path, monkeypatch, capsys):
    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was merged before the package check")

    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf -> ImportError
    monkeypatch.setattr(merging, "merged_model", must_not_load)
    assert main(["--adapter", str(adapter), "--export-gguf", str(tmp_path / "m.gguf")]) == 2
    err = capsys.readouterr().err
    assert "needs the gguf package" in err and "pip install -r requirements.txt" in err
    assert list(tmp_path.iterdir()) == []
