"""Generation speed of this project's inference path on a Llama-2-7B-shaped model, each case in a fresh process.

    python benchmark_generation.py                         # every case, 7B shape, on the GPU; JSON + table in ./bench-gen
    python benchmark_generation.py --cases nf4_plain_b1,nf4_fast_b1
    python benchmark_generation.py --smoke                 # the tiny model on the CPU, a few tokens (the tests run this)

No download: benchmark.py's random Llama-2-7B-shaped weights (made on the GPU, saved once) are the
base, and an adapter (LoRA r=32 on q/v with random, non-zero B) is made for it once. Every case
loads through inference.load_for_inference and generates through inference.generate_batch, as the
chat, the batch files and main.py do, with 200 new tokens; prompts are random token ids of 24 to
120 tokens, the same in every case.

Cases (each a fresh process, so no case inherits another's compiled kernels or warm caches):
- nf4_plain_b1 / _b32: the 4-bit base + adapter, plain generate (the reference tokens).
- nf4_fast_b1 / _b32: the same model, dequantised weights + static cache + torch.compile.
- bf16_plain_b1, bf16_fast_b1 / _b32: a bf16 model of the merged shape (the base itself: merging
  changes values, not speed), plain and compiled.
- load_quantise / load_cached: loading the 4-bit base + adapter without / with the saved 4-bit copy.
- chat_ttft: the chat command line (inference.main --chat, one line on stdin) in a process started
  for it: seconds from the start of that process to the first generated token, and to the end of
  the answer, with the time each stage was reached. Run it after load_cached or an nf4 case, so that
  the 4-bit copy exists (its notes say whether the chat had to quantise).

Reported per case: new tokens per second (timed on a second, identical call, after a warm-up call
that pays for the compilation; its time is reported too), and for the fast cases whether their
greedy tokens equal the plain case's, row by row (first differing position otherwise).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

PROJECT_DIR = Path(__file__).resolve().parent
CASES = {
    # name: (model kind, dequantize, compile, batch)
    "nf4_plain_b1": ("nf4", "no", "no", 1),
    "nf4_fast_b1": ("nf4", "yes", "yes", 1),
    "nf4_plain_b32": ("nf4", "no", "no", 32),
    "nf4_fast_b32": ("nf4", "yes", "yes", 32),
    "bf16_plain_b1": ("bf16", "no", "no", 1),
    "bf16_fast_b1": ("bf16", "no", "yes", 1),
    "bf16_plain_b32": ("bf16", "no", "no", 32),
    "bf16_fast_b32": ("bf16", "no", "yes", 32),
    # the same pair computed in float32: whether the fast path computes plain generate's function on the
    # GPU, with rounding differences a thousand times below bf16's (random weights' logits are near ties)
    "nf4_plain_b32_f32": ("nf4", "no", "no", 32),
    "nf4_fast_b32_f32": ("nf4", "yes", "yes", 32),
    "load_quantise": ("load", "", "", 0),
    "load_cached": ("load", "", "", 0),
    "chat_ttft": ("chat", "", "", 0),
}
REFERENCE = {"nf4_fast_b1": "nf4_plain_b1", "nf4_fast_b32": "nf4_plain_b32", "bf16_fast_b1": "bf16_plain_b1",
             "bf16_fast_b32": "bf16_plain_b32", "nf4_fast_b32_f32": "nf4_plain_b32_f32",
             # plain generate against itself: batch 1's row is batch 32's first row (bf16 rounding differs with the batch)
             "nf4_plain_b1": "nf4_plain_b32"}


# ---------------------------------------------------------------------------- the model and adapter

def make_adapter(base_dir: Path, folder: Path, model_name: str, compute_dtype: str = "auto") -> Path:
    """A LoRA adapter (r=32 on q/v, random non-zero B) for the base, saved as main.py saves one.

    The run's compute dtype goes with it (run_config.json), and inference computes in it."""
    from config import parse_config
    from model_setup import add_lora, load_base_model, load_tokenizer, resolve_runtime
    from training import save_adapter

    adapter = folder / "adapter"
    if (adapter / "run_config.json").is_file():
        return adapter
    cfg = parse_config(["--model_name", model_name, "--output_dir", str(folder), "--new_model", "adapter",
                        "--allow_cpu", "--report_to", "none", "--bnb_4bit_compute_dtype", compute_dtype])
    tokenizer = load_tokenizer(cfg)
    model = add_lora(load_base_model(cfg, resolve_runtime(cfg)), cfg)
    generator = torch.Generator().manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data = (torch.randn(param.shape, generator=generator) * 0.02).to(param.device, param.dtype)
    return save_adapter(model, tokenizer, cfg)


def prompts(n_rows: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """Random token ids after a BOS, 24 to 120 tokens: the same rows in every case (batch 1 gets batch 32's first)."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(24, 121, (32,), generator=generator).tolist()
    rows = [[1] + torch.randint(4, vocab, (n - 1,), generator=generator).tolist() for n in lengths]
    return rows[:n_rows] if n_rows <= 32 else rows + prompts(n_rows - 32, vocab, seed + 1)


# ---------------------------------------------------------------------------- one case, in this process

def load_case(kind: str, dequantize: str, compile_: str, adapter: Path, base_dir: Path, cache: Path):
    from inference import DecodingPlan, load_for_inference

    if kind == "nf4":
        model, tokenizer, _, plan = load_for_inference(adapter, dequantize=dequantize, compile_=compile_, many_rows=True,
                                                       cache_root=cache, say=lambda s: None)
        return model, tokenizer, reference_if_plain(plan, compile_)
    from transformers import AutoModelForCausalLM

    from config import Config
    from model_setup import load_tokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype, device_map={"": device} if device == "cuda" else None)
    tokenizer = load_tokenizer(Config(model_name=str(base_dir)))  # as training and inference load it: a pad that is not EOS
    plan = DecodingPlan(False, compile_ == "yes", f"bf16, compile {compile_}", defer_stop_check=device == "cuda")
    return model.eval(), tokenizer, reference_if_plain(plan, compile_)


def reference_if_plain(plan, compile_: str):
    """The plain cases are the reference: transformers' generate exactly as it comes, stop check included."""
    import dataclasses

    from inference import DEFERRED_STOP_REASON

    if compile_ == "yes":
        return plan
    return dataclasses.replace(plan, defer_stop_check=False, reason=plan.reason.replace(f"; {DEFERRED_STOP_REASON}", ""))


def run_generation_case(name: str, adapter: Path, base_dir: Path, cache: Path, new_tokens: int) -> dict:
    from inference import GenerationSettings, generate_batch

    kind, dequantize, compile_, batch = CASES[name]
    start = time.perf_counter()
    model, tokenizer, plan = load_case(kind, dequantize, compile_, adapter, base_dir, cache)
    load_s = time.perf_counter() - start
    settings = GenerationSettings(max_new_tokens=new_tokens)
    rows = prompts(batch, model.config.vocab_size)
    sync()
    start = time.perf_counter()
    generate_batch(model, tokenizer, rows, settings, plan)  # warm-up: compilation, CUDA graphs, allocator
    sync()
    warmup_s = time.perf_counter() - start
    start = time.perf_counter()
    answers = generate_batch(model, tokenizer, rows, settings, plan)
    sync()
    seconds = time.perf_counter() - start
    tokens = sum(a.tokens for a in answers)
    profiled = os.environ.get("BENCH_PROFILE") and "fast" in name
    profile = profile_decoding(model, tokenizer, rows, plan, new_tokens) if profiled else {}
    return {**profile, "case": name, "plan": plan.reason, "batch": batch, "load_s": load_s, "warmup_s": warmup_s, "seconds": seconds,
            "new_tokens": tokens, "tokens_per_s": tokens / seconds,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
            "token_ids": [a.token_ids + ([] if a.stop_reason == "length" else ["<stop>"]) for a in answers]}


def profile_decoding(model, tokenizer, rows: list[list[int]], plan, new_tokens: int) -> dict:
    """Where a decoding step's time goes: GPU-busy time against wall time, kernels and CUDA-graph launches
    per step, the costliest kernels, and the Python functions that cost the most host time per step."""
    import cProfile
    import pstats

    from torch.profiler import ProfilerActivity, profile

    from inference import GenerationSettings, generate_batch

    settings = GenerationSettings(max_new_tokens=new_tokens)  # the timed call's: its compiled graphs are reused
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        generate_batch(model, tokenizer, rows, settings, plan)
        sync()
        wall = time.perf_counter() - start
    events = prof.key_averages()
    device_us = lambda e: getattr(e, "self_device_time_total", 0)  # noqa: E731
    count = lambda key: sum(e.count for e in events if e.key == key)  # noqa: E731
    kernels = [e for e in events if is_kernel(e)]
    top = sorted(kernels, key=device_us, reverse=True)[:12]
    host = cProfile.Profile()
    start = time.perf_counter()
    host.runcall(generate_batch, model, tokenizer, rows, settings, plan)
    sync()
    host_wall = time.perf_counter() - start
    stats = pstats.Stats(host).sort_stats("tottime")
    python_top = [(f"{Path(f).name}:{line}({fn})", round(tt / new_tokens * 1e3, 3))
                  for (f, line, fn), (_, _, tt, _, _) in sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:15]]
    return {"profile": {"new_tokens": new_tokens, "wall_ms_per_step": wall / new_tokens * 1e3,
                        "gpu_busy_ms_per_step": sum(device_us(e) for e in kernels) / 1e3 / new_tokens,
                        "kernel_launches_per_step": count("cudaLaunchKernel") / new_tokens,
                        "graph_launches_per_step": count("cudaGraphLaunch") / new_tokens,
                        "syncs_per_step": (count("cudaStreamSynchronize") + count("cudaDeviceSynchronize")) / new_tokens,
                        "top_kernels_ms": [(e.key[:90], e.count, round(device_us(e) / 1e3, 2)) for e in top],
                        "cprofile_wall_ms_per_step": host_wall / new_tokens * 1e3,
                        "python_top_ms_per_step": python_top}}


def is_kernel(event) -> bool:
    """A GPU kernel or copy, not a span that contains them (a compiled graph's "## Call ... ##" annotation)
    or the profiler's own buffer work: summing those counted GPU time twice."""
    from torch.autograd import DeviceType

    return (getattr(event, "device_type", None) == DeviceType.CUDA and not event.key.startswith("## ")
            and event.key not in ("Activity Buffer Request", "Buffer Flush"))


def run_load_case(name: str, adapter: Path, cache: Path) -> dict:
    """Load time of the 4-bit base + adapter, quantising at load or from the saved 4-bit copy."""
    import shutil

    from inference import folder_bytes, load_for_inference

    if name == "load_quantise":
        shutil.rmtree(cache, ignore_errors=True)
    notes = []
    sync()
    start = time.perf_counter()
    load_for_inference(adapter, dequantize="no", compile_="no", cache_root=cache, say=notes.append)
    sync()
    copies = list(cache.iterdir()) if cache.is_dir() else []
    return {"case": name, "load_s": time.perf_counter() - start, "note": " ".join(notes),
            "cache_gib": folder_bytes(copies[0]) / 2**30 if copies else None}


def run_chat_case(adapter: Path, cache: Path, new_tokens: int) -> dict:
    """`inference.py --chat` from a cold process start (this process, spawned for the case) to its first token.

    The real command line runs (inference.main, one line on stdin); its streamer is wrapped to note
    when the first generated token reaches it. That is the time to the first token; a printed byte may
    come later, since the streamer prints whole words (and random weights make few of them).
    """
    import contextlib
    import io

    import chat
    import inference

    started = float(os.environ.get("BENCH_T0", time.time()))
    marks = {}
    make_streamer = chat.make_streamer

    def timed_streamer(tokenizer, stream):
        streamer = make_streamer(tokenizer, stream)
        put = streamer.put

        def put_timed(value):
            if not streamer.next_tokens_are_prompt:  # the first put is the prompt
                marks.setdefault("first_token", time.time())
            put(value)

        streamer.put = put_timed
        return streamer

    chat.make_streamer = timed_streamer
    mark_calls(marks, inference, "main", "load_base", "plan_decoding", "announce")
    import peft

    mark_calls(marks, peft.PeftModel, "from_pretrained")
    notes, answer = io.StringIO(), io.StringIO()
    stdin, sys.stdin = sys.stdin, io.StringIO("Tell me about the history of the printing press.\n")
    try:
        with contextlib.redirect_stdout(answer), contextlib.redirect_stderr(notes):
            code = inference.main(["--adapter", str(adapter), "--chat", "--quantized_cache", str(cache),
                                   "--max_new_tokens", str(new_tokens)])
    finally:
        sys.stdin = stdin
    ended = time.time()
    return {"case": "chat_ttft", "first_token_s": marks.get("first_token", ended) - started, "reply_s": ended - started,
            "stages_s": {name: round(t - started, 2) for name, t in sorted(marks.items(), key=lambda kv: kv[1])},
            "returncode": code, "answer_chars": len(answer.getvalue()),
            "notes": [l for l in notes.getvalue().splitlines() if l.startswith(("base:", "model:"))]}


def mark_calls(marks: dict, owner, *names: str) -> None:
    """Note the time each named function of `owner` is entered (name:in) and left (name:out)."""
    for name in names:
        original = getattr(owner, name)

        def timed(*args, _original=original, _name=name, **kwargs):
            marks.setdefault(f"{_name}:in", time.time())
            try:
                return _original(*args, **kwargs)
            finally:
                marks.setdefault(f"{_name}:out", time.time())

        setattr(owner, name, staticmethod(timed) if isinstance(owner, type) else timed)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------- all cases, each in a fresh process

def compare_tokens(results: dict[str, dict]) -> None:
    """For each fast case, whether its greedy tokens equal the plain case's, row by row."""
    for fast, plain in REFERENCE.items():
        if fast in results and plain in results and "token_ids" in results[fast] and "token_ids" in results[plain]:
            rows = list(zip(results[fast]["token_ids"], results[plain]["token_ids"]))  # the first min(batch) rows
            first_diff = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), None if x == y else min(len(x), len(y)))
                          for x, y in rows]
            results[fast]["same_tokens_as_plain"] = f"{sum(d is None for d in first_diff)} of {len(rows)} rows (vs {plain})"
            results[fast]["first_differing_position"] = [d for d in first_diff if d is not None][:8]


def table(results: dict[str, dict]) -> str:
    lines = ["| case | decoding | batch | new tokens/s | warm-up s | load s | greedy = plain | peak GiB |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        if "tokens_per_s" in r:
            peak = f"{r['peak_gib']:.1f}" if r.get("peak_gib") else "-"
            lines.append(f"| {name} | {r['plan']} | {r['batch']} | {r['tokens_per_s']:,.1f} | {r['warmup_s']:.1f} | "
                         f"{r['load_s']:.1f} | {r.get('same_tokens_as_plain', '(reference)')} | {peak} |")
        elif "load_s" in r:
            lines.append(f"| {name} | {r['note']} | | | | {r['load_s']:.1f} | | |")
        elif "first_token_s" in r:
            lines.append(f"| chat_ttft | cold start to the first token {r['first_token_s']:.1f} s, to the end of the "
                         f"answer {r['reply_s']:.1f} s (exit {r['returncode']}) | 1 | | | | | |")
        else:
            lines.append(f"| {name} | failed: {r.get('error', '?')[-200:]} | | | | | | |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of: " + ", ".join(CASES))
    parser.add_argument("--new_tokens", type=int, default=200)
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU: batch 32 -> 4, 8 new tokens, no compilation")
    parser.add_argument("--layers", type=int, default=32, help="decoder layers of the 7B shape (fewer: a quick GPU check)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-gen-work"), help="model, adapter and 4-bit copy")
    parser.add_argument("--out", type=Path, default=Path("bench-gen"))
    parser.add_argument("--profile", action="store_true",
                        help="also profile each fast case's decoding (GPU-busy vs wall time, top kernels, "
                             "host Python per step) and keep the compiler's CUDA-graph notes")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case in this process
    args = parser.parse_args(argv)
    if args.smoke:  # the same cases, small: batch 32 -> 4, 8 new tokens, no compilation (minutes on 2 CPU cores)
        CASES.update({k: (v[0], v[1], "no" if v[2] == "yes" else v[2], min(v[3], 4)) for k, v in CASES.items()})
        args.new_tokens = min(args.new_tokens, 8)
    cache = args.work / "4bit"
    if args.case == "chat_ttft":  # the chat process does only what `inference.py --chat` does
        print("RESULT " + json.dumps(run_chat_case(args.work / "run" / "adapter", cache, args.new_tokens)), flush=True)
        return 0
    base_dir, model_name = prepare_model(args)
    adapter = make_adapter(base_dir, args.work / "run", model_name)
    if args.case and args.case.endswith("_f32"):
        adapter = make_adapter(base_dir, args.work / "run-float32", model_name, "float32")
    if args.case:
        kind = CASES[args.case][0]
        result = (run_load_case(args.case, adapter, cache) if kind == "load"
                  else run_generation_case(args.case, adapter, base_dir, cache, args.new_tokens))
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    return run_all(args, [c for c in args.cases.split(",") if c])


def prepare_model(args) -> tuple[Path, str]:
    """(folder of the base weights, model_name for the config)."""
    if args.smoke:
        from model_setup import resolve_model_path

        return Path(resolve_model_path("tiny-llama")), "tiny-llama"
    if not torch.cuda.is_available():
        raise SystemExit("benchmark_generation.py measures GPU generation: no CUDA device here (use --smoke on a CPU)")
    from benchmark import build_random_model

    base = build_random_model(args.work / f"llama2-7b-shape-{args.layers}l", args.layers, None)
    return base, str(base)


def run_all(args, names: list[str]) -> int:
    unknown = [n for n in names if n not in CASES]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; choose from {', '.join(CASES)}")
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in names:
        command = [sys.executable, str(Path(__file__).resolve()), "--case", name, "--new_tokens", str(args.new_tokens),
                   "--layers", str(args.layers), "--work", str(args.work)] + (["--smoke"] if args.smoke else [])
        print(f"== {name}", flush=True)
        profiling = dict(BENCH_PROFILE="1", TORCH_LOGS="perf_hints,recompiles") if args.profile else {}
        proc = subprocess.run(command, capture_output=True, text=True,
                              env=dict(os.environ, HF_HUB_OFFLINE="1", BENCH_T0=repr(time.time()), **profiling))
        found = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        results[name] = json.loads(found[-1][7:]) if found else {"case": name, "error": proc.stderr[-2000:]}
        if args.profile:
            results[name]["compiler_notes"] = [l[:300] for l in proc.stderr.splitlines()
                                               if "cudagraph" in l.lower() or "recompil" in l.lower()][:12]
        brief = {k: v for k, v in results[name].items() if k not in ("token_ids", "profile")}
        print(json.dumps(brief), flush=True)
        text = write_results(args, results)  # after every case: a run cut short keeps what it measured
    print(text)
    return 1 if any("error" in r for r in results.values()) else 0


def write_results(args, results: dict[str, dict]) -> str:
    """generation.json and generation.md in --out; returns the table with its heading."""
    compare_tokens(results)
    card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    (args.out / "generation.json").write_text(json.dumps({"card": card, "torch": torch.__version__,
                                                          "new_tokens": args.new_tokens, "results": results}, indent=2))
    text = f"{card}, {args.new_tokens} new tokens\n\n{table(results)}\n"
    (args.out / "generation.md").write_text(text)
    return text


if __name__ == "__main__":
    sys.exit(main())
