"""README.md's examples run, so that they cannot rot: its Python code, and its commands' flags."""

import os
import re
import shlex
import subprocess
import sys

import pytest

from conftest import PROJECT_DIR

README = (PROJECT_DIR / "README.md").read_text(encoding="utf-8")


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README, flags=re.M | re.S)


LAUNCHERS = ("python", "torchrun", "accelerate")


def commands(script: str) -> list[list[str]]:
    """Each `python main.py ...` / `python inference.py ...` in the README's bash blocks, as argv; also
    under a launcher (`torchrun ... main.py ...`, `accelerate launch ... main.py ...`), where
    `[settings]` stands for any settings."""
    found = []
    for words in bash_commands():
        if words and words[0] in LAUNCHERS and script in words:
            found.append([w for w in words[words.index(script) + 1:] if w != "[settings]"])
    return found


def bash_commands() -> list[list[str]]:
    return [shlex.split(part, comments=True) for block in code_blocks("bash") for line in block.splitlines()
            for part in line.split("&&")]


def test_readme_launch_configs_exist():
    """The several-GPU commands name accelerate configs that ship with the project."""
    configs = [words[words.index("--config_file") + 1] for words in bash_commands() if "--config_file" in words]
    assert configs, "README.md shows no accelerate launch command"
    assert all((PROJECT_DIR / path).is_file() for path in configs), configs


@pytest.mark.parametrize("argv", commands("quantize.py"), ids=" ".join)
def test_readme_quantize_commands_are_valid(argv):
    from transformers import HfArgumentParser

    from quantize import QuantizeArgs

    HfArgumentParser(QuantizeArgs).parse_args_into_dataclasses(args=argv)


def test_readme_python_examples_run(tiny_run, tmp_path):
    """The examples use the tiny run's adapter, so they run here as a user would run them after it."""
    out, _ = tiny_run
    (tmp_path / "results-tiny").symlink_to(out)
    blocks = code_blocks("python")
    assert blocks, "README.md has no python example"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(PROJECT_DIR))
    for block in blocks:
        proc = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, f"{block}\n{proc.stderr[-3000:]}"
        assert "Au" in proc.stdout  # the tiny adapter answers the trained question


@pytest.mark.parametrize("argv", commands("main.py"), ids=" ".join)
def test_readme_main_commands_are_valid_settings(argv):
    from config import parse_config

    parse_config(argv)


@pytest.mark.parametrize("argv", commands("inference.py"), ids=" ".join)
def test_readme_inference_commands_are_valid(argv):
    from inference import parse_args

    parse_args(argv)


def test_requirements_advice_keeps_a_gpu_machines_torch():
    """pip treats `torch==2.13.0` as a requirement with or without --no-deps: the advice must drop the line."""
    text = (PROJECT_DIR / "requirements.txt").read_text(encoding="utf-8")
    assert "--no-deps" not in text
    advice = re.search(r"`(grep -v [^`]+)`", text).group(1)
    kept = subprocess.run(advice.split("|")[0], shell=True, capture_output=True, text=True, cwd=PROJECT_DIR).stdout
    pins = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert [line for line in kept.splitlines() if line and not line.startswith("#")] == [p for p in pins if not p.startswith("torch==")]
