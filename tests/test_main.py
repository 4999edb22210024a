"""The real entry point, run as a user runs it: `python main.py --preset tiny`."""

import json

import pytest
import torch

import data_preparation as dp
from conftest import PROJECT_DIR
from inference import GenerationSettings, answer, load_for_inference


def trained_rows(run_dir):
    """The bundled rows that the run trained on (not held out), in file order, as (question, answer)."""
    from config import Config

    cfg = Config(**json.loads((run_dir / "tiny-llama-finetune" / "run_config.json").read_text()))
    data, _ = dp.clean_dataset(dp.load_raw_dataset(str(PROJECT_DIR / cfg.dataset_name)))
    train, held_out = dp.split_train_eval(data, cfg.eval_fraction, cfg.seed)
    held = set(held_out["text"])
    pairs = []
    for text in data["text"]:
        if text in held or text.count("[INST]") != 1 or "<<SYS>>" in text:
            continue
        question, answer = text.split("[/INST]")
        pairs.append((question.replace("[INST]", "").strip(), answer.replace("</s>", "").strip()))
    return pairs


def test_main_writes_the_adapter_and_prints_the_answer(tiny_run):
    out, proc = tiny_run
    adapter = out / "tiny-llama-finetune"
    for name in ("adapter_config.json", "adapter_model.safetensors", "run_config.json", "tokenizer.json"):
        assert (adapter / name).is_file(), name
    assert json.loads((adapter / "run_config.json").read_text())["model_name"] == "tiny-llama"
    assert f"adapter saved to {adapter}" in proc.stdout
    # The tiny preset's example prompt is a trained question: the printed answer is the trained one.
    assert "[INST] What is the chemical symbol for gold? [/INST]\nThe chemical symbol for gold is Au" in proc.stdout
    assert "trainable params: " in proc.stdout and "tokens/s" in proc.stdout and "peak memory" in proc.stdout
    assert "step " in proc.stdout and "| loss " in proc.stdout  # one readable line per logging step
    assert "Traceback" not in proc.stderr


def test_tiny_preset_reproduces_trained_answers(tiny_run):
    """After training, greedy decoding answers training questions with their trained answers, and stops."""
    out, _ = tiny_run
    model, tokenizer, cfg, _ = load_for_inference(out / "tiny-llama-finetune")
    settings = GenerationSettings(max_new_tokens=cfg.max_new_tokens)
    pairs = trained_rows(out)[:10]
    exact = [question for question, reference in pairs
             if answer(model, tokenizer, question, settings).text.split() == reference.split()]
    # 6 of 10 on the dev machine (2026-11-27); a little float noise between CPUs may cost one or two.
    assert len(exact) >= 3, f"only {len(exact)} of {len(pairs)} trained answers reproduced word for word"


def test_generation_stops_with_eos_before_the_limit(tiny_run):
    out, _ = tiny_run
    model, tokenizer, cfg, _ = load_for_inference(out / "tiny-llama-finetune")
    stopped = []
    for question, _ in trained_rows(out)[:10]:
        ids = tokenizer(dp.format_prompt(question), return_tensors="pt").to(model.device)
        with torch.no_grad():
            generated = model.generate(**ids, max_new_tokens=cfg.max_new_tokens, do_sample=False,
                                       pad_token_id=tokenizer.pad_token_id)[0, ids["input_ids"].shape[1]:].tolist()
        if tokenizer.eos_token_id in generated and len(generated) < cfg.max_new_tokens:
            stopped.append(question)
    # If the </s> labels were lost (masked as padding, or cut off), none would stop.
    assert len(stopped) >= 7, f"only {len(stopped)} of 10 trained prompts ended with EOS: {stopped}"


def test_the_last_evaluation_is_printed_once(tiny_run):
    out, proc = tiny_run
    final = json.loads((out / "metrics.json").read_text())["train"]["global_step"]
    lines = [line for line in proc.stdout.replace("\r", "\n").splitlines() if "eval_loss" in line]
    assert sum(f"step {final:>5}/{final}" in line for line in lines) == 1, lines[-3:]


def test_no_library_noise_a_user_cannot_act_on(tiny_run):
    _, proc = tiny_run
    assert "Paged optimizers are not supported" not in proc.stderr
    assert "gemm_4bit_forward" not in proc.stderr
    assert "is deprecated" not in proc.stderr


def test_bitsandbytes_kernel_message_is_silenced():
    """On CPUs with AVX512-BF16, importing bitsandbytes logs that a hub kernel could not be fetched.
    Make bitsandbytes believe this CPU has AVX512-BF16, so that it logs it here too."""
    import subprocess
    import sys

    pretend = ("import importlib.abc, sys\n"
               "class Hook(importlib.abc.MetaPathFinder):\n"
               "    def find_spec(self, name, path, target=None):\n"
               "        if name == 'bitsandbytes.backends.cpu.ops':\n"
               "            import bitsandbytes.functional as f\n"
               "            f.has_avx512bf16 = lambda: True\n"
               "sys.meta_path.insert(0, Hook())\n")
    without = subprocess.run([sys.executable, "-c", pretend + "import bitsandbytes"], capture_output=True, text=True,
                             timeout=300, cwd=PROJECT_DIR, env={"HF_HUB_OFFLINE": "1", "PATH": ""})
    assert "Failed to load CPU gemm_4bit_forward" in without.stderr  # the pretence works on this machine
    through_main = subprocess.run([sys.executable, "-c", pretend + "import sys; sys.argv = ['main.py', '--help']; "
                                   "import runpy; runpy.run_path('main.py', run_name='__main__')"],
                                  capture_output=True, text=True, timeout=300, cwd=PROJECT_DIR,
                                  env={"HF_HUB_OFFLINE": "1", "PATH": ""})
    assert through_main.returncode == 0, through_main.stderr[-2000:]
    assert "gemm_4bit_forward" not in through_main.stderr


def test_adapter_names_a_base_that_resolves_elsewhere_and_has_a_real_card(tiny_run):
    out, _ = tiny_run
    adapter = out / "tiny-llama-finetune"
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny-llama"
    card = (adapter / "README.md").read_text()
    metrics = json.loads((out / "metrics.json").read_text())
    assert "base_model: tiny-llama" in card and "data/sample.jsonl" in card and "r=32, alpha=16" in card
    assert f"held-out loss {metrics['eval_loss_before']:.4f} (base) -> {metrics['eval_loss_after']:.4f}" in card
    assert not (out / "README.md").exists(), "TRL's model card ('fine-tuned version of [None]') is back"
    assert "[None]" not in card and "More Information Needed" not in card


@pytest.mark.parametrize("extra, message", [
    (["--model_name", "/no/such/folder"], "model folder '/no/such/folder' does not exist"),
    (["--model_name", "someorg/somemodel"], "HF_HUB_OFFLINE is set, so the hub is not tried"),
    (["--model_name", str(PROJECT_DIR / "data")], "is a folder, but its config does not load"),
    (["--lora_r", "512"], "lora_r=512 is larger than the layers it adapts allow: q_proj is 128 x 128"),
    (["--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "200", "--num_train_epochs", "1"],
     "is more than the 108 forward passes"),
    (["--gradient_accumulation_steps", "3"], "does not divide the 8 rows per step"),
    (["--seed", "-1"], "seed=-1"),
    (["--dataset_name", "typo.jsonl"], "does not exist"),
])
def test_errors_are_one_clear_paragraph_pointing_to_help(tmp_path, tiny_model_dir, capsys, extra, message):
    import main

    assert main.main(["--preset", "tiny", "--output_dir", tmp_path / "run", "--report_to", "none", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert "`python main.py --help` lists every setting" in err
    assert not (tmp_path / "run").exists()


def test_a_one_step_run_says_warmup_takes_it(tmp_path, tiny_model_dir, capsys):
    from training import check_steps

    check_steps(108, 1, 8, 1, 10, 1, 0.03)
    assert "the adapter will learn nothing" in capsys.readouterr().out
    check_steps(108, 1, 8, 1, 10, 2, 0.03)
    assert capsys.readouterr().out == ""
