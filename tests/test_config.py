"""config.py: the seed's defaults, overrides by name, presets, and errors that name the field."""

import dataclasses
import re

import pytest

from config import PRESETS, Config, ConfigError, parse_config
from conftest import PROJECT_DIR


def test_defaults_are_the_seed_recipe():
    cfg = parse_config([])
    assert cfg.model_name == "NousResearch/Llama-2-7b-chat-hf"
    assert cfg.dataset_name == "mlabonne/guanaco-llama2-1k"
    assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout) == (32, 16, 0.1)
    assert cfg.lora_target_modules == ["auto"]  # the seed set none, so PEFT chose q_proj v_proj for Llama: see below
    assert (cfg.use_4bit, cfg.bnb_4bit_quant_type, cfg.use_nested_quant) == (True, "nf4", False)
    assert cfg.num_train_epochs == 10
    assert (cfg.learning_rate, cfg.lr_scheduler_type, cfg.warmup_ratio) == (2e-4, "cosine", 0.03)
    assert (cfg.max_grad_norm, cfg.weight_decay, cfg.max_seq_length, cfg.packing, cfg.group_by_length) == \
        (0.3, 0.001, 256, False, True)
    # The seed's 1 x 8 rows per step is the math; how they are split is left to performance.py.
    assert cfg.rows_per_step == 8 and cfg.optim == "auto"
    assert (cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps, cfg.gradient_checkpointing) == (None, None, None)
    assert (cfg.logging_steps, cfg.report_to, cfg.trust_remote_code) == (25, "tensorboard", False)


def test_any_field_overrides_by_name():
    cfg = parse_config(["--num_train_epochs", "1", "--learning_rate", "1e-4", "--lora_target_modules", "q_proj", "k_proj",
                        "--gradient_checkpointing", "False"])
    assert cfg.num_train_epochs == 1 and cfg.learning_rate == 1e-4
    assert cfg.lora_target_modules == ["q_proj", "k_proj"] and cfg.gradient_checkpointing is False


def test_tiny_preset_keeps_the_recipe_and_flags_still_win():
    cfg = parse_config(["--preset", "tiny", "--learning_rate", "1e-3"])
    assert cfg.model_name == "tiny-llama" and cfg.dataset_name == "data/sample.jsonl"
    assert cfg.learning_rate == 1e-3  # explicit flag beats the preset
    assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_target_modules, cfg.bnb_4bit_quant_type) == (32, 16, ["auto"], "nf4")
    changed = set(PRESETS["tiny"])
    assert changed <= {"model_name", "dataset_name", "output_dir", "new_model", "num_train_epochs", "learning_rate",
                       "logging_steps", "save_steps", "allow_cpu", "max_new_tokens", "example_prompt",
                       "report_prompts"}


def test_every_problem_is_reported_at_once_naming_field_and_allowed_values():
    with pytest.raises(ConfigError) as err:
        parse_config(["--learning_rate", "0", "--lora_r", "0", "--lora_dropout", "1.0", "--bnb_4bit_quant_type", "int3",
                      "--bnb_4bit_compute_dtype", "float8", "--max_seq_length", "0"])
    message = str(err.value)
    for expected in ("learning_rate=0.0", "lora_r=0", "lora_dropout=1.0", "bnb_4bit_quant_type='int3'", "nf4, fp4",
                     "bnb_4bit_compute_dtype='float8'", "auto, bfloat16, float16, float32", "max_seq_length=0"):
        assert expected in message


def test_unknown_field_is_named_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"--learnig_rate is not a setting; did you mean --learning_rate"):
        parse_config(["--learnig_rate", "1e-4"])


def test_wrong_type_names_the_field():
    with pytest.raises(ConfigError, match=r"--learning_rate.*invalid float value: 'fast'"):
        parse_config(["--learning_rate", "fast"])


def test_unknown_preset():
    with pytest.raises(ConfigError, match=r"preset='huge'.*tiny, seed"):
        parse_config(["--preset", "huge"])


def test_readme_documents_every_field():
    readme = (PROJECT_DIR / "README.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^\| `(\w+)` \|", readme, flags=re.M))
    fields = {f.name for f in dataclasses.fields(Config)}
    assert fields - documented == set(), "README.md's settings table misses fields"


def test_help_lists_every_setting():
    """`%` in a help text ("~30% more compute") used to crash argparse's --help."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, str(PROJECT_DIR / "main.py"), "--help"], capture_output=True, text=True,
                          timeout=300, env={"HF_HUB_OFFLINE": "1", "PATH": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "30% more compute" in proc.stdout.replace("\n", " ").replace("  ", " ")
    for f in dataclasses.fields(Config):
        assert f"--{f.name}" in proc.stdout, f.name


@pytest.mark.parametrize("argv, message", [
    (["--seed", "-1"], "seed=-1 must be in [0, 2**32 - 1]"),
    (["--seed", str(2**32)], "seed=4294967296 must be in"),
    (["--num_train_epochs", "inf"], "num_train_epochs=inf must be a finite number"),
    (["--num_train_epochs", "nan"], "num_train_epochs=nan must be a finite number"),
    (["--weight_decay", "inf"], "weight_decay=inf must be a finite number"),
    (["--max_grad_norm", "inf"], "max_grad_norm=inf must be a finite number"),
    (["--output_dir", ""], "output_dir is empty"),
    (["--output_dir", "  "], "output_dir is empty"),
    (["--resume", "--overwrite"], "give only one of them"),
])
def test_values_that_would_crash_or_mislead_are_refused(argv, message):
    with pytest.raises(ConfigError) as err:
        parse_config(argv)
    assert message in str(err.value)


@pytest.mark.parametrize("name", [".", "..", "", " ", "/abs/path", "a/b", "a\\b", "./x", ".hidden"])
def test_adapter_name_must_be_a_plain_folder_name(name):
    with pytest.raises(ConfigError, match=re.escape(f"new_model={name!r}")):
        parse_config(["--new_model", name])


def test_two_presets_are_refused():
    """Only one preset can apply: `--preset tiny --preset seed` applied tiny and recorded seed."""
    for argv in (["--preset", "tiny", "--preset", "seed"], ["--preset=tiny", "--preset", "tiny"]):
        with pytest.raises(ConfigError, match=r"--preset is given 2 times"):
            parse_config(argv)


def test_a_stray_positional_argument_is_refused():
    with pytest.raises(ConfigError, match=r"unexpected argument\(s\) 'my_rows.jsonl'.*--name value"):
        parse_config(["--preset", "tiny", "my_rows.jsonl"])


@pytest.mark.parametrize("model_type, expected", [
    ("llama", ["q_proj", "v_proj"]),  # the seed's LoRA targets for Llama-2
    ("qwen3", ["q_proj", "v_proj"]),
    ("gemma3_text", ["q_proj", "v_proj"]),
    ("gpt2", ["c_attn"]),
    ("falcon", ["query_key_value"]),
])
def test_auto_lora_targets_follow_the_architecture_and_say_why(model_type, expected):
    from types import SimpleNamespace

    from model_setup import resolve_lora_targets

    cfg, why = resolve_lora_targets(parse_config([]), SimpleNamespace(model_type=model_type))
    assert cfg.lora_target_modules == expected
    assert why == f"LoRA on {' '.join(expected)} (auto: PEFT's default for model type {model_type!r})"


def test_lora_targets_set_by_the_user_run_as_set():
    from types import SimpleNamespace

    from model_setup import resolve_lora_targets

    cfg, why = resolve_lora_targets(parse_config(["--lora_target_modules", "q_proj", "k_proj", "o_proj"]),
                                    SimpleNamespace(model_type="gpt2"))
    assert cfg.lora_target_modules == ["q_proj", "k_proj", "o_proj"] and why.endswith("(as set)")
    with pytest.raises(ConfigError, match=r"mixes 'auto' with layer names"):
        parse_config(["--lora_target_modules", "auto", "q_proj"])


@pytest.mark.parametrize("flag, value", [("--dataset_format", "jsonl"), ("--on_bad_rows", "ignore")])
def test_data_choices_are_checked(flag, value):
    with pytest.raises(ConfigError, match=rf"{flag[2:]}='{value}' is not allowed; use one of"):
        parse_config([flag, value])
