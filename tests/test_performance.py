"""performance.py: the layout chosen from free memory keeps the rows per step (the math) fixed."""

import pytest
from transformers import LlamaConfig

from config import parse_config
from model_setup import Runtime
from performance import apply_plan, plan_performance

LLAMA2_7B = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                        num_key_value_heads=32, vocab_size=32000)
GPU = Runtime("cuda:0", None, "test")
GiB = 2**30


@pytest.mark.parametrize("free_gib", [6, 12, 16, 24, 40, 80, 140])
def test_auto_keeps_rows_per_step_and_fits_the_budget(free_gib, monkeypatch):
    monkeypatch.setattr("performance.liger_available", lambda runtime: (False, "no liger"))
    cfg = parse_config([])
    plan = plan_performance(cfg, GPU, LLAMA2_7B, free_bytes=free_gib * GiB)
    assert plan.micro_batch * plan.accumulation == 8  # the seed's 1 x 8 rows per optimizer step
    assert "auto:" in plan.reason


def test_auto_uses_more_memory_for_speed_when_there_is_room(monkeypatch):
    monkeypatch.setattr("performance.liger_available", lambda runtime: (False, "no liger"))
    cfg = parse_config([])
    big = plan_performance(cfg, GPU, LLAMA2_7B, free_bytes=80 * GiB)
    card_16 = plan_performance(cfg, GPU, LLAMA2_7B, free_bytes=16 * GiB)
    card_8 = plan_performance(cfg, GPU, LLAMA2_7B, free_bytes=8 * GiB)
    tiny = plan_performance(cfg, GPU, LLAMA2_7B, free_bytes=6 * GiB)
    # Measured on the 7B shape (BENCHMARKS.md): 8 rows without checkpointing peak at 11.5 GiB, with it at 5.0.
    assert (big.micro_batch, big.checkpointing) == (8, False) == (card_16.micro_batch, card_16.checkpointing)
    assert (card_8.micro_batch, card_8.checkpointing) == (8, True)
    assert tiny.checkpointing and tiny.micro_batch < 8


def test_fused_loss_kernel_frees_room_for_a_larger_layout(monkeypatch):
    cfg = parse_config([])
    monkeypatch.setattr("performance.liger_available", lambda runtime: (False, "no liger"))
    plain = plan_performance(cfg, GPU, LLAMA2_7B, free_bytes=30 * GiB)
    monkeypatch.setattr("performance.liger_available", lambda runtime: (True, "liger"))
    fused = plan_performance(cfg, GPU, LLAMA2_7B, free_bytes=30 * GiB)
    assert (fused.micro_batch, not fused.checkpointing) >= (plain.micro_batch, not plain.checkpointing)


def test_cpu_keeps_the_configured_layout_and_says_liger_needs_a_gpu():
    cfg = parse_config(["--preset", "tiny", "--use_liger_kernel"])
    plan = plan_performance(cfg, Runtime("cpu", None, "test"), LLAMA2_7B)
    assert (plan.micro_batch, plan.accumulation, plan.checkpointing, plan.use_liger) == (1, 8, True, False)
    assert "need a CUDA GPU" in plan.reason


def test_auto_swaps_paged_adamw_for_fused_on_gpu_only(monkeypatch):
    monkeypatch.setattr("performance.liger_available", lambda runtime: (False, "no liger"))
    gpu = apply_plan(parse_config([]), plan_performance(parse_config([]), GPU, LLAMA2_7B, free_bytes=80 * GiB))
    cpu_cfg = parse_config(["--preset", "tiny"])
    cpu = apply_plan(cpu_cfg, plan_performance(cpu_cfg, Runtime("cpu", None, "t"), LLAMA2_7B))
    assert gpu.optim == "adamw_torch_fused" and cpu.optim == "paged_adamw_32bit"


def test_seed_preset_is_exactly_the_seed_layout():
    cfg = parse_config(["--preset", "seed"])
    plan = plan_performance(cfg, GPU, LLAMA2_7B, free_bytes=80 * GiB)
    applied = apply_plan(cfg, plan)
    assert (applied.per_device_train_batch_size, applied.gradient_accumulation_steps, applied.gradient_checkpointing,
            applied.use_liger_kernel, applied.bnb_4bit_compute_dtype, applied.optim, applied.fp32_frozen_weights) == \
        (1, 8, True, False, "float16", "paged_adamw_32bit", True)


def test_resumed_run_keeps_the_checkpoints_micro_batch(monkeypatch):
    monkeypatch.setattr("performance.liger_available", lambda runtime: (False, "no liger"))
    plan = plan_performance(parse_config([]), GPU, LLAMA2_7B, free_bytes=80 * GiB, resumed_micro_batch=2)
    assert (plan.micro_batch, plan.accumulation) == (2, 4)


def test_auto_keeps_weights_dequantised_only_where_they_fit(monkeypatch):
    monkeypatch.setattr("performance.liger_available", lambda runtime: (False, "no liger"))
    cfg = parse_config([])
    assert plan_performance(cfg, GPU, LLAMA2_7B, free_bytes=80 * GiB).dequantize
    assert not plan_performance(cfg, GPU, LLAMA2_7B, free_bytes=16 * GiB).dequantize
    assert not plan_performance(parse_config(["--performance_mode", "memory"]), GPU, LLAMA2_7B, free_bytes=80 * GiB).dequantize
    assert not plan_performance(parse_config(["--preset", "tiny"]), Runtime("cpu", None, "t"), LLAMA2_7B).dequantize
