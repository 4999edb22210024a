"""benchmark_generation.py's CPU smoke mode: the GPU benchmark's harness runs, end to end, on the tiny model."""

import json
import os
import subprocess
import sys

from conftest import PROJECT_DIR


def test_smoke_mode_measures_and_checks_tokens(tmp_path, tiny_model_dir):
    proc = subprocess.run([sys.executable, str(PROJECT_DIR / "benchmark_generation.py"), "--smoke", "--cases",
                           "nf4_plain_b32,nf4_fast_b32,load_cached,chat_ttft", "--profile", "--work", str(tmp_path / "work"),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "generation.json").read_text())["results"]
    fast = results["nf4_fast_b32"]
    assert fast["batch"] == 4 and fast["tokens_per_s"] > 0 and "dequantise yes" in fast["plan"]
    assert fast["same_tokens_as_plain"] == "4 of 4 rows (vs nf4_plain_b32)"  # dequantised weights: the plain case's greedy tokens
    assert "4-bit copy loaded from" in results["load_cached"]["note"] and results["load_cached"]["cache_gib"] > 0
    chat = results["chat_ttft"]
    assert chat["returncode"] == 0 and chat["answer_chars"] > 1 and 0 < chat["first_token_s"] <= chat["reply_s"]
    assert "| nf4_fast_b32 |" in (tmp_path / "out" / "generation.md").read_text()
    profile = fast["profile"]  # --profile runs on the fast cases only (on a CPU there are no kernels to count)
    assert profile["wall_ms_per_step"] > 0 and profile["python_top_ms_per_step"] and "profile" not in results["nf4_plain_b32"]
    assert set(chat["stages_s"]) >= {"main:in", "load_base:out", "from_pretrained:out", "first_token"}
