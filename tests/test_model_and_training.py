"""model_setup.py + training.py on the tiny model: real NF4 layers, exact LoRA counts, real learning."""

import pytest
import torch

import data_preparation as dp
from model_setup import (SetupError, add_lora, count_parameters, load_base_model, load_tokenizer, resolve_runtime)
from training import build_trainer, save_adapter

TEXTS = [
    "[INST] What is the capital of France? [/INST] The capital of France is Paris. </s>",
    "[INST] How many legs does a spider have? [/INST] A spider has eight legs. </s>",
    "[INST] Who wrote Hamlet? [/INST] William Shakespeare wrote Hamlet. </s>",
    "[INST] What is water made of? [/INST] Water is made of hydrogen and oxygen. </s>",
]


def rows(tokenizer, texts=TEXTS):
    from datasets import Dataset

    return dp.tokenize_dataset(Dataset.from_dict({"text": texts}), tokenizer, 256, True)[0]


def setup(cfg):
    runtime = resolve_runtime(cfg)
    tokenizer = load_tokenizer(cfg)
    model = add_lora(load_base_model(cfg, runtime), cfg)
    return runtime, tokenizer, model


def snapshot(model, lora: bool):
    return {n: p.detach().clone() for n, p in model.named_parameters() if ("lora_" in n) == lora}


def mean_loss(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**{k: v.to(model.device) for k, v in batch.items()}).loss.item()


def batch_of(tokenizer, data):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    return DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)([data[i] for i in range(len(data))])


def test_quantised_layers_are_bitsandbytes_nf4_uint8(make_config):
    import bitsandbytes as bnb

    cfg = make_config()
    model = load_base_model(cfg, resolve_runtime(cfg))
    layers = [m for n, m in model.named_modules() if n.endswith(("q_proj", "v_proj", "k_proj", "o_proj", "up_proj"))]
    assert layers and all(isinstance(m, bnb.nn.Linear4bit) for m in layers)
    for layer in layers:
        assert layer.weight.dtype == torch.uint8 and layer.weight.quant_state.quant_type == "nf4"
        assert layer.support_avx512bf16_for_cpu is False  # the CPU-trap guard is on
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit)


def test_trainable_parameters_are_exactly_lora_q_and_v(make_config):
    cfg = make_config()
    _, _, model = setup(cfg)
    c = model.config
    kv_dim = c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    per_layer = cfg.lora_r * (c.hidden_size + c.hidden_size) + cfg.lora_r * (c.hidden_size + kv_dim)
    trainable, total = count_parameters(model)
    assert trainable == c.num_hidden_layers * per_layer
    assert {n.split(".")[-4] for n, p in model.named_parameters() if p.requires_grad} == {"q_proj", "v_proj"}
    assert total > 10 * trainable


def train(cfg, tokenizer, model, runtime, data):
    trainer = build_trainer(model, tokenizer, data, None, cfg, runtime)
    trainer.train()
    return trainer


def test_training_lowers_loss_changes_lora_and_leaves_base_untouched(make_config):
    cfg = make_config("--max_steps", "12", "--gradient_accumulation_steps", "1", "--lora_dropout", "0")
    runtime, tokenizer, model = setup(cfg)
    data = rows(tokenizer)
    batch = batch_of(tokenizer, data)
    base_before, lora_before = snapshot(model, lora=False), snapshot(model, lora=True)
    loss_before = mean_loss(model, batch)
    train(cfg, tokenizer, model, runtime, data)
    assert mean_loss(model, batch) < 0.9 * loss_before
    lora_after = snapshot(model, lora=True)
    assert all(not torch.equal(lora_before[n], lora_after[n]) for n in lora_before if "lora_B" in n)
    base_after = snapshot(model, lora=False)
    assert base_before.keys() == base_after.keys()
    assert all(torch.equal(base_before[n], base_after[n]) for n in base_before), "a frozen base weight changed"


def test_training_still_updates_after_eval_and_generation(make_config):
    """The bitsandbytes CPU trap: an eval-mode no-grad forward used to freeze 4-bit LoRA training."""
    cfg = make_config("--max_steps", "4", "--gradient_accumulation_steps", "1", "--lora_dropout", "0")
    runtime, tokenizer, model = setup(cfg)
    data = rows(tokenizer)
    mean_loss(model, batch_of(tokenizer, data))  # an eval forward under no_grad
    prompt = tokenizer(dp.format_prompt("Who wrote Hamlet?"), return_tensors="pt").to(model.device)
    with torch.no_grad():
        model.generate(**prompt, max_new_tokens=3, do_sample=False)
    model.train()
    before = snapshot(model, lora=True)
    train(cfg, tokenizer, model, runtime, data)
    changed = [n for n in before if "lora_B" in n and not torch.equal(before[n], snapshot(model, lora=True)[n])]
    assert len(changed) == len([n for n in before if "lora_B" in n]), "some LoRA weights stopped training"


def test_saved_adapter_reloads_to_identical_logits(make_config, tmp_path):
    from peft import PeftModel

    cfg = make_config("--max_steps", "3", "--gradient_accumulation_steps", "1")
    runtime, tokenizer, model = setup(cfg)
    data = rows(tokenizer)
    train(cfg, tokenizer, model, runtime, data)
    path = save_adapter(model, tokenizer, cfg)
    inputs = {"input_ids": torch.tensor([data[0]["input_ids"]], device=model.device)}
    model.eval()
    with torch.no_grad():
        expected = model(**inputs).logits
        reloaded = PeftModel.from_pretrained(load_base_model(cfg, runtime), str(path)).eval()
        assert torch.equal(reloaded(**inputs).logits, expected)
    assert {"adapter_config.json", "adapter_model.safetensors", "run_config.json", "tokenizer.json"} <= {p.name for p in path.iterdir()}


def test_merged_model_equals_base_plus_adapter(make_config, tmp_path):
    from transformers import AutoModelForCausalLM

    from merging import merge_adapter
    from model_setup import resolve_model_path

    cfg = make_config("--max_steps", "3", "--gradient_accumulation_steps", "1")
    runtime, tokenizer, model = setup(cfg)
    train(cfg, tokenizer, model, runtime, rows(tokenizer))
    adapter = save_adapter(model, tokenizer, cfg)
    merged_dir = merge_adapter(adapter, tmp_path / "merged", "float32")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path(cfg.model_name))
    scale = cfg.lora_alpha / cfg.lora_r
    for i, layer in enumerate(base.model.layers):
        for name in ("q_proj", "v_proj"):
            lora = getattr(model.base_model.model.model.layers[i].self_attn, name)
            delta = scale * lora.lora_B["default"].weight.float() @ lora.lora_A["default"].weight.float()
            expected = getattr(layer.self_attn, name).weight + delta
            assert torch.allclose(getattr(merged.model.layers[i].self_attn, name).weight, expected, atol=1e-6)
        assert torch.equal(merged.model.layers[i].mlp.up_proj.weight, layer.mlp.up_proj.weight)
    assert any(not torch.equal(merged.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight) for _ in [0])


def test_no_gpu_stops_the_real_model_with_advice():
    from config import parse_config

    with pytest.raises(SetupError, match=r"no CUDA GPU.*--preset tiny"):
        resolve_runtime(parse_config([]), cuda_available=False)


@pytest.mark.parametrize("bf16, expected", [(True, torch.bfloat16), (False, torch.float16)])
def test_auto_dtype_on_gpu_prefers_bf16(bf16, expected, monkeypatch):
    from config import parse_config

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setenv("LOCAL_RANK", "3")
    runtime = resolve_runtime(parse_config([]), cuda_available=True, bf16_supported=bf16)
    assert runtime.compute_dtype == expected and runtime.device == "cuda:3"
    assert ("bfloat16" if bf16 else "no bfloat16") in runtime.reason


def test_auto_dtype_on_cpu_is_float32(make_config):
    runtime = resolve_runtime(make_config(), cuda_available=False)
    assert runtime.compute_dtype == torch.float32 and runtime.device == "cpu"


def test_lora_target_that_does_not_exist(make_config):
    cfg = make_config("--lora_target_modules", "q_proj", "query_key_value")
    runtime = resolve_runtime(cfg)
    with pytest.raises(SetupError, match=r"\['query_key_value'\] match no linear layer.*q_proj"):
        add_lora(load_base_model(cfg, runtime), cfg)


def test_missing_tensorboard_warns_once_and_training_goes_on(make_config, monkeypatch):
    import importlib.util

    import training

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real_find_spec(name, *a))
    with pytest.warns(UserWarning, match="tensorboard is not installed"):
        assert training.report_to(make_config("--report_to", "tensorboard")) == ["none"]


def test_an_adapter_without_weights_is_never_written(make_config):
    """An adapter file with no tensor loads, silently, as the untrained base model (what a first FSDP
    run on 2 H200s wrote: its gathered state held no LoRA weight). The save fails instead, and no
    adapter folder appears."""
    from training import SaveFailed, adapter_dir

    cfg = make_config()
    _, tokenizer, model = setup(cfg)
    with pytest.raises(SaveFailed, match="came out empty.*not written"):
        save_adapter(model, tokenizer, cfg, state_dict={})
    assert not adapter_dir(cfg).exists()
