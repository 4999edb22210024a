"""Generate with a fine-tuned adapter, or merge it into a full model.

    python inference.py --adapter results/Llama-2-7b-chat-finetune "What is a large language model?"
    python inference.py --adapter results-tiny/tiny-llama-finetune --do_sample --temperature 0.7 "Hi"
    python inference.py --adapter DIR --merge-to merged/       # full-precision model for plain transformers

The prompt is wrapped exactly as training saw it (data_preparation.format_prompt). The adapter
folder holds the config it was trained with (run_config.json), which names its base model.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from config import Config, ConfigError, validate_config
from data_preparation import format_prompt
from model_setup import (DTYPES, SetupError, load_base_model, load_tokenizer, quiet_library_noise, resolve_model_path,
                         resolve_runtime)


class InferenceError(RuntimeError):
    """The adapter or the request cannot be used; the message says what to do."""


@dataclass
class GenerationSettings:
    max_new_tokens: int = 200
    do_sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.9
    system_prompt: str = ""

    @classmethod
    def from_config(cls, cfg: Config) -> "GenerationSettings":
        return cls(cfg.max_new_tokens, cfg.do_sample, cfg.temperature, cfg.top_p, cfg.system_prompt)

    def generate_kwargs(self, tokenizer) -> dict:
        kwargs = dict(max_new_tokens=self.max_new_tokens, do_sample=self.do_sample, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id)
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p)
        else:  # the checkpoint's generation_config may carry sampling settings; greedy ignores them
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return kwargs


def make_generator(model, tokenizer):
    """A text-generation pipeline, as the seed uses."""
    from transformers import pipeline

    model.eval()
    return pipeline("text-generation", model=model, tokenizer=tokenizer)


def generate(generator, question: str, settings: GenerationSettings) -> str:
    """The answer to one question, in the Llama-2 format training used (one BOS, added by the tokenizer)."""
    prompt = format_prompt(question, settings.system_prompt)
    with torch.no_grad():
        out = generator(prompt, return_full_text=False, add_special_tokens=True,
                        **settings.generate_kwargs(generator.tokenizer))
    return out[0]["generated_text"].strip()


# ---------------------------------------------------------------------------- loading an adapter

def read_adapter_config(adapter: Path) -> Config:
    """The Config the adapter was trained with; fails clearly on a missing or broken folder."""
    if not adapter.is_dir():
        raise InferenceError(f"adapter folder {str(adapter)!r} does not exist; pass the folder that training printed ('adapter saved to ...')")
    missing = [name for name in ("adapter_config.json", "adapter_model.safetensors", "run_config.json") if not (adapter / name).is_file()]
    if missing:
        raise InferenceError(f"{adapter} is not a complete adapter folder: missing {', '.join(missing)}; re-run training or pick another folder")
    try:
        stored = json.loads((adapter / "run_config.json").read_text(encoding="utf-8"))
        json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InferenceError(f"{adapter} is corrupt: a config file does not parse ({exc}); re-run training") from None
    known = {k: v for k, v in stored.items() if k in Config.__dataclass_fields__}
    cfg = Config(**known)
    problems = validate_config(cfg)
    if problems:
        raise InferenceError(f"{adapter}/run_config.json holds invalid settings: {'; '.join(problems)}")
    return cfg


def check_adapter_base(adapter: Path, base_model_name: str) -> None:
    """Refuse an adapter trained on another base: its shapes may even fit, its weights never do."""
    trained_on = json.loads((adapter / "run_config.json").read_text(encoding="utf-8"))["model_name"]
    if trained_on != base_model_name:
        raise InferenceError(
            f"the adapter in {adapter} was trained on {trained_on!r}, not on {base_model_name!r}; "
            f"use --base {trained_on} (or the adapter trained for your base)"
        )


def load_for_inference(adapter: Path, base: str | None = None, quantized: bool | None = None):
    """(model, tokenizer, cfg): the base (4-bit unless told) with the adapter on top."""
    from peft import PeftModel

    cfg = read_adapter_config(adapter)
    if base:
        check_adapter_base(adapter, base)
    cfg.allow_cpu = True  # inference of a small model on a CPU is fine; resolve_runtime still picks the GPU if present
    runtime = resolve_runtime(cfg)
    tokenizer = load_tokenizer(cfg)
    model = load_base_model(cfg, runtime, quantized=quantized)
    try:
        model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
    except Exception as exc:  # shape mismatch, bad safetensors, ...
        raise InferenceError(f"could not load the adapter in {adapter} onto {cfg.model_name!r}: {exc}") from exc
    return model, tokenizer, cfg


def merge_adapter(adapter: Path, target: Path, dtype_name: str = "float16", base: str | None = None) -> Path:
    """Merge the adapter into a non-quantised reload of the base and save a plain model.

    Merging into 4-bit weights would round the sum back to NF4 and lose most of the update.
    """
    from transformers import AutoModelForCausalLM

    cfg = read_adapter_config(adapter)
    if base:
        check_adapter_base(adapter, base)
    if target.exists() and any(target.iterdir()):
        raise InferenceError(f"{target} already exists and is not empty; choose a new folder for the merged model")
    from peft import PeftModel

    base_model = AutoModelForCausalLM.from_pretrained(
        resolve_model_path(cfg.model_name), dtype=DTYPES[dtype_name], use_safetensors=True,
        trust_remote_code=cfg.trust_remote_code,
    )
    merged = PeftModel.from_pretrained(base_model, str(adapter)).merge_and_unload()
    merged.save_pretrained(target, safe_serialization=True)
    load_tokenizer(cfg).save_pretrained(target)
    return target


# ---------------------------------------------------------------------------- command line

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt", nargs="?", help="the question to answer (wrapped in [INST] ... [/INST] for you)")
    parser.add_argument("--adapter", required=True, type=Path, help="adapter folder written by main.py")
    parser.add_argument("--base", help="base model to load under the adapter (default: the one it was trained on)")
    parser.add_argument("--max_new_tokens", type=int, default=200)
    parser.add_argument("--do_sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top_p", type=float, default=0.9)
    parser.add_argument("--system_prompt", default="")
    parser.add_argument("--no_4bit", action="store_true", help="load the base unquantised (more memory, exact weights)")
    parser.add_argument("--merge-to", dest="merge_to", type=Path, help="write base + adapter merged into this folder and exit")
    parser.add_argument("--merge-dtype", dest="merge_dtype", default="float16", choices=sorted(DTYPES))
    args = parser.parse_args(argv)
    if args.merge_to is None and not args.prompt:
        parser.error("give a prompt to answer, or --merge-to DIR")
    if args.max_new_tokens < 1:
        parser.error("--max_new_tokens must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    quiet_library_noise()  # before bitsandbytes is first imported (by the model load below)
    args = parse_args(argv)
    try:
        if args.merge_to is not None:
            path = merge_adapter(args.adapter, args.merge_to, args.merge_dtype, args.base)
            print(f"merged model written to {path} (load it with AutoModelForCausalLM.from_pretrained)")
            return 0
        model, tokenizer, _ = load_for_inference(args.adapter, args.base, quantized=False if args.no_4bit else None)
        settings = GenerationSettings(args.max_new_tokens, args.do_sample, args.temperature, args.top_p, args.system_prompt)
        print(generate(make_generator(model, tokenizer), args.prompt, settings))
        return 0
    except (InferenceError, SetupError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
