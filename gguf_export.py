"""Write a merged Llama-architecture model to GGUF (llama.cpp, Ollama), and check the file by reading it back.

    python inference.py --adapter DIR --export-gguf model.gguf --gguf-type f16     # or q8_0

Written with the `gguf` package from PyPI (llama.cpp's own writer), following llama.cpp's
convert_hf_to_gguf.py for the Llama architecture: the same tensor names (gguf.TensorNameMap), q and
k rows permuted back to the interleaved rotary layout, norms in float32, the other matrices in f16 or
q8_0. The tokenizer goes in as a SentencePiece-style ("llama") vocabulary with the tokenizer's own
special tokens, and the chat template is the training format (checked against chat_format.prompt_ids
at export: a template that does not reproduce it is not written).

check_gguf reads the file back: every tensor present with the expected shape and type, and each
one's values, dequantised, within the rounding of its type of the merged model's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from inference import InferenceError

# The Llama-2 chat format of chat_format.llama2_text, as a Jinja chat template (llama.cpp and Ollama
# render it). No leading BOS: llama.cpp adds it when it tokenizes the rendered text (add_bos_token),
# as prompt_ids' tokenizer call does. write_gguf checks that it gives prompt_ids' tokens before writing it.
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}{% set turns = messages[1:] %}"
    "{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}"
    "{% for m in turns %}"
    "{% if m['role'] == 'user' %}"
    "{% if not loop.first %}{{ bos_token }}{% endif %}"
    "{% if loop.first and system %}[INST] <<SYS>>\n{{ system }}\n<</SYS>>\n\n{{ m['content'] | trim }} [/INST]"
    "{% else %}[INST] {{ m['content'] | trim }} [/INST]{% endif %}"
    "{% else %} {{ m['content'] | trim }}{{ eos_token }}{% endif %}"
    "{% endfor %}"
)
SAMPLE_CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who painted the Mona Lisa?"},
                       {"role": "assistant", "content": "Leonardo da Vinci."}, {"role": "user", "content": "Where is it now?"}]
# Relative error each type allows, of the tensor's largest |value|: f16 rounds to 11 significant bits;
# q8_0 to half a step of its block's absmax / 127, plus the f16 rounding of the block scale.
TOLERANCE = {"f16": 2.0**-11, "q8_0": 1 / 254 + 2.0**-10}


def permute_rotary(weights: np.ndarray, n_head: int) -> np.ndarray:
    """HF stores q/k rows as two rotary halves per head; llama.cpp wants them interleaved (convert_hf_to_gguf)."""
    return weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def gguf_tensors(model) -> list[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array in llama.cpp's layout) for every weight of a Llama model."""
    import gguf

    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    out = []
    for hf_name, tensor in model.state_dict().items():
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise InferenceError(f"GGUF export: no llama.cpp name for the weight {hf_name!r}; only Llama-architecture models export")
        data = tensor.detach().float().cpu().numpy()
        if hf_name.endswith("q_proj.weight"):
            data = permute_rotary(data, config.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            data = permute_rotary(data, config.num_key_value_heads)
        out.append((name, data))
    return out


def storage_type(data: np.ndarray, gguf_type: str):
    """Norms (1-D) stay float32, as llama.cpp's converter keeps them; rows not a multiple of 32 cannot be q8_0."""
    import gguf

    if data.ndim == 1:
        return gguf.GGMLQuantizationType.F32
    if gguf_type == "q8_0" and data.shape[-1] % 32 == 0:
        return gguf.GGMLQuantizationType.Q8_0
    return gguf.GGMLQuantizationType.F16


def vocabulary(tokenizer, vocab_size: int) -> tuple[list[str], list[float], list[int]]:
    """Tokens in id order, scores (earlier merges first) and token types, padded to the embedding's rows."""
    import gguf

    specials = set(tokenizer.all_special_ids)
    tokens, scores, types = [], [], []
    for token_id in range(vocab_size):
        piece = tokenizer.convert_ids_to_tokens(token_id) if token_id < len(tokenizer) else f"[PAD{token_id}]"
        if token_id == tokenizer.unk_token_id:
            kind = gguf.TokenType.UNKNOWN
        elif token_id in specials:
            kind = gguf.TokenType.CONTROL
        elif piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:
            kind = gguf.TokenType.BYTE
        elif token_id >= len(tokenizer):
            kind = gguf.TokenType.UNUSED
        else:
            kind = gguf.TokenType.NORMAL
        tokens.append(piece)
        scores.append(-float(token_id))
        types.append(int(kind))
    return tokens, scores, types


def chat_template(tokenizer) -> str | None:
    """The tokenizer's own template, else the Llama-2 one, whichever gives chat_format.prompt_ids' tokens.

    A Hugging Face template that writes the BOS itself fails this check on purpose: llama.cpp adds one
    more, and the model would see two.
    """
    from chat_format import prompt_ids

    expected = prompt_ids(tokenizer, SAMPLE_CONVERSATION)
    for template in (getattr(tokenizer, "chat_template", None), LLAMA2_CHAT_TEMPLATE):
        if template and rendered_ids(tokenizer, template) == expected:
            return template
    return None


def rendered_ids(tokenizer, template: str) -> list[int] | None:
    try:
        text = tokenizer.apply_chat_template(SAMPLE_CONVERSATION, chat_template=template, tokenize=False,
                                             add_generation_prompt=False)
    except Exception:  # a template that fails to render is simply not the training format
        return None
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])  # the BOS added as llama.cpp adds it


def write_gguf(model, tokenizer, path: Path, gguf_type: str, name: str = "", say=print) -> Path:
    """Write `model` (a merged Llama) and its tokenizer to `path` (merging.export_gguf gives a staging file)."""
    import gguf

    config = model.config
    if config.model_type != "llama":
        raise InferenceError(f"GGUF export supports the Llama architecture; this model is {config.model_type!r}")
    writer = gguf.GGUFWriter(str(path), "llama")
    head_dim = config.hidden_size // config.num_attention_heads
    writer.add_name(name or "fine-tuned llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_rope_dimension_count(head_dim)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(getattr(config, "rope_theta", None) or config.rope_parameters["rope_theta"]))
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if gguf_type == "q8_0" else gguf.LlamaFileType.MOSTLY_F16)
    add_tokenizer(writer, tokenizer, config.vocab_size, say)
    for tensor_name, data in gguf_tensors(model):
        kind = storage_type(data, gguf_type)
        if kind == gguf.GGMLQuantizationType.Q8_0:
            writer.add_tensor(tensor_name, gguf.quants.quantize(data, kind), raw_dtype=kind)
        else:
            writer.add_tensor(tensor_name, data.astype(np.float32 if kind == gguf.GGMLQuantizationType.F32 else np.float16))
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return path


def gguf_bytes(model, gguf_type: str) -> int:
    """About the file's size: 2 bytes a weight in f16, 34 bytes per 32 weights in q8_0 (norms stay float32)."""
    per_weight = 2.0 if gguf_type == "f16" else 34 / 32
    return int(sum(p.numel() * (4 if p.dim() == 1 else per_weight) for p in model.state_dict().values()))


def add_tokenizer(writer, tokenizer, vocab_size: int, say) -> None:
    tokens, scores, types = vocabulary(tokenizer, vocab_size)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    for setter, token_id in ((writer.add_bos_token_id, tokenizer.bos_token_id), (writer.add_eos_token_id, tokenizer.eos_token_id),
                             (writer.add_unk_token_id, tokenizer.unk_token_id), (writer.add_pad_token_id, tokenizer.pad_token_id)):
        if token_id is not None:
            setter(token_id)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    template = chat_template(tokenizer)
    if template:
        writer.add_chat_template(template)
    else:
        say("GGUF export: no chat template reproduces the training format for this tokenizer; none written")


def check_gguf(path: Path, model, gguf_type: str, shown_as: Path | None = None) -> str:
    """Read the file back: every tensor present, shapes and types as written, values within the type's rounding.

    Raises InferenceError naming the first tensor that is wrong; returns a one-line summary.
    """
    import gguf

    name_of_file = shown_as or path  # the staging file is read; the user knows it by its final name
    reader = gguf.GGUFReader(str(path))
    found = {t.name: t for t in reader.tensors}
    expected = gguf_tensors(model)
    missing = [name for name, _ in expected if name not in found]
    if missing or len(found) != len(expected):
        raise InferenceError(f"{name_of_file}: tensors missing {missing[:5]} or extra ({len(found)} read, {len(expected)} expected)")
    worst = 0.0
    for name, data in expected:
        tensor = found[name]
        if tensor.tensor_type != storage_type(data, gguf_type):
            raise InferenceError(f"{name_of_file}: {name} is {tensor.tensor_type.name}, expected {storage_type(data, gguf_type).name}")
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(data.shape)
        scale = max(float(np.abs(data).max()), 1e-30)
        error = float(np.abs(values.astype(np.float32) - data).max()) / scale
        limit = 0.0 if tensor.tensor_type == gguf.GGMLQuantizationType.F32 else TOLERANCE[gguf_type]
        if error > limit:
            raise InferenceError(f"{name_of_file}: {name} differs from the merged model by {error:.2e} of its largest value (limit {limit:.2e})")
        worst = max(worst, error)
    return (f"GGUF check: {len(expected)} tensors present with the expected shapes and types; dequantised values "
            f"within {worst:.2e} of each tensor's largest |value| of the merged model ({gguf_type} allows {TOLERANCE[gguf_type]:.2e})")

