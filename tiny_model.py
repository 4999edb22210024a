"""The bundled tiny Llama: built offline, deterministically, and cached in a folder.

There is no model download here. A BPE tokenizer is trained on the bundled data
(`data/sample.jsonl`); a 2-layer Llama gets a seeded random init and then a short, seeded
"pre-training" on the plain text (question, then answer, then </s>; no [INST] markers) of the
rows that the tiny preset trains on -- never its held-out rows. Like Llama-2 itself, the base then
knows some language and that documents end with </s>, but not the chat format; the LoRA
fine-tune has to teach that. (A purely random base cannot learn answers through LoRA on q/v in a CPU minute.)

model_setup.py loads the saved folder through exactly the same `from_pretrained` +
`BitsAndBytesConfig` path as the real Llama-2-7B, so the tiny preset really trains NF4 weights.

    python tiny_model.py            # build (or find) it and print the folder
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from staging import publish_permissions

PROJECT_DIR = Path(__file__).resolve().parent
CACHE_DIR = PROJECT_DIR / ".cache"
BUILDER_VERSION = 4  # bump when the recipe below changes, so old caches are not reused

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0..3, the Llama-2 order plus a real pad
TINY_SHAPE = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=1024,
)
VOCAB_SIZE = 1024
PRETRAIN_STEPS, PRETRAIN_BATCH, PRETRAIN_LR = 300, 16, 3e-3


def _corpus_lines(data_file: Path) -> list[str]:
    # The special tokens are left out of the BPE corpus: they are added whole, never learnt in pieces.
    lines = []
    with open(data_file, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                text = json.loads(line)["text"]
                for token in ("<s>", "</s>"):
                    text = text.replace(token, " ")
                lines.append(text)
    return lines


def build_tokenizer(data_file: Path):
    """A Llama-like tokenizer (metaspace BPE, BOS added) trained on the bundled data."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    # Metaspace like Llama/SentencePiece: words carry a leading '▁', so a prompt ending in
    # "[/INST]" tokenizes as a prefix of the prompt + answer (tests check this property).
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    # Every printable ASCII character is in the alphabet, so no plain-English text becomes <unk>.
    ascii_alphabet = [chr(c) for c in range(33, 127)]
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, limit_alphabet=400,
                                  initial_alphabet=ascii_alphabet, show_progress=False)
    backend.train_from_iterator(_corpus_lines(data_file), trainer=trainer)
    bos_id = backend.token_to_id("<s>")
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="right",
        model_max_length=TINY_SHAPE["max_position_embeddings"],
    )


def build_model(tokenizer, seed: int = 0):
    """A seeded random-init Llama, float32, the shape in TINY_SHAPE."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **TINY_SHAPE,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.do_sample = False
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def pretraining_texts(data_file: Path) -> list[str]:
    """Plain 'question answer' text of the rows the tiny preset trains on (its held-out rows excluded)."""
    from config import Config
    from data_preparation import clean_dataset, load_raw_dataset, split_train_eval

    defaults = Config()
    rows, _ = clean_dataset(load_raw_dataset(str(data_file)))
    train, _ = split_train_eval(rows, defaults.eval_fraction, defaults.seed)
    texts = []
    for text in train["text"]:
        for token in ("<s>", "</s>", "[INST]", "[/INST]"):
            text = text.replace(token, " ")
        texts.append(" ".join(text.split()))
    return texts


def pretrain(model, tokenizer, texts: list[str], seed: int = 0) -> list[float]:
    """A few hundred full-parameter causal-LM steps on CPU; returns the loss per step."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    encoded = [torch.tensor(tokenizer(t)["input_ids"] + [tokenizer.eos_token_id]) for t in texts]
    optimizer = torch.optim.AdamW(model.parameters(), lr=PRETRAIN_LR, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / PRETRAIN_STEPS)
    model.train()
    losses = []
    for _ in range(PRETRAIN_STEPS):
        pick = torch.randint(len(encoded), (PRETRAIN_BATCH,), generator=generator).tolist()
        batch = torch.nn.utils.rnn.pad_sequence([encoded[i] for i in pick], batch_first=True,
                                                padding_value=tokenizer.pad_token_id)
        labels = batch.masked_fill(batch == tokenizer.pad_token_id, -100)
        loss = model(input_ids=batch, attention_mask=(labels != -100).long(), labels=labels).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


def _fingerprint(data_file: Path) -> str:
    digest = hashlib.sha256(data_file.read_bytes())
    digest.update(json.dumps([BUILDER_VERSION, TINY_SHAPE, VOCAB_SIZE, PRETRAIN_STEPS, PRETRAIN_BATCH, PRETRAIN_LR]).encode())
    return digest.hexdigest()[:10]


def ensure_tiny_model(data_file: Path | None = None, cache_dir: Path | None = None) -> Path:
    """Return the folder of the tiny model, building it first if this data has none yet."""
    data_file = Path(data_file or PROJECT_DIR / "data" / "sample.jsonl")
    cache_dir = Path(cache_dir or os.environ.get("TINY_LLAMA_CACHE", CACHE_DIR))
    if not data_file.is_file():
        raise FileNotFoundError(f"the tiny model is trained from {data_file}, which is missing; restore it from git")
    target = cache_dir / f"tiny-llama-{_fingerprint(data_file)}"
    if (target / "config.json").is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Build in a temporary folder and rename: a crash never leaves a half-built model behind.
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=cache_dir))
    try:
        tokenizer = build_tokenizer(data_file)
        model = build_model(tokenizer)
        pretrain(model, tokenizer, pretraining_texts(data_file))
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        publish_permissions(staging)  # mkdtemp's folder is the owner's only; a shared cache is read by others
        os.replace(staging, target)
    except OSError:
        if not (target / "config.json").is_file():  # lost a race with another builder? then use theirs
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


if __name__ == "__main__":
    print(ensure_tiny_model())
