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
