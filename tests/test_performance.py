"""performance.py: every speed/memory decision in one place; a value the user set is what runs.

The plan is tested against a Llama-2-7B config and a pretend GPU of a given free memory, so these
run on the CPU; the layouts' memory figures come from BENCHMARKS.md.
"""

import pytest
from transformers import LlamaConfig

import main
from config import parse_config
from model_setup import Runtime
from performance import PlanError, apply_plan, format_plan, plan_performance

LLAMA2_7B = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                        num_key_value_heads=32, vocab_size=32000)
GPU = Runtime("cuda:0", None, "test")
CPU = Runtime("cpu", None, "test")
GiB = 2**30


def plan(*argv, free_gib=80, runtime=GPU, world_size=1, **kwargs):
    return plan_performance(parse_config(list(argv)), runtime, LLAMA2_7B, free_bytes=free_gib * GiB,
                            world_size=world_size, **kwargs)


@pytest.mark.parametrize("free_gib", [6, 12, 16, 24, 40, 80, 140])
def test_auto_keeps_rows_per_step_and_fits_the_budget(free_gib):
    chosen = plan(free_gib=free_gib)
    assert chosen.micro_batch * chosen.accumulation == 8 == chosen.rows_per_step  # the seed's 1 x 8
    assert any(note.startswith("auto:") for note in chosen.notes)


def test_auto_uses_more_memory_for_speed_when_there_is_room():
    big, card_16, card_8, tiny = (plan(free_gib=g) for g in (80, 16, 8, 6))
    # Measured on the 7B shape (BENCHMARKS.md): 8 rows without checkpointing peak at 11.5 GiB, with it at 5.0.
    assert (big.micro_batch, big.checkpointing) == (8, False) == (card_16.micro_batch, card_16.checkpointing)
    assert (card_8.micro_batch, card_8.checkpointing) == (8, True)
    assert tiny.checkpointing and tiny.micro_batch < 8
    assert big.dequantize and not card_16.dequantize


# ---------------------------------------------------------------------------- the user's settings are what runs

EXPLICIT = [
    ("--per_device_train_batch_size", "2", "per_device_train_batch_size", 2),
    ("--gradient_accumulation_steps", "4", "gradient_accumulation_steps", 4),
    ("--gradient_checkpointing", "True", "gradient_checkpointing", True),
    ("--dequantize_frozen", "False", "dequantize_frozen", False),
    ("--optim", "paged_adamw_32bit", "optim", "paged_adamw_32bit"),
    ("--pad_to_multiple_of", "8", "pad_to_multiple_of", 8),
    ("--torch_compile", "False", "torch_compile", False),
    ("--cudnn_attention", "True", "cudnn_attention", True),
    ("--padding_free", "True", "padding_free", True),
]


@pytest.mark.parametrize("mode", ["auto", "speed", "memory"])
@pytest.mark.parametrize("flag, value, name, expected", EXPLICIT)
def test_a_field_the_user_set_is_never_changed(mode, flag, value, name, expected):
    """On a big GPU every mode would choose otherwise; the user's value still runs."""
    cfg = parse_config(["--performance_mode", mode, flag, value])
    applied = apply_plan(cfg, plan_performance(cfg, GPU, LLAMA2_7B, free_bytes=140 * GiB, world_size=1))
    assert getattr(applied, name) == expected
    assert applied.rows_per_step == 8


def test_the_issue_8_command_runs_as_given():
    """The settings a user gave in issue 8, which the old planner replaced by 8 x 1, no checkpointing, dequantised."""
    cfg = parse_config(["--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "4",
                        "--gradient_checkpointing", "True", "--dequantize_frozen", "False"])
    chosen = plan_performance(cfg, GPU, LLAMA2_7B, free_bytes=140 * GiB, world_size=1)
    assert (chosen.micro_batch, chosen.accumulation, chosen.checkpointing, chosen.dequantize) == (2, 4, True, False)
    assert "2 rows per forward pass x 4 accumulation (set)" in format_plan(chosen)


def test_setting_one_of_batch_and_accumulation_derives_the_other():
    assert (plan("--per_device_train_batch_size", "4").accumulation, plan("--gradient_accumulation_steps", "2").micro_batch) == (2, 4)
    assert plan("--rows_per_step", "16", "--per_device_train_batch_size", "4").accumulation == 4


@pytest.mark.parametrize("argv, message", [
    (["--per_device_train_batch_size", "3"], "does not divide the 2 rows per step of each process"),
    (["--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2", "--rows_per_step", "32"], "set two of the three"),
    (["--rows_per_step", "6"], "shared evenly by 4 processes"),
])
def test_contradictory_layouts_are_refused_naming_the_fields(argv, message):
    with pytest.raises(PlanError, match=message):
        plan(*argv, world_size=4)


def test_several_gpus_share_the_rows_of_a_step():
    """rows_per_step is over all processes: 4 GPUs take the seed's 8 rows per step, 2 each, by default."""
    chosen = plan(world_size=4)
    assert chosen.micro_batch * chosen.accumulation == 2 and chosen.rows_per_step == 8


def test_modes_fill_only_open_fields():
    speed, memory = plan("--performance_mode", "speed", free_gib=6), plan("--performance_mode", "memory")
    assert (speed.micro_batch, speed.checkpointing, speed.dequantize, speed.torch_compile) == (8, False, True, True)
    assert (memory.micro_batch, memory.checkpointing, memory.dequantize, memory.torch_compile) == (8, True, False, False)
    assert not plan().torch_compile  # auto: a one-off compile does not pay back in the seed's ~1,100 steps


def test_cpu_keeps_the_seed_layout_and_chooses_no_gpu_options():
    chosen = plan("--preset", "tiny", runtime=CPU)
    assert (chosen.micro_batch, chosen.accumulation, chosen.checkpointing) == (1, 8, True)
    assert (chosen.optim, chosen.dequantize, chosen.pad_to_multiple_of, chosen.torch_compile, chosen.padding_free) == \
        ("adamw_torch", False, 1, False, False)


def test_gpu_auto_turns_cudnn_attention_off_and_buckets_lengths_only_for_it():
    """cuDNN attention builds a ~2 s plan for each new sequence length (issue 8's stall): auto keeps it
    off, and pads to the longest row only; a user who turns it on gets lengths bucketed to 64."""
    chosen = plan()
    assert (chosen.cudnn_attention, chosen.pad_to_multiple_of, chosen.optim) == (False, 1, "adamw_torch_fused")
    assert plan("--cudnn_attention", "True").pad_to_multiple_of == 64


def test_liger_on_a_cpu_is_an_error_not_a_silent_fallback():
    with pytest.raises(PlanError, match="needs a CUDA GPU"):
        plan("--preset", "tiny", "--use_liger_kernel", runtime=CPU)


def test_seed_preset_is_exactly_the_seed_layout():
    cfg = parse_config(["--preset", "seed"])
    applied = apply_plan(cfg, plan_performance(cfg, GPU, LLAMA2_7B, free_bytes=80 * GiB, world_size=1))
    assert (applied.per_device_train_batch_size, applied.gradient_accumulation_steps, applied.gradient_checkpointing,
            applied.use_liger_kernel, applied.bnb_4bit_compute_dtype, applied.optim, applied.fp32_frozen_weights,
            applied.dequantize_frozen, applied.pad_to_multiple_of, applied.torch_compile) == \
        (1, 8, True, False, "float16", "paged_adamw_32bit", True, False, 1, False)


def test_resumed_run_keeps_the_checkpoints_micro_batch():
    chosen = plan(resumed_micro_batch=2)
    assert (chosen.micro_batch, chosen.accumulation) == (2, 4)


def test_one_plan_per_run_and_the_trainer_runs_it(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """main.py plans once, prints it once, and the Trainer gets exactly the planned values."""
    import performance

    calls, seen = [], {}
    real_plan, real_build = performance.plan_performance, main.build_trainer
    monkeypatch.setattr(main, "plan_performance", lambda *a, **k: calls.append(1) or real_plan(*a, **k))

    def spy_build(model, tokenizer, train_rows, eval_rows, cfg, runtime, callbacks=()):
        trainer = real_build(model, tokenizer, train_rows, eval_rows, cfg, runtime, callbacks)
        seen.update(batch=trainer.args.per_device_train_batch_size, accumulation=trainer.args.gradient_accumulation_steps,
                    optim=getattr(trainer.args.optim, "value", trainer.args.optim))
        return trainer

    monkeypatch.setattr(main, "build_trainer", spy_build)
    main.run(["--preset", "tiny", "--output_dir", str(tmp_path / "o"), "--max_steps", "1", "--report_to", "none",
              "--per_device_train_batch_size", "2", "--report_prompts", "Hi", "--max_new_tokens", "4"])
    out = capsys.readouterr().out
    assert len(calls) == 1 and out.count("layout: 8 rows per step") == 1
    assert seen == {"batch": 2, "accumulation": 4, "optim": "adamw_torch"}


def test_out_of_memory_names_the_values_that_ran(tmp_path, tiny_model_dir, monkeypatch, capsys):
    import torch

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(main, "run_training", oom)
    code = main.main(["--preset", "tiny", "--output_dir", str(tmp_path / "o"), "--report_to", "none",
                      "--gradient_accumulation_steps", "2"])
    err = capsys.readouterr().err
    assert code == 3
    # Planned from accumulation 2: 4 rows per pass. The message names that, not the unset None.
    assert "per_device_train_batch_size=4" in err and "gradient_checkpointing=True" in err and "Traceback" not in err
