"""report.py through a real tiny-preset run: held-out loss falls, and the report files are real."""

import json

import numpy as np


def test_held_out_loss_improves_and_metrics_parse(tiny_run):
    out, proc = tiny_run
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("eval_loss_before", "eval_loss_after", "perplexity_before", "perplexity_after", "config",
                "train_loss_per_step", "eval_loss_per_step", "tokens_per_second", "peak_memory_gib", "wall_time_s"):
        assert key in metrics, key
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"]
    assert metrics["perplexity_after"] < metrics["perplexity_before"]
    assert np.isclose(metrics["perplexity_after"], np.exp(metrics["eval_loss_after"]))
    assert len(metrics["train_loss_per_step"]) >= 3 and len(metrics["eval_loss_per_step"]) >= 2
    assert metrics["config"]["model_name"] == "tiny-llama" and metrics["held_out_rows"] > 0
    assert "held-out loss" in proc.stdout and str(out / "report.md") in proc.stdout


def test_loss_curve_is_a_png_with_both_curves(tiny_run):
    import matplotlib.image

    out, _ = tiny_run
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = matplotlib.image.imread(out / "loss_curve.png")[..., :3]
    assert pixels.shape[0] > 200 and pixels.shape[1] > 300

    def has_colour(hex_colour):
        rgb = np.array([int(hex_colour[i:i + 2], 16) / 255 for i in (1, 3, 5)])
        return int((np.abs(pixels - rgb).max(axis=-1) < 0.02).sum())

    assert has_colour("#1f77b4") > 50, "no train curve (tab:blue) drawn"
    assert has_colour("#ff7f0e") > 50, "no held-out curve (tab:orange) drawn"


def test_markdown_report_puts_base_and_tuned_side_by_side(tiny_run):
    out, _ = tiny_run
    metrics = json.loads((out / "metrics.json").read_text())
    report = (out / "report.md").read_text()
    assert "| held-out loss |" in report and "![loss curve](loss_curve.png)" in report
    for item, prompt in zip(metrics["answers"], metrics["config"]["report_prompts"]):
        assert item["prompt"] == prompt and f"### {prompt}" in report
    assert report.count("| base model | fine-tuned |\n|---|---|") == len(metrics["config"]["report_prompts"])
    assert any(item["base"] != item["tuned"] for item in metrics["answers"])


def test_base_model_evaluation_keeps_lora_trainable_and_switches_it_off(tiny_model_dir):
    """The held-out loss before training is the base model's: the adapter is off. Its weights stay
    marked trainable meanwhile, because FSDP shards the model at that first evaluation and groups
    weights by trainability (frozen float32 LoRA next to bf16 base weights: 'Must flatten tensors
    with uniform dtype', seen on 2 H200s). Afterwards the adapter is on again."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from report import adapter_switched_off

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 20, 30]])
    with torch.no_grad():
        base_logits = base(ids).logits
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    with torch.no_grad():
        for p in lora:
            p.normal_(0, 0.5)  # a trained adapter: it changes the output
        tuned_logits = model(ids).logits
        assert not torch.allclose(tuned_logits, base_logits, atol=1e-3)
        with adapter_switched_off(model):
            assert all(p.requires_grad for p in lora)
            assert torch.equal(model(ids).logits, base_logits)
        assert torch.equal(model(ids).logits, tuned_logits)
    assert all(p.requires_grad for p in lora)
