"""The peer: one Unsloth training case, in its own process, on benchmark.py's model, rows and LoRA start.

Run by `python benchmark.py` (its `unsloth_*` cases) with PYTHONPATH pointing at an environment that
holds Unsloth and the older transformers/trl it pins; not meant to be run by hand:

    PYTHONPATH=/tmp/usite python benchmark_unsloth.py --model DIR --rows rows.jsonl --init lora_init.safetensors \
        --batch 8 --accumulation 1 --checkpointing unsloth --out result.json

Unsloth runs with its documented defaults (its notebooks): LoRA dropout 0, its own gradient
checkpointing ("unsloth") unless told otherwise, AdamW 8-bit, padding-free batches (it turns them on
itself). What it shares with this project's cases: the random Llama-2-7B-shaped weights, NF4, LoRA
r=32 / alpha=16 on q_proj and v_proj with the same A matrices, the same rows in the same order, 8 rows
per optimizer step, and the same clock (benchmark.StepClock).
"""

import unsloth  # noqa: F401  (first: it patches transformers, trl and peft as they are imported)
from unsloth import FastLanguageModel  # isort: skip

import argparse
import json
import time
from pathlib import Path

import torch

from benchmark import MAX_LENGTH, StepClock, load_lora_init, measured_matmul_tflops, step_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--rows", required=True, type=Path)
    parser.add_argument("--init", required=True, type=Path)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--checkpointing", choices=["unsloth", "none"], default="unsloth")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()

    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    checkpointing = "unsloth" if args.checkpointing == "unsloth" else False
    start = time.perf_counter()
    model, tokenizer = FastLanguageModel.from_pretrained(args.model, max_seq_length=MAX_LENGTH, dtype=torch.bfloat16,
                                                         load_in_4bit=True, use_gradient_checkpointing=checkpointing)
    model = FastLanguageModel.get_peft_model(model, r=32, lora_alpha=16, lora_dropout=0, bias="none",
                                             target_modules=["q_proj", "v_proj"],
                                             use_gradient_checkpointing=checkpointing, random_state=3407)
    loaded = load_lora_init(model, args.init)
    rows = [json.loads(line) for line in args.rows.open()]
    clock = StepClock(step_tokens(rows, args.batch * args.accumulation), torch.cuda.synchronize)
    config = SFTConfig(output_dir=str(args.out.with_suffix(".run")), per_device_train_batch_size=args.batch,
                       gradient_accumulation_steps=args.accumulation, max_steps=args.steps + args.warmup,
                       learning_rate=2e-4, lr_scheduler_type="constant", warmup_steps=0, optim="adamw_8bit",
                       weight_decay=0.001, logging_steps=1, report_to="none", bf16=True, max_length=MAX_LENGTH,
                       save_strategy="no", seed=3407, train_sampling_strategy="sequential")
    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=Dataset.from_list(rows), args=config,
                         callbacks=[clock.callback()])
    load_s = time.perf_counter() - start
    trainer.train()
    result = {"load_s": load_s, "lora_a_loaded": loaded, "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
              "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
              "unsloth": unsloth.__version__, "layout": {"batch": args.batch, "accumulation": args.accumulation,
                                                         "checkpointing": args.checkpointing},
              "padding_free": bool(getattr(trainer, "padding_free", None) or getattr(trainer.args, "padding_free", False)),
              **clock.summary(args.warmup), "peak_tflops": measured_matmul_tflops(), "card": torch.cuda.get_device_name(0)}
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
