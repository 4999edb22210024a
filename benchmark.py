"""Training speed and memory of this project's own training path on a Llama-2-7B-shaped model (GPU).

    python benchmark.py                                  # every mode, 7B shape, JSON + table in ./bench
    python benchmark.py --modes seed,auto --steps 8      # a subset
    python benchmark.py --layers 2                       # a quick smoke test of the harness

There is no model download: random weights of the Llama-2-7B shape (32 layers, hidden 4096, MLP
11008, 32 heads, vocabulary 32000) are made on the GPU and saved once in safetensors, then every
mode loads them through model_setup.load_base_model (NF4, as main.py does), adds LoRA r=32 on q/v
and trains with training.build_trainer. Speed and memory do not depend on the weight values.

Rows are synthetic: token ids drawn at random, lengths drawn like guanaco-llama2-1k rows (a
log-normal with median 180 tokens, from a few dozen to several hundred, cut at max_seq_length),
the first 30% of each row masked as the prompt. Every mode sees the same rows in the same order.

Reported per mode: tokens/s counting real (non-padding) tokens only, seconds per optimizer step,
peak GPU memory (torch.cuda.max_memory_allocated), MFU, and the loss of each step.
MFU = tokens/s x FLOPs per token / the measured peak of a large bf16 matmul on this card, where
FLOPs per token = 4 x matmul parameters (forward 2, backward through the frozen weights 2; no
weight gradients) + 6 x layers x hidden x mean sequence length (causal attention, fwd + bwd).
Recomputation by checkpointing is not counted: it is overhead, not model FLOPs.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import time
from pathlib import Path

import torch

from config import Config, parse_config
from model_setup import add_lora, load_base_model, load_model_config, load_tokenizer, resolve_runtime
from performance import apply_plan, plan_performance
from training import build_trainer

SHAPE_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
ROWS_PER_STEP = 8  # the seed's 1 x 8

# Each mode is a set of config overrides on top of the defaults (the seed's recipe).
MODES: dict[str, dict] = {
    # The seed's exact settings: fp16 compute, batch 1 x accumulation 8, checkpointing, paged AdamW.
    "seed": dict(preset="seed", bnb_4bit_compute_dtype="float16", performance_mode="manual", use_liger_kernel=False,
                 per_device_train_batch_size=1, gradient_accumulation_steps=8, gradient_checkpointing=True,
                 optim="paged_adamw_32bit", fp32_frozen_weights=True),
    # The best plain transformers + peft + trl settings: bf16, batch 16, no checkpointing, fused AdamW, liger,
    # PEFT's float32 frozen weights, and the Trainer's default random order (with length grouping, liger
    # recompiles for every new padded length and ran at a third of this speed).
    "plain_best": dict(bnb_4bit_compute_dtype="bfloat16", performance_mode="manual", use_liger_kernel=True,
                       per_device_train_batch_size=16, gradient_accumulation_steps=1, gradient_checkpointing=False,
                       optim="adamw_torch_fused", fp32_frozen_weights=True, group_by_length=False),
    # The reference numerics for the loss check: the seed's layout (1 x 8, checkpointing) in bf16 with
    # PEFT's float32 frozen weights, unfused AdamW.
    "reference": dict(bnb_4bit_compute_dtype="bfloat16", performance_mode="manual", per_device_train_batch_size=1,
                      gradient_accumulation_steps=8, gradient_checkpointing=True, optim="adamw_torch",
                      fp32_frozen_weights=True),
    # This project's modes, all with the seed's 8 rows per optimizer step (the same math).
    "auto": dict(performance_mode="auto"),
    "speed": dict(performance_mode="speed"),
    "memory": dict(performance_mode="memory"),
}


def synthetic_rows(n_rows: int, max_length: int, vocab: int, seed: int = 0):
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)
    lengths = torch.exp(torch.randn(n_rows, generator=g) * 0.6 + math.log(180)).clamp(24, 900).long()
    input_ids, labels = [], []
    for length in lengths.tolist():
        ids = [1] + torch.randint(4, vocab, (length - 1,), generator=g).tolist()
        prompt = max(1, int(0.3 * length))
        input_ids.append(ids)
        labels.append([-100] * prompt + ids[prompt:])
    return Dataset.from_dict({"input_ids": input_ids, "labels": labels})


def build_random_model(folder: Path, layers: int) -> Path:
    """Random Llama-2-7B-shaped weights (bf16), made on the GPU, saved once in safetensors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tiny_model import build_tokenizer

    if (folder / "config.json").is_file():
        return folder
    config = LlamaConfig(**{**SHAPE_7B, "num_hidden_layers": layers}, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    # Only the special-token ids of the tokenizer matter here (rows are pre-tokenized).
    build_tokenizer(Path(__file__).parent / "data" / "sample.jsonl").save_pretrained(folder)
    del model
    torch.cuda.empty_cache()
    return folder


def measured_matmul_tflops() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 20 * 2 * 8192**3 / (start.elapsed_time(end) / 1e3) / 1e12


def flops_per_token(model_config, mean_length: float) -> float:
    h, L, v = model_config.hidden_size, model_config.num_hidden_layers, model_config.vocab_size
    kv = model_config.num_key_value_heads * (h // model_config.num_attention_heads)
    matmul = L * (2 * h * h + 2 * h * kv + 3 * h * model_config.intermediate_size) + h * v
    return 4 * matmul + 6 * L * h * mean_length


class StepTimer:
    """Wall time and real tokens at each optimizer step (CUDA synchronised)."""

    def __init__(self):
        from transformers import TrainerCallback

        timer = self

        class Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                torch.cuda.synchronize()
                timer.marks.append((time.perf_counter(), state.num_input_tokens_seen))

        self.marks: list[tuple[float, int]] = []
        self.callback = Callback()

    def rate(self, warmup: int) -> tuple[float, float]:
        (t0, n0), (t1, n1) = self.marks[warmup - 1], self.marks[-1]
        steps = len(self.marks) - warmup
        return (n1 - n0) / (t1 - t0), (t1 - t0) / steps


def run_mode(name: str, overrides: dict, model_dir: Path, rows, steps: int, warmup: int, limit_gib: float | None,
             out_dir: Path) -> dict:
    argv = ["--model_name", str(model_dir), "--output_dir", str(out_dir / name), "--max_steps", str(steps + warmup),
            "--report_to", "none", "--save_steps", "0", "--eval_fraction", "0", "--logging_steps", "1",
            "--warmup_ratio", "0", "--lr_scheduler_type", "constant"]
    cfg = parse_config(argv)
    cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if k != "preset"})
    runtime = resolve_runtime(cfg)
    total = torch.cuda.get_device_properties(0).total_memory
    if limit_gib:
        torch.cuda.set_per_process_memory_fraction(min(1.0, limit_gib * 2**30 / total))
    free = (limit_gib * 2**30 - torch.cuda.memory_allocated()) if limit_gib else None
    plan = plan_performance(cfg, runtime, load_model_config(cfg), free_bytes=free)
    cfg = apply_plan(cfg, plan)
    torch.cuda.reset_peak_memory_stats()
    tokenizer = load_tokenizer(cfg)
    model = add_lora(load_base_model(cfg, runtime), cfg)
    timer = StepTimer()
    trainer = build_trainer(model, tokenizer, rows, None, cfg, runtime, callbacks=[timer.callback])
    result = {"mode": name, "limit_gib": limit_gib, "layout": plan.reason,
              "micro_batch": cfg.per_device_train_batch_size, "accumulation": cfg.gradient_accumulation_steps,
              "checkpointing": cfg.gradient_checkpointing, "liger": cfg.use_liger_kernel, "optim": cfg.optim,
              "dequantized": cfg.dequantize_frozen,
              "compute_dtype": str(runtime.compute_dtype)}
    try:
        trainer.train()
        tokens_per_s, step_s = timer.rate(warmup)
        result.update(tokens_per_s=tokens_per_s, step_s=step_s, peak_gib=torch.cuda.max_memory_allocated() / 2**30,
                      losses=[e["loss"] for e in trainer.state.log_history if "loss" in e])
    except torch.OutOfMemoryError:
        result.update(error="out of memory", peak_gib=torch.cuda.max_memory_allocated() / 2**30)
    finally:
        del trainer, model
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(1.0)
    return result


def table(results: list[dict]) -> str:
    lines = ["| mode | memory limit | layout | tokens/s | s/step | peak GiB | MFU | vs seed | vs plain best |",
             "|---|---|---|---|---|---|---|---|---|"]
    base = {r["mode"]: r.get("tokens_per_s") for r in results if r.get("limit_gib") is None and "tokens_per_s" in r}
    for r in results:
        if "error" in r:
            lines.append(f"| {r['mode']} | {r['limit_gib'] or '-'} | {layout_text(r)} | {r['error']} | | {r['peak_gib']:.1f} | | | |")
            continue
        vs = lambda k: f"{r['tokens_per_s'] / base[k]:.2f}x" if base.get(k) else "-"
        lines.append(f"| {r['mode']} | {r['limit_gib'] or '-'} | {layout_text(r)} | {r['tokens_per_s']:,.0f} | "
                     f"{r['step_s']:.3f} | {r['peak_gib']:.1f} | {100 * r['mfu']:.1f}% | {vs('seed')} | {vs('plain_best')} |")
    return "\n".join(lines)


def layout_text(r: dict) -> str:
    dtype = r["compute_dtype"].replace("torch.", "")
    return (f"{dtype}, {r['micro_batch']}x{r['accumulation']}, ckpt {'on' if r['checkpointing'] else 'off'}, "
            f"{'liger' if r['liger'] else 'no liger'}, {r['optim']}{', dequantised' if r.get('dequantized') else ''}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of: " + ", ".join(MODES))
    parser.add_argument("--limits", default="8,16,80", help="GPU memory limits (GiB) for extra runs of the auto mode")
    parser.add_argument("--steps", type=int, default=8, help="measured optimizer steps per mode")
    parser.add_argument("--warmup", type=int, default=3, help="optimizer steps run before measuring")
    parser.add_argument("--layers", type=int, default=32, help="decoder layers (32 = Llama-2-7B; fewer for a smoke test)")
    parser.add_argument("--model_dir", type=Path, default=Path("/tmp/llama2-7b-shape-random"))
    parser.add_argument("--out", type=Path, default=Path("bench"))
    parser.add_argument("--warm_kernels", action="store_true", help="one unmeasured liger run first (Triton JIT)")
    parser.add_argument("--define", action="append", default=[], metavar="NAME=JSON",
                        help='an extra mode: config overrides as JSON, e.g. mem4=\'{"performance_mode": "manual", ...}\'')
    args = parser.parse_args(argv)
    for definition in args.define:
        name, overrides = definition.split("=", 1)
        MODES[name] = json.loads(overrides)
    if not torch.cuda.is_available():
        raise SystemExit("benchmark.py measures GPU training: no CUDA device here")
    args.out.mkdir(parents=True, exist_ok=True)
    model_dir = build_random_model(args.model_dir.with_name(f"{args.model_dir.name}-{args.layers}l"), args.layers)
    rows = synthetic_rows(ROWS_PER_STEP * 16 * (args.steps + args.warmup), 256, SHAPE_7B["vocab_size"])
    model_config = load_model_config(dataclasses.replace(Config(), model_name=str(model_dir)))
    mean_len = sum(min(len(r), 256) for r in rows["input_ids"]) / len(rows)
    peak_tflops = measured_matmul_tflops()
    if args.warm_kernels:  # Triton compiles liger's kernels for the first shapes it meets: not part of a speed
        run_mode("plain_best", MODES["plain_best"], model_dir, rows, 2, 6, None, args.out)
    runs = [(m, None) for m in args.modes.split(",")]
    runs += [("auto", float(g)) for g in args.limits.split(",") if g and "auto" in args.modes.split(",")]
    results = []
    for name, limit in runs:
        print(f"== {name} (limit {limit} GiB)", flush=True)
        result = run_mode(name, MODES[name], model_dir, rows, args.steps, args.warmup, limit, args.out)
        if "tokens_per_s" in result:
            result["mfu"] = result["tokens_per_s"] * flops_per_token(model_config, mean_len) / (peak_tflops * 1e12)
        print(json.dumps({k: v for k, v in result.items() if k != "losses"}), flush=True)
        results.append(result)
    summary = {"card": torch.cuda.get_device_name(0), "torch": torch.__version__, "peak_bf16_tflops": peak_tflops,
               "layers": args.layers, "mean_row_tokens": mean_len, "steps": args.steps, "warmup": args.warmup,
               "flops_per_token": flops_per_token(model_config, mean_len), "results": results}
    (args.out / "benchmark.json").write_text(json.dumps(summary, indent=2))
    check = loss_check(results)
    (args.out / "benchmark.json").write_text(json.dumps(summary, indent=2))
    text = table(results)
    (args.out / "table.md").write_text(text + "\n\n" + check + "\n")
    print(f"\n{summary['card']}, measured bf16 matmul peak {peak_tflops:.0f} TFLOP/s, mean row {mean_len:.0f} tokens\n{text}")
    print(check)


def loss_check(results: list[dict]) -> str:
    """Same data, same seed, same rows per step: each mode's per-step loss against the reference path's."""
    ref = next((r for r in results if r["mode"] == "reference" and "losses" in r), None)
    if ref is None:
        return "loss check: no reference run"
    lines = ["loss check (max |loss - reference| over the steps):"]
    for r in results:
        if "losses" in r and r["mode"] != "plain_best" and r is not ref:
            r["max_loss_diff"] = max(abs(a - b) for a, b in zip(r["losses"], ref["losses"]))
            lines.append(f"  {r['mode']} (limit {r['limit_gib']}): {r['max_loss_diff']:.4f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
