"""Shared fixtures: everything runs offline on the bundled tiny Llama (built once per machine)."""

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # a test must never reach for the hub
# The suite is the CPU suite, exact in float32 (GPU speed and memory are benchmark.py's job). On a
# GPU machine, hide the GPUs so the same tolerances hold; set CUDA_VISIBLE_DEVICES to override.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

PROJECT_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_DIR))

import config  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir():
    from tiny_model import ensure_tiny_model

    return ensure_tiny_model()


def tiny_config(output_dir, *overrides):
    """The tiny preset with quiet, fast settings for in-process tests, plus any overrides, resolved for
    the CPU as main.py resolves it (performance.apply_plan: every speed/memory field concrete)."""
    from model_setup import resolve_runtime
    from performance import apply_plan, plan_performance

    argv = ["--preset", "tiny", "--output_dir", str(output_dir), "--report_to", "none", "--save_steps", "0",
            "--eval_fraction", "0", *map(str, overrides)]
    cfg = config.parse_config(argv)
    return apply_plan(cfg, plan_performance(cfg, resolve_runtime(cfg), model_config=None, world_size=1))


@pytest.fixture
def make_config(tmp_path, tiny_model_dir):
    return lambda *overrides: tiny_config(tmp_path / "out", *overrides)


def run_main(args, cwd=PROJECT_DIR, timeout=600, **popen):
    """`python main.py ARGS` as a user runs it; returns the CompletedProcess."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")  # inherits CUDA_VISIBLE_DEVICES
    return subprocess.run([sys.executable, str(PROJECT_DIR / "main.py"), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout, **popen)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_model_dir):
    """One real `python main.py --preset tiny` run, shared by the tests that inspect its outputs."""
    out = tmp_path_factory.mktemp("tiny-run") / "results"
    proc = run_main(["--preset", "tiny", "--output_dir", out])
    assert proc.returncode == 0, f"main.py failed:\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-3000:]}"
    return out, proc


# A quick tiny-preset run: the report answers one short prompt.
QUICK = ["--preset", "tiny", "--report_to", "none", "--report_prompts", "Hi", "--max_new_tokens", "8"]
# Four steps with a checkpoint at 2 and 4, one loss line per step, and the held-out split.
SHORT = QUICK + ["--max_steps", "4", "--save_steps", "2", "--logging_steps", "1"]


@pytest.fixture(scope="session")
def short_run(tmp_path_factory, tiny_model_dir):
    """One finished SHORT run (checkpoint-2, checkpoint-4, adapter, report); copy it before changing it."""
    import main

    out = tmp_path_factory.mktemp("short-run") / "run"
    main.run(SHORT + ["--output_dir", str(out)])
    return out


@pytest.fixture
def run_copy(short_run, tmp_path):
    """A private copy of the finished SHORT run, to break and resume."""
    return Path(shutil.copytree(short_run, tmp_path / "run"))


def tree(folder) -> dict[str, str]:
    """Every file under folder (hidden ones too) -> a hash of its bytes: equal trees, nothing changed."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}
