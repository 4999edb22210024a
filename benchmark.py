"""Training speed and memory on a Llama-2-7B-shaped model: every case in its own fresh process (GPU).

    python benchmark.py                                  # every case, one after another on GPU 0
    python benchmark.py --gpus 0,1,2,3                   # cases spread over 4 GPUs, each alone on its GPU
    python benchmark.py --cases seed,speed,unsloth_8x1   # a subset (names: python benchmark.py --list)
    python benchmark.py --smoke                          # the harness itself: tiny model, CPU, 2 cases

Why a process per case: a process keeps what one case did -- cuDNN attention plans for the lengths it
met, Triton/compile caches, liger's module-wide patches of the Llama classes, the allocator's pools --
and the next case would measure with them. A user's run starts cold, so every figure here does too.

There is no model download: random weights of the Llama-2-7B shape (32 layers, hidden 4096, MLP
11008, 32 heads, vocabulary 32000) are made on the GPU and saved once in safetensors; every project
case loads them through model_setup.load_base_model (NF4, as main.py does), adds LoRA r=32 on q/v and
trains with training.build_trainer. Speed and memory do not depend on the weight values.

Every case trains on the same rows in the same order from the same LoRA start:
- rows: random token ids, lengths drawn like guanaco-llama2-1k rows (log-normal, median 180 tokens,
  cut at 256), the first 30% of each masked as the prompt, put once into a length-grouped order (50
  steps' rows shuffled, then sorted by length within, as the Trainer's length-grouped sampler does)
  and read sequentially by every case;
- LoRA: the A matrices are drawn once (PEFT's init: Kaiming-uniform) and loaded into every case; B is 0.

Reported per case: tokens/s counting real (non-padding) tokens, the time of every optimizer step
(median and slowest after warm-up: the slowest may be at most 1.5x the median), peak GPU memory
(torch.cuda.max_memory_allocated), MFU and the loss of each step (checked against `reference`).
MFU = tokens/s x FLOPs per token / the measured peak of a large bf16 matmul on the card, with FLOPs
per token = 4 x matmul parameters (forward 2, backward through the frozen weights 2; no weight
gradients) + 6 x layers x hidden x mean sequence length (causal attention, forward and backward).
Recomputation by checkpointing is overhead, not model FLOPs.

The `unsloth_*` cases run benchmark_unsloth.py, Unsloth's own path, in a Python environment of
its own (--unsloth_site; Unsloth pins older transformers/trl). The `e2e*` cases time `python main.py`
itself on the 7B shape with a real Llama-2 tokenizer (--tokenizer) and 1,000 guanaco-shaped rows.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parent
SHAPE_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
ROWS_PER_STEP = 8  # the seed's 1 x 8
MAX_LENGTH = 256
STALL_FACTOR = 1.5  # after warm-up, the slowest step may take at most this times the median


@dataclass
class Case:
    kind: str  # "project" (this pipeline), "unsloth" (the peer) or "e2e" (python main.py)
    flags: list[str] = field(default_factory=list)  # config flags (project, e2e) or benchmark_unsloth.py flags
    steps: int = 30  # measured optimizer steps
    warmup: int = 5  # optimizer steps run before measuring
    what: str = ""


# What each project case sets; everything else is the project's default (auto). Flags a case sets
# are what run (performance.py never overrides a set field).
PLAIN = ["--bnb_4bit_compute_dtype", "bfloat16", "--fp32_frozen_weights", "True", "--dequantize_frozen", "False",
         "--pad_to_multiple_of", "1", "--cudnn_attention", "True", "--torch_compile", "False", "--padding_free", "False"]
CASES: dict[str, Case] = {
    "seed": Case("project", ["--preset", "seed"], steps=8, warmup=2,
                 what="the seed's settings: fp16, 1 x 8, checkpointing, paged AdamW, float32 frozen weights"),
    "reference": Case("project", ["--bnb_4bit_compute_dtype", "bfloat16", "--per_device_train_batch_size", "1",
                                  "--gradient_accumulation_steps", "8", "--gradient_checkpointing", "True",
                                  "--optim", "adamw_torch", "--fp32_frozen_weights", "True", "--dequantize_frozen", "False",
                                  "--pad_to_multiple_of", "1", "--torch_compile", "False"], steps=8, warmup=2,
                      what="numerics reference for the loss check: the seed's 1 x 8 layout in bf16, PEFT's float32 frozen weights"),
    "plain_best": Case("project", [*PLAIN, "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "1",
                                   "--gradient_checkpointing", "False", "--optim", "adamw_torch_fused"],
                       what="best plain transformers + peft + trl: bf16, 8 x 1, no checkpointing, fused AdamW, library defaults otherwise"),
    "plain_liger": Case("project", [*PLAIN, "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "1",
                                    "--gradient_checkpointing", "False", "--optim", "adamw_torch_fused", "--use_liger_kernel", "True"],
                        what="plain_best + liger kernels"),
    "auto": Case("project", [], what="the default: every speed/memory field left to performance.py"),
    # Compiled cases compile at their first step and once more at the first batch that needs padding
    # (step 11 in this row order: attention with and without a mask are two graphs); warm-up covers both.
    "speed": Case("project", ["--performance_mode", "speed"], warmup=12,
                  what="all rows in one pass, no checkpointing, dequantised weights, compiled layers"),
    "memory": Case("project", ["--performance_mode", "memory"], what="all rows in one pass, checkpointing, 4-bit weights"),
    "speed_cudnn": Case("project", ["--performance_mode", "speed", "--torch_compile", "False", "--cudnn_attention", "True"],
                        what="speed with cuDNN attention (the stall of issue 8)"),
    "speed_nobucket": Case("project", ["--performance_mode", "speed", "--torch_compile", "False", "--pad_to_multiple_of", "1"],
                           what="speed without bucketed padding"),
    "speed_eager": Case("project", ["--performance_mode", "speed", "--torch_compile", "False"],
                        what="speed without torch.compile"),
    "speed_compile": Case("project", ["--performance_mode", "speed", "--torch_compile", "True"], warmup=12,
                          what="speed + torch.compile of the decoder layers"),
    "speed_padfree": Case("project", ["--performance_mode", "speed", "--torch_compile", "False", "--padding_free", "True"],
                          what="speed + padding-free batches"),
    "speed_padfree_compile": Case("project", ["--performance_mode", "speed", "--padding_free", "True",
                                              "--torch_compile", "True"], warmup=12,
                                  what="speed + padding-free + compile"),
    "memory_compile": Case("project", ["--performance_mode", "memory", "--torch_compile", "True"], warmup=8,
                           what="memory + torch.compile"),
    "unsloth_8x1_ckpt": Case("unsloth", ["--batch", "8", "--accumulation", "1", "--checkpointing", "unsloth"],
                             what="Unsloth, 8 x 1, its own checkpointing (its default)"),
    "unsloth_8x1": Case("unsloth", ["--batch", "8", "--accumulation", "1", "--checkpointing", "none"],
                        what="Unsloth, 8 x 1, no checkpointing"),
    "unsloth_2x4": Case("unsloth", ["--batch", "2", "--accumulation", "4", "--checkpointing", "unsloth"], steps=15,
                        what="Unsloth, 2 x 4, its notebooks' layout"),
    "e2e": Case("e2e", [], what="python main.py, the seed's recipe (10 epochs, 1,000 rows), every setting at its default"),
    "e2e_seed": Case("e2e", ["--preset", "seed", "--max_steps", "40"],
                     what="python main.py --preset seed, 40 steps, extrapolated to the 10 epochs"),
}
SMOKE_CASES = {
    "seed": Case("project", ["--preset", "seed", "--bnb_4bit_compute_dtype", "float32"], steps=3, warmup=1),
    "auto": Case("project", [], steps=3, warmup=1),
    "e2e_seed": Case("e2e", ["--preset", "tiny", "--max_steps", "3", "--report_prompts", "Hi", "--max_new_tokens", "4",
                             "--report_to", "none"]),
}


# ---------------------------------------------------------------------------- shared inputs (made once)

def synthetic_rows(n_rows: int, max_length: int, vocab: int, seed: int = 0) -> list[dict]:
    """Pre-tokenized rows with guanaco-like lengths, in a length-grouped order, cut at max_length."""
    import torch

    g = torch.Generator().manual_seed(seed)
    lengths = torch.exp(torch.randn(n_rows, generator=g) * 0.6 + math.log(180)).clamp(24, 900).long()
    rows = []
    for length in lengths.tolist():
        ids = [1] + torch.randint(4, vocab, (length - 1,), generator=g).tolist()
        prompt = max(1, int(0.3 * length))
        rows.append({"input_ids": ids[:max_length], "labels": ([-100] * prompt + ids[prompt:])[:max_length]})
    return length_grouped(rows, ROWS_PER_STEP, g)


def length_grouped(rows: list[dict], rows_per_step: int, generator, steps_per_group: int = 50) -> list[dict]:
    """The order of transformers' LengthGroupedSampler: shuffle, then sort by length within groups."""
    import torch

    order = torch.randperm(len(rows), generator=generator).tolist()
    size = rows_per_step * steps_per_group
    grouped = []
    for start in range(0, len(order), size):
        group = sorted(order[start:start + size], key=lambda i: len(rows[i]["input_ids"]), reverse=True)
        grouped += [rows[i] for i in group]
    return grouped


def lora_init(model_config, rank: int, seed: int = 0) -> dict:
    """LoRA A matrices for q_proj and v_proj of every layer, drawn as PEFT draws them (B stays 0)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    h = model_config["hidden_size"]
    bound = 1 / math.sqrt(h)  # kaiming_uniform_(a=sqrt(5)) on a (rank, h) matrix
    return {f"layers.{layer}.self_attn.{proj}.lora_A": (torch.rand(rank, h, generator=g) * 2 - 1) * bound
            for layer in range(model_config["num_hidden_layers"]) for proj in ("q_proj", "v_proj")}


def load_lora_init(model, path: Path) -> int:
    """Copy the benchmark's LoRA A matrices into a PEFT model (project or Unsloth); returns how many."""
    import torch
    from safetensors.torch import load_file

    init, loaded = load_file(str(path)), 0
    with torch.no_grad():
        for name, param in model.named_parameters():
            key = next((k for k in init if f".{k}." in name.replace(".base_layer", "")), None)
            if key is not None:
                param.copy_(init[key].to(param.dtype))
                loaded += 1
    return loaded


def build_random_model(folder: Path, layers: int, tokenizer_dir: Path | None) -> Path:
    """Random Llama-2-7B-shaped weights (bf16), made on the GPU, saved once in safetensors."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tiny_model import build_tokenizer

    if (folder / "config.json").is_file():
        return folder
    config = LlamaConfig(**{**SHAPE_7B, "num_hidden_layers": layers}, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    # The real Llama-2 tokenizer where one is given (its ids match this shape's vocabulary); else the
    # bundled tiny one, which is enough for pre-tokenized rows.
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir) if tokenizer_dir else build_tokenizer(PROJECT_DIR / "data" / "sample.jsonl")
    tokenizer.save_pretrained(folder)
    return folder


def guanaco_shaped_rows(n_rows: int, seed: int = 0) -> list[str]:
    """Text rows in the guanaco-llama2-1k format with its length law and ~15% multi-turn rows.

    Words come from the bundled rows, lengths in words from a log-normal like guanaco's (a median
    of about 180 tokens per row, a long tail past max_seq_length)."""
    import random

    rng = random.Random(seed)
    words = " ".join(json.loads(line)["text"] for line in (PROJECT_DIR / "data" / "sample.jsonl").open()).split()
    words = [w for w in words if "[" not in w and "<" not in w and ">" not in w]

    def text(n: int) -> str:
        start = rng.randrange(len(words) - n)
        return " ".join(words[start:start + n])

    rows = []
    for _ in range(n_rows):
        total = int(min(900, max(20, math.exp(rng.gauss(math.log(135), 0.6)))))  # words; ~1.35 tokens each
        turns = 2 if rng.random() < 0.15 else 1
        parts = []
        for _ in range(turns):
            question = max(4, int(total / turns * 0.3))
            parts.append(f"<s>[INST] {text(question)} [/INST] {text(max(4, total // turns - question))} </s>")
        rows.append("".join(parts))
    return rows


def prepare_inputs(args, bench: Path) -> dict:
    """Model folder, rows and LoRA init, made once for all cases. Returns their paths."""
    from safetensors.torch import save_file

    paths = {"rows": bench / "rows.jsonl", "init": bench / "lora_init.safetensors", "text_rows": bench / "guanaco_shaped.jsonl"}
    if args.smoke:
        from tiny_model import TINY_SHAPE, VOCAB_SIZE, ensure_tiny_model

        paths["model"], shape, vocab = ensure_tiny_model(), TINY_SHAPE, VOCAB_SIZE
    else:
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(args.gpus[0]))
        folder = args.model_dir.with_name(f"{args.model_dir.name}-{args.layers}l")
        subprocess.run([sys.executable, __file__, "--build_model", str(folder), "--layers", str(args.layers),
                        *(["--tokenizer", str(args.tokenizer)] if args.tokenizer else [])], env=env, check=True)
        paths["model"], shape, vocab = folder, {**SHAPE_7B, "num_hidden_layers": args.layers}, SHAPE_7B["vocab_size"]
    longest = max(max(c.steps + c.warmup for c in args.cases.values()), 1)
    rows = synthetic_rows(ROWS_PER_STEP * longest, 64 if args.smoke else MAX_LENGTH, vocab)
    paths["rows"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    save_file(lora_init(shape, 32), str(paths["init"]))
    paths["text_rows"].write_text("".join(json.dumps({"text": t}) + "\n" for t in guanaco_shaped_rows(1000)))
    return paths


# ---------------------------------------------------------------------------- measuring inside a case

class StepClock:
    """Wall time of every optimizer step (device synchronised), and the real tokens it trained on."""

    def __init__(self, step_tokens: list[int], device_sync):
        self.step_tokens, self.sync, self.marks = step_tokens, device_sync, []

    def mark(self) -> None:
        self.sync()
        self.marks.append(time.perf_counter())

    def callback(self):
        from transformers import TrainerCallback

        clock = self

        class Marks(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                clock.mark()

            def on_step_end(self, args, state, control, **kwargs):
                clock.mark()

        return Marks()

    def summary(self, warmup: int) -> dict:
        times = [b - a for a, b in zip(self.marks, self.marks[1:])]
        measured = times[warmup:]
        tokens = sum(self.step_tokens[warmup:len(times)])
        median = statistics.median(measured)
        return {"step_seconds": [round(t, 4) for t in times], "median_step_s": median, "slowest_step_s": max(measured),
                "slowest_over_median": max(measured) / median, "tokens_per_s": tokens / sum(measured),
                "measured_steps": len(measured)}


def step_tokens(rows: list[dict], rows_per_step: int) -> list[int]:
    return [sum(len(r["input_ids"]) for r in rows[i:i + rows_per_step]) for i in range(0, len(rows), rows_per_step)]


def measured_matmul_tflops() -> float:
    import torch

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


def flops_per_token(shape: dict, mean_length: float) -> float:
    h, L, v = shape["hidden_size"], shape["num_hidden_layers"], shape["vocab_size"]
    kv = shape["num_key_value_heads"] * (h // shape["num_attention_heads"])
    matmul = L * (2 * h * h + 2 * h * kv + 3 * h * shape["intermediate_size"]) + h * v
    return 4 * matmul + 6 * L * h * mean_length


class ProfileWindow:
    """torch.profiler over a few optimizer steps after warm-up: the top GPU kernels and how much
    of each step the GPU had nothing to do (host-side gaps: launches, Python, synchronisations)."""

    def __init__(self, first_step: int, steps: int = 3):
        from torch.profiler import ProfilerActivity, profile
        from transformers import TrainerCallback

        self.prof, self.steps = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]), steps
        window = self

        class Window(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                if state.global_step == first_step:
                    window.prof.__enter__()

            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == first_step + steps:
                    window.prof.__exit__(None, None, None)

        self.callback = Window()

    def summary(self, median_step_s: float) -> dict:
        from torch.autograd import DeviceType

        kernels = [e for e in self.prof.key_averages() if e.device_type == DeviceType.CUDA]
        busy_ms = sum(e.self_device_time_total for e in kernels) / 1e3 / self.steps
        top = sorted(kernels, key=lambda e: e.self_device_time_total, reverse=True)[:15]
        return {"gpu_busy_ms_per_step": busy_ms, "gpu_idle_share": max(0.0, 1 - busy_ms / 1e3 / median_step_s),
                "top_kernels": [{"name": e.key[:100], "ms_per_step": e.self_device_time_total / 1e3 / self.steps,
                                 "calls_per_step": e.count / self.steps} for e in top]}


def run_project_case(name: str, case: Case, paths: dict, out: Path, smoke: bool) -> dict:
    """One case of this project's own path, in this (fresh) process."""
    import torch
    from datasets import Dataset

    from config import parse_config
    from model_setup import add_lora, load_base_model, load_model_config, load_tokenizer, resolve_runtime
    from performance import apply_plan, format_plan, plan_performance
    from training import build_trainer

    rows = [json.loads(line) for line in Path(paths["rows"]).open()]
    total = case.steps + case.warmup
    argv = ["--model_name", str(paths["model"]), "--output_dir", str(out / f"run-{name}"), "--max_steps", str(total),
            "--report_to", "none", "--save_steps", "0", "--eval_fraction", "0", "--logging_steps", "1",
            "--warmup_ratio", "0", "--lr_scheduler_type", "constant", "--max_seq_length", str(MAX_LENGTH),
            *(["--allow_cpu"] if smoke else []), *case.flags]
    cfg = parse_config(argv)
    runtime = resolve_runtime(cfg)
    plan = plan_performance(cfg, runtime, load_model_config(cfg))
    cfg = apply_plan(cfg, plan)
    print(format_plan(plan), flush=True)
    cuda = runtime.is_cuda
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    start = time.perf_counter()
    tokenizer = load_tokenizer(cfg)
    model = add_lora(load_base_model(cfg, runtime), cfg)
    loaded_lora = load_lora_init(model, Path(paths["init"]))
    clock = StepClock(step_tokens(rows, ROWS_PER_STEP), sync)
    trainer = build_trainer(model, tokenizer, Dataset.from_list(rows), None, cfg, runtime, callbacks=[clock.callback()])
    trainer.args.train_sampling_strategy = "sequential"  # the rows arrive in the benchmark's one order
    load_s = time.perf_counter() - start
    profiler = ProfileWindow(case.warmup) if cuda and os.environ.get("BENCH_PROFILE") == name else None
    if profiler:
        trainer.add_callback(profiler.callback)
    trainer.train()
    result = {"plan": format_plan(plan), "load_s": load_s, "lora_a_loaded": loaded_lora,
              "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
              "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
              "layout": {k: getattr(cfg, k) for k in ("per_device_train_batch_size", "gradient_accumulation_steps",
                                                      "gradient_checkpointing", "optim", "dequantize_frozen", "pad_to_multiple_of",
                                                      "padding_free", "torch_compile", "cudnn_attention", "use_liger_kernel",
                                                      "bnb_4bit_compute_dtype", "fp32_frozen_weights")},
              **clock.summary(case.warmup)}
    if profiler:
        result["profile"] = profiler.summary(result["median_step_s"])
    return result


# ---------------------------------------------------------------------------- the end-to-end cases

def run_e2e(name: str, case: Case, paths: dict, out: Path, env: dict, timeout: float) -> dict:
    """`python main.py` itself, timed from outside, with its own phase split from metrics.json."""
    run_dir = out / f"run-{name}"
    argv = [sys.executable, str(PROJECT_DIR / "main.py"), "--model_name", str(paths["model"]),
            "--dataset_name", str(paths["text_rows"]), "--output_dir", str(run_dir), "--overwrite", *case.flags]
    start = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, cwd=PROJECT_DIR)
    wall = time.perf_counter() - start
    result = {"command": " ".join(argv[1:]), "returncode": proc.returncode, "wall_s": wall,
              "stdout_tail": proc.stdout[-4000:], "stderr_tail": proc.stderr[-3000:]}
    metrics_path = run_dir / "metrics.json"
    if proc.returncode == 0 and metrics_path.is_file():
        metrics = json.loads(metrics_path.read_text())
        result.update(phases=metrics.get("phase_seconds"), tokens_per_s=metrics["tokens_per_second"],
                      peak_gib=metrics["peak_memory_gib"], steps=metrics["train"]["global_step"],
                      eval_loss_before=metrics["eval_loss_before"], eval_loss_after=metrics["eval_loss_after"])
        if "--max_steps" in case.flags:
            result["extrapolated_s"] = extrapolate(result, metrics, paths)
    return result


def extrapolate(result: dict, metrics: dict, paths: dict) -> float:
    """The wall time of the whole recipe from a run cut short: its training time per step times the
    steps of 10 epochs over all rows, plus its other phases as measured."""
    cfg = metrics["config"]
    rows = sum(1 for _ in Path(paths["text_rows"]).open())
    train_rows = rows - round(rows * cfg["eval_fraction"]) if cfg["eval_fraction"] else rows
    full_steps = math.ceil(train_rows / cfg["rows_per_step"]) * cfg["num_train_epochs"]
    phases = dict(metrics["phase_seconds"])
    per_step = phases.pop("train") / metrics["train"]["global_step"]
    phases.pop("total", None)
    return per_step * full_steps + sum(phases.values())


# ---------------------------------------------------------------------------- running the cases

def child_command(name: str, case: Case, args, paths: dict) -> tuple[list[str], dict]:
    """The fresh process that runs one case, and its environment (its GPU alone, offline)."""
    env = dict(os.environ, BENCH_CASE=name, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
               CUDA_VISIBLE_DEVICES="" if args.smoke else str(args.gpu_of[name]))
    if case.kind == "unsloth":
        env["PYTHONPATH"] = str(args.unsloth_site)
        return [sys.executable, str(PROJECT_DIR / "benchmark_unsloth.py"), "--model", str(paths["model"]),
                "--rows", str(paths["rows"]), "--init", str(paths["init"]), "--steps", str(case.steps),
                "--warmup", str(case.warmup), "--out", str(args.out / f"{name}.json"), *case.flags], env
    role = "--e2e" if case.kind == "e2e" else "--child"
    return [sys.executable, __file__, role, name, "--out", str(args.out), "--timeout", str(args.deadline),
            "--paths", json.dumps({k: str(v) for k, v in paths.items()}), *(["--smoke"] if args.smoke else [])], env


def run_all(args, paths: dict) -> dict[str, dict]:
    """Run each case in its own process, at most one per GPU at a time, until done or the deadline."""
    pending, running, results = list(args.cases), {}, {}
    free, args.gpu_of = list(args.gpus), {}
    deadline = time.time() + args.deadline
    while pending or running:
        while pending and free:
            name = pending.pop(0)
            args.gpu_of[name] = free.pop(0)
            cmd, env = child_command(name, args.cases[name], args, paths)
            log = (args.out / f"{name}.log").open("w")
            running[name] = (subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), time.time())
            print(f"[{time.strftime('%H:%M:%S')}] start {name} on GPU {args.gpu_of[name]}", flush=True)
        for name, (proc, started) in list(running.items()):
            late = time.time() > deadline
            if proc.poll() is None and not late:
                continue
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            results[name] = collect(name, args, proc.returncode, time.time() - started)
            print(f"[{time.strftime('%H:%M:%S')}] done  {name}: {results[name].get('error', 'ok')} "
                  f"({time.time() - started:.0f} s)", flush=True)
            del running[name]
            free.append(args.gpu_of[name])
        if time.time() > deadline:
            results.update({n: {"error": "not run: deadline"} for n in pending})
            pending = []
        time.sleep(0.5)
    return {name: results[name] for name in args.cases}


def collect(name: str, args, returncode: int, seconds: float) -> dict:
    path = args.out / f"{name}.json"
    if returncode == 0 and path.is_file():
        return {**json.loads(path.read_text()), "process_s": seconds}
    log = (args.out / f"{name}.log").read_text(errors="replace") if (args.out / f"{name}.log").is_file() else ""
    return {"error": f"exit {returncode}", "log_tail": log[-3000:], "process_s": seconds}


# ---------------------------------------------------------------------------- the report

def report(results: dict[str, dict], cases: dict[str, Case], shape: dict, mean_len: float) -> str:
    peaks = [r["peak_tflops"] for r in results.values() if r.get("peak_tflops")]
    peak = statistics.median(peaks) if peaks else None
    fpt = flops_per_token(shape, mean_len)
    lines = ["| case | what | tokens/s | median s/step | slowest / median | peak GiB | MFU | load s |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        if "tokens_per_s" not in r or cases[name].kind == "e2e":
            continue
        mfu = f"{100 * r['tokens_per_s'] * fpt / (peak * 1e12):.1f}%" if peak else "-"
        peak_gib = f"{r['peak_gib']:.1f}" if r.get("peak_gib") else "-"
        lines.append(f"| {name} | {cases[name].what} | {r['tokens_per_s']:,.0f} | {r['median_step_s']:.3f} | "
                     f"{r['slowest_over_median']:.2f} | {peak_gib} | {mfu} | {r.get('load_s', 0):.0f} |")
    lines += ["", loss_check(results), "", *e2e_lines(results), "", *error_lines(results),
              "", f"peak bf16 matmul {peak or 0:.0f} TFLOP/s (median over cases), mean row {mean_len:.1f} tokens, "
              f"{fpt / 1e9:.1f} GFLOP per token"]
    return "\n".join(lines)


def loss_check(results: dict[str, dict]) -> str:
    """Same rows, same order, same LoRA start: each case's per-step loss against the reference's."""
    ref = results.get("reference", {}).get("losses")
    if not ref:
        return "loss check: no reference run"
    lines = ["loss check, max |loss - reference| over the steps both ran:"]
    for name, r in results.items():
        if r.get("losses") and name != "reference":
            diff = max(abs(a - b) for a, b in zip(r["losses"], ref))
            lines.append(f"  {name}: {diff:.4f}")
    return "\n".join(lines)


def e2e_lines(results: dict[str, dict]) -> list[str]:
    lines = []
    for name, r in results.items():
        if "wall_s" not in r:
            continue
        phases = ", ".join(f"{k} {v:.1f} s" for k, v in (r.get("phases") or {}).items())
        extra = f"; extrapolated to the full recipe: {r['extrapolated_s'] / 60:.1f} min" if "extrapolated_s" in r else ""
        lines.append(f"{name}: exit {r['returncode']}, wall {r['wall_s']:.1f} s ({phases}); "
                     f"{r.get('tokens_per_s', 0):,.0f} tokens/s over {r.get('steps')} steps{extra}")
    return lines


def error_lines(results: dict[str, dict]) -> list[str]:
    return [f"{name}: {r['error']}: ...{r.get('log_tail', '')[-600:]}" for name, r in results.items() if "error" in r]


# ---------------------------------------------------------------------------- entry points

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="", help="comma-separated case names (default: all; --list shows them)")
    parser.add_argument("--list", action="store_true", help="print the cases and what each runs")
    parser.add_argument("--gpus", default="0", help="GPU indices to spread the cases over, e.g. 0,1,2,3")
    parser.add_argument("--layers", type=int, default=32, help="decoder layers (32 = Llama-2-7B; fewer for a quick try)")
    parser.add_argument("--model_dir", type=Path, default=Path("/tmp/llama2-7b-shape-random"))
    parser.add_argument("--tokenizer", type=Path, help="a Llama-2 tokenizer folder (for the e2e cases)")
    parser.add_argument("--unsloth_site", type=Path, default=Path("/tmp/usite"), help="PYTHONPATH of the Unsloth cases")
    parser.add_argument("--out", type=Path, default=Path("bench"))
    parser.add_argument("--deadline", type=float, default=3600, help="seconds; cases still running are stopped")
    parser.add_argument("--profile", default="", help="a case to profile over 3 steps (top kernels, GPU idle time)")
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU: checks the harness, measures nothing")
    # internal: one case in this process
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--e2e", help=argparse.SUPPRESS)
    parser.add_argument("--paths", help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=float, default=3600, help=argparse.SUPPRESS)
    parser.add_argument("--build_model", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def child_main(args) -> None:
    import torch

    catalogue = SMOKE_CASES if args.smoke else CASES
    name = args.child or args.e2e
    paths = json.loads(args.paths)
    if args.e2e:
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
        result = run_e2e(name, catalogue[name], paths, args.out, env, args.timeout)
        if result["returncode"] != 0:
            print(result["stdout_tail"], result["stderr_tail"], sep="\n")
    else:
        result = run_project_case(name, catalogue[name], paths, args.out, args.smoke)
        if torch.cuda.is_available():
            result["peak_tflops"] = measured_matmul_tflops()
            result["card"] = torch.cuda.get_device_name(0)
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=2))
    if result.get("returncode", 0) != 0:
        sys.exit(1)


def main(argv=None) -> None:
    args = parse_args(argv)
    catalogue = SMOKE_CASES if args.smoke else CASES
    if args.list:
        print("\n".join(f"{n:24s} {c.kind:8s} {c.what}" for n, c in CASES.items()))
        return
    if args.build_model:
        build_random_model(args.build_model, args.layers, args.tokenizer)
        return
    if args.child or args.e2e:
        return child_main(args)
    names = [n for n in args.cases.split(",") if n] or list(catalogue)
    unknown = [n for n in names if n not in catalogue]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; `python benchmark.py --list` shows them")
    if "e2e" in {catalogue[n].kind for n in names} and not args.tokenizer and not args.smoke:
        raise SystemExit("the e2e cases need a Llama-2 tokenizer folder: --tokenizer DIR (README: BENCHMARKS)")
    # Longest cases first, so that the short ones fill the other GPUs meanwhile.
    order = {"e2e": 0, "unsloth": 1, "project": 1}
    args.cases = {n: catalogue[n] for n in sorted(names, key=lambda n: order[catalogue[n].kind])}
    args.gpus = [g for g in args.gpus.split(",") if g]
    args.out.mkdir(parents=True, exist_ok=True)
    if args.profile:
        os.environ["BENCH_PROFILE"] = args.profile
    paths = prepare_inputs(args, args.out)
    results = run_all(args, paths)
    rows = [json.loads(line) for line in paths["rows"].open()]
    mean_len = statistics.mean(len(r["input_ids"]) for r in rows)
    shape = {**SHAPE_7B, "num_hidden_layers": args.layers}
    text = report(results, args.cases, shape, mean_len)
    (args.out / "benchmark.json").write_text(json.dumps({"results": results, "mean_row_tokens": mean_len,
                                                          "layers": args.layers, "date": time.strftime("%Y-%m-%d")}, indent=2))
    (args.out / "table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
