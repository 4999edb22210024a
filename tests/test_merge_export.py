"""merging.py and gguf_export.py: merges that say how exact they are, and GGUF files that read back right."""

import json

import numpy as np
import pytest
import torch

from chat_format import prompt_ids
from inference import InferenceError, main
from merging import merge_adapter, merged_model
from model_setup import load_tokenizer


@pytest.fixture(scope="module")
def adapter(tiny_run):
    return tiny_run[0] / "tiny-llama-finetune"


def test_dequantized_merge_is_the_trained_function_and_original_is_not(adapter, tmp_path):
    """float32 merges compared with the adapter model on the run's held-out rows."""
    dequantized = merge_adapter(adapter, tmp_path / "deq", "float32", merge_base="dequantized", check_rows=8)
    original = merge_adapter(adapter, tmp_path / "orig", "float32", merge_base="original", check_rows=8)
    deq = json.loads((dequantized / "merge_check.json").read_text())
    orig = json.loads((original / "merge_check.json").read_text())
    assert "held-out rows of" in deq["rows"] and deq["positions"] > 100
    assert deq["max_abs_logit_diff"] < 1e-3 and deq["top1_agreement"] == 1.0
    # the original weights differ from the trained (4-bit) ones by the quantisation error
    assert orig["max_abs_logit_diff"] > 100 * deq["max_abs_logit_diff"] and orig["mean_abs_logit_diff"] > 1e-3


def test_merge_command_line_prints_the_check(adapter, tmp_path, capsys):
    assert main(["--adapter", str(adapter), "--merge-to", str(tmp_path / "m"), "--merge-base", "dequantized",
                 "--check_rows", "2"]) == 0
    captured = capsys.readouterr()
    assert f"merged model written to {tmp_path / 'm'}" in captured.out
    assert "merge (dequantized weights, float16) vs the adapter model on 2 held-out rows" in captured.err
    assert not list(tmp_path.glob(".*merging"))


def test_merge_into_a_non_empty_folder_is_refused(adapter, tmp_path, capsys):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "notes.txt").write_text("keep")
    assert main(["--adapter", str(adapter), "--merge-to", str(tmp_path / "m")]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    assert (tmp_path / "m" / "notes.txt").read_text() == "keep"


# ---------------------------------------------------------------------------- GGUF

def permute(weights, n_head):  # llama.cpp's convert_hf_to_gguf.LlamaModel.permute, written out again
    return weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


@pytest.fixture(scope="module")
def merged(adapter):
    from inference import adapter_settings

    cfg = adapter_settings(adapter)
    return merged_model(adapter, cfg, "original", "float16"), load_tokenizer(cfg)


@pytest.mark.parametrize("gguf_type, tensor_type, tolerance", [("f16", "F16", 0.0), ("q8_0", "Q8_0", 1 / 254 + 2**-10)])
def test_gguf_export_reads_back_with_every_tensor(adapter, merged, tmp_path, capsys, gguf_type, tensor_type, tolerance):
    import gguf

    model, tokenizer = merged
    path = tmp_path / f"tiny.{gguf_type}.gguf"
    assert main(["--adapter", str(adapter), "--export-gguf", str(path), "--gguf-type", gguf_type]) == 0
    assert "GGUF check: 21 tensors present" in capsys.readouterr().err
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    config = model.config
    expected = {"token_embd.weight": model.model.embed_tokens.weight, "output_norm.weight": model.model.norm.weight,
                "output.weight": model.lm_head.weight}
    for i, layer in enumerate(model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        expected.update({
            f"blk.{i}.attn_norm.weight": layer.input_layernorm.weight, f"blk.{i}.ffn_norm.weight": layer.post_attention_layernorm.weight,
            f"blk.{i}.attn_q.weight": permute(attn.q_proj.weight, config.num_attention_heads),
            f"blk.{i}.attn_k.weight": permute(attn.k_proj.weight, config.num_key_value_heads),
            f"blk.{i}.attn_v.weight": attn.v_proj.weight, f"blk.{i}.attn_output.weight": attn.o_proj.weight,
            f"blk.{i}.ffn_gate.weight": mlp.gate_proj.weight, f"blk.{i}.ffn_up.weight": mlp.up_proj.weight,
            f"blk.{i}.ffn_down.weight": mlp.down_proj.weight})
    assert set(tensors) == set(expected)
    for name, weight in expected.items():
        weight = weight.detach().float().numpy()
        tensor = tensors[name]
        assert tensor.tensor_type.name == ("F32" if weight.ndim == 1 else tensor_type), name
        assert list(tensor.shape) == list(reversed(weight.shape)), name  # GGUF lists the fastest dimension first
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(weight.shape)
        assert np.abs(values - weight).max() <= tolerance * np.abs(weight).max(), name
    # the merged weights are really in there: q_proj is not the base's
    fields = reader.fields
    assert int(fields["llama.block_count"].parts[-1][0]) == config.num_hidden_layers
    assert int(fields["tokenizer.ggml.bos_token_id"].parts[-1][0]) == tokenizer.bos_token_id
    assert int(fields["tokenizer.ggml.eos_token_id"].parts[-1][0]) == tokenizer.eos_token_id
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens.data) == config.vocab_size
    assert bytes(tokens.parts[tokens.data[5]]).decode() == tokenizer.convert_ids_to_tokens(5)


def test_gguf_chat_template_renders_the_training_prompt(adapter, merged, tmp_path):
    """The template inside the file gives chat_format.prompt_ids' tokens, system prompt and history included."""
    import gguf

    _, tokenizer = merged
    path = tmp_path / "t.gguf"
    assert main(["--adapter", str(adapter), "--export-gguf", str(path)]) == 0
    field = gguf.GGUFReader(str(path)).fields["tokenizer.chat_template"]
    template = bytes(field.parts[field.data[0]]).decode()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who painted the Mona Lisa?"},
                {"role": "assistant", "content": "Leonardo da Vinci."}, {"role": "user", "content": " Where is it now? "}]
    for conversation in (messages, messages[1:2], messages[1:]):
        text = tokenizer.apply_chat_template(conversation, chat_template=template, tokenize=False)
        # llama.cpp tokenizes the rendered text adding one BOS (add_bos_token), as this call does
        assert tokenizer(text, add_special_tokens=True)["input_ids"] == prompt_ids(tokenizer, conversation)


def test_gguf_check_catches_a_wrong_tensor(merged, tmp_path):
    from gguf_export import check_gguf, write_gguf

    model, tokenizer = merged
    path = write_gguf(model, tokenizer, tmp_path / "m.gguf", "q8_0", say=lambda _: None)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] += 0.5
    try:
        with pytest.raises(InferenceError, match=r"blk\.1\.ffn_up\.weight differs"):
            check_gguf(path, model, "q8_0")
    finally:
        with torch.no_grad():
            model.model.layers[1].mlp.up_proj.weight[3, 5] -= 0.5


def test_gguf_export_never_overwrites(adapter, tmp_path, capsys):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"precious")
    assert main(["--adapter", str(adapter), "--export-gguf", str(path)]) == 2
    assert "already exists; choose a new file name" in capsys.readouterr().err
    assert path.read_bytes() == b"precious"
