"""Several GPUs: DDP scaling on the 7B shape, and FSDP-QLoRA of 13B- and 70B-shaped models (GPU).

    python benchmark_parallel.py --tokenizer DIR --cases ddp1,ddp2 --gpus 0,1
    python benchmark_parallel.py --tokenizer DIR --cases fsdp_13b,fsdp_70b --gpus 0,1
    python benchmark_parallel.py --list

Each case is `main.py` itself, launched as a user launches it (torchrun for DDP, accelerate launch with
launch/fsdp_qlora.yaml for FSDP), in fresh processes, on 1,000 guanaco-shaped rows in Llama-2 format
(benchmark.guanaco_shaped_rows) and the real Llama-2 tokenizer (--tokenizer). Figures come from the
run's own metrics.json: tokens/s counts the real tokens of every process over the training time; the
peak is the largest of the processes' torch.cuda.max_memory_allocated.

No model download: random weights are made on the GPU. The 7B shape is saved in bf16 (benchmark.py
--build_model) and quantised as it loads, as a user's hub model is. The 13B and 70B shapes are written
once straight in 4 bits (NF4, nested statistics, packed into bf16 words), through quantize.py's own
writer: the checkpoint `python quantize.py` makes, which FSDP runs load into CPU memory and shard.

After an FSDP case with held-out rows, the saved adapter is loaded with plain PEFT onto the 4-bit base
in one process on one GPU (inference.load_for_inference) and evaluated on the same held-out rows: its
loss must equal the loss main.py measured on the sharded, trained model (bf16 rounding apart).

MFU = tokens/s x FLOPs per token (benchmark.flops_per_token) / (GPUs x the card's measured bf16 matmul
peak). DDP cases keep 8 rows per GPU per step (rows_per_step 8 x GPUs: the same work per GPU, so the
total tokens/s shows the scaling); FSDP cases train the seed's 8 rows per step over all GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmark import PROJECT_DIR, SHAPE_7B, flops_per_token, guanaco_shaped_rows

SHAPES = {
    "7b": SHAPE_7B,
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                num_key_value_heads=40, vocab_size=32000, max_position_embeddings=4096),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096),
}
INIT_STD = 0.02  # LlamaConfig's initializer_range: the scale of a real model's weights


@dataclass
class ParallelCase:
    launcher: str  # "torchrun" (DDP) or "fsdp" (accelerate launch --config_file launch/fsdp_qlora.yaml)
    processes: int
    shape: str
    steps: int
    flags: list[str] = field(default_factory=list)
    eval_fraction: float = 0.0
    what: str = ""


CASES: dict[str, ParallelCase] = {
    "ddp1": ParallelCase("torchrun", 1, "7b", 60, what="7B, 1 GPU, the default (auto) layout, 8 rows per step"),
    "ddp2": ParallelCase("torchrun", 2, "7b", 60, what="7B, DDP on 2 GPUs, 8 rows per GPU per step"),
    "ddp4": ParallelCase("torchrun", 4, "7b", 60, what="7B, DDP on 4 GPUs, 8 rows per GPU per step"),
    "fsdp_13b": ParallelCase("fsdp", 2, "13b", 20, ["--performance_mode", "memory"], eval_fraction=0.02,
                             what="13B shape, FSDP-QLoRA on 2 GPUs, 8 rows per step, checkpointing"),
    "fsdp_70b": ParallelCase("fsdp", 2, "70b", 10, ["--performance_mode", "memory"],
                             what="70B shape, FSDP-QLoRA on 2 GPUs, 8 rows per step, checkpointing"),
}


# ---------------------------------------------------------------------------- random 4-bit checkpoints

def llama_config(shape: dict):
    from transformers import LlamaConfig

    return LlamaConfig(**shape, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)


def random_tensors(model_config, device: str, seed: int = 0):
    """(name, bf16 tensor) for every weight of the model, made one at a time on `device`: norms are
    ones, everything else normal(0, 0.02). The whole model never exists at once."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model_config)
    generator = torch.Generator(device=device).manual_seed(seed)
    for name, meta in skeleton.state_dict().items():
        if "norm" in name:
            yield name, torch.ones(meta.shape, dtype=torch.bfloat16, device=device)
        else:
            yield name, torch.empty(meta.shape, dtype=torch.bfloat16, device=device).normal_(0, INIT_STD, generator=generator)


def build_random_4bit(folder: Path, shape: dict, tokenizer_dir: Path | None, device: str = "cuda") -> Path:
    """A 4-bit checkpoint of random weights of `shape`, as `python quantize.py` writes one."""
    import torch
    from transformers import AutoTokenizer

    import quantize
    from tiny_model import build_tokenizer

    if (folder / "config.json").is_file():
        return folder
    model_config = llama_config(shape)
    dtype = torch.bfloat16 if device != "cpu" else torch.float32
    bnb = quantize.bnb_config(dtype, "nf4", nested=True)
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    quantize.write_checkpoint(staging, model_config, random_tensors(model_config, device), bnb, device)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir) if tokenizer_dir else build_tokenizer(PROJECT_DIR / "data" / "sample.jsonl")
    tokenizer.save_pretrained(staging)
    staging.rename(folder)
    return folder


# ---------------------------------------------------------------------------- one case

def launch_command(case: ParallelCase, model: Path, rows: Path, run_dir: Path, port: int) -> list[str]:
    """The command a user types for this case, with this benchmark's rows and step count."""
    rows_per_step = 8 * case.processes if case.launcher == "torchrun" else 8
    settings = ["--model_name", str(model), "--dataset_name", str(rows), "--output_dir", str(run_dir), "--overwrite",
                "--max_steps", str(case.steps), "--rows_per_step", str(rows_per_step), "--eval_fraction", str(case.eval_fraction),
                "--save_steps", "0", "--report_to", "none", "--logging_steps", "5", "--report_prompts", "Hi",
                "--max_new_tokens", "8", *case.flags]
    main = str(PROJECT_DIR / "main.py")
    if case.launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(case.processes),
                "--master_port", str(port), main, *settings]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(PROJECT_DIR / "launch" / "fsdp_qlora.yaml"),
            "--num_processes", str(case.processes), "--main_process_port", str(port), main, *settings]


def run_case(name: str, case: ParallelCase, model: Path, rows: Path, out: Path, gpus: list[str], timeout: float) -> dict:
    run_dir = out / f"run-{name}"
    cmd = launch_command(case, model, rows, run_dir, port=29500 + len(name) * 7 % 400)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=",".join(gpus[:case.processes]), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    start = time.perf_counter()
    with (out / f"{name}.log").open("w") as log:
        try:
            proc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout, cwd=PROJECT_DIR)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    result = {"command": " ".join(cmd[1:]).replace(str(PROJECT_DIR) + "/", ""), "exit": code,
              "wall_s": time.perf_counter() - start, "gpus": case.processes}
    metrics_path = run_dir / "metrics.json"
    if code == 0 and metrics_path.is_file():
        metrics = json.loads(metrics_path.read_text())
        train = metrics["train"]
        result.update(tokens_per_s=metrics["tokens_per_second"], peak_gib=metrics["peak_memory_gib"],
                      steps=train["global_step"], mean_row_tokens=train["train_tokens"] / (train["global_step"] * metrics["config"]["rows_per_step"]), phases=metrics.get("phase_seconds"),
                      eval_loss_after=metrics.get("eval_loss_after"), layout=layout_line(out / f"{name}.log"))
    else:
        result["log_tail"] = (out / f"{name}.log").read_text(errors="replace")[-3000:]
    return result


def layout_line(log: Path) -> str:
    return next((line.strip() for line in log.read_text(errors="replace").splitlines() if line.startswith("layout:")), "")


def adapter_check(run_dir: Path, out: Path, gpu: str, timeout: float) -> dict:
    """The saved adapter on plain PEFT, one process: its held-out loss (run in a fresh process)."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=gpu, HF_HUB_OFFLINE="1")
    cmd = [sys.executable, __file__, "--check_adapter", str(run_dir), "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=PROJECT_DIR)
    if proc.returncode != 0:
        return {"error": (proc.stdout + proc.stderr)[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def held_out_loss_of_saved_adapter(run_dir: Path) -> dict:
    """Load run_dir's adapter as a user would (plain PEFT on the 4-bit base), rebuild the run's held-out
    rows from its run_config, and measure their loss as main.py does (the Trainer's evaluation)."""
    from data_preparation import prepare_datasets
    from inference import load_for_inference
    from model_setup import resolve_runtime
    from report import held_out_metrics
    from training import build_trainer

    metrics = json.loads((run_dir / "metrics.json").read_text())
    adapter = run_dir / metrics["config"]["new_model"]
    model, tokenizer, cfg, _ = load_for_inference(adapter, say=lambda *a: None)
    model.config.use_cache = False
    train_rows, eval_rows = prepare_datasets(cfg, tokenizer)
    trainer = build_trainer(model, tokenizer, train_rows, eval_rows, cfg, resolve_runtime(cfg))
    held_out = held_out_metrics(trainer)
    from safetensors.torch import load_file

    saved = load_file(str(adapter / "adapter_model.safetensors"))
    return {"adapter_tensors": len(saved), "lora_B_abs_sum": sum(float(v.float().abs().sum()) for k, v in saved.items() if "lora_B" in k),
            "adapter": str(adapter), "plain_peft_eval_loss": held_out.loss,
            "plain_base_eval_loss": held_out_metrics(trainer, base_model=True).loss, "run_base_eval_loss": metrics.get("eval_loss_before"), "run_eval_loss": metrics.get("eval_loss_after"),
            "rows": held_out.rows}


# ---------------------------------------------------------------------------- the report

def measured_peak_tflops(gpu: str) -> float:
    code = "import benchmark; print(benchmark.measured_matmul_tflops())"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=gpu)
    return float(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                                cwd=PROJECT_DIR).stdout.strip())


def report(results: dict, peak_tflops: float) -> str:
    lines = ["| case | what | GPUs | tokens/s (all GPUs) | per GPU peak GiB | MFU | steps | layout |", "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        if "tokens_per_s" not in r:
            continue
        case = CASES[name]
        mfu = r["tokens_per_s"] * flops_per_token(SHAPES[case.shape], r["mean_row_tokens"]) / (case.processes * peak_tflops * 1e12)
        lines.append(f"| {name} | {case.what} | {case.processes} | {r['tokens_per_s']:,.0f} | {r['peak_gib']:.1f} | "
                     f"{100 * mfu:.1f}% | {r['steps']} | {r['layout'].removeprefix('layout: ')} |")
    base = results.get("ddp1", {}).get("tokens_per_s")
    for name in ("ddp2", "ddp4"):
        if base and results.get(name, {}).get("tokens_per_s"):
            lines.append(f"\nscaling {name}: {results[name]['tokens_per_s'] / base:.2f}x ddp1")
    for name, r in results.items():
        if "adapter_check" in r:
            lines.append(f"\n{name} adapter on plain PEFT: {json.dumps(r['adapter_check'])}")
        if "tokens_per_s" not in r:
            lines.append(f"\n{name}: exit {r['exit']}: ...{r.get('log_tail', '')[-1500:]}")
        lines.append(f"\n{name} command: {r['command']}; wall {r['wall_s']:.0f} s; phases {r.get('phases')}")
    lines.append(f"\npeak bf16 matmul {peak_tflops:.0f} TFLOP/s per GPU")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="ddp1,ddp2", help="comma-separated case names (--list shows them)")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--gpus", default="0,1", help="GPU indices the cases may use")
    parser.add_argument("--tokenizer", type=Path, help="a Llama-2 tokenizer folder (the random models get it)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-parallel"), help="random models and rows (made once)")
    parser.add_argument("--out", type=Path, default=Path("bench-parallel"))
    parser.add_argument("--timeout", type=float, default=900, help="seconds per case")
    parser.add_argument("--check_adapter", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(f"{n:10s} {c.what}" for n, c in CASES.items()))
        return
    if args.check_adapter:
        print(json.dumps(held_out_loss_of_saved_adapter(args.check_adapter)))
        return
    names = [n for n in args.cases.split(",") if n]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; `python benchmark_parallel.py --list` shows them")
    gpus = [g for g in args.gpus.split(",") if g]
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    rows = args.work / "guanaco_shaped.jsonl"
    rows.write_text("".join(json.dumps({"text": t}) + "\n" for t in guanaco_shaped_rows(1000)))
    results = {}
    for name in names:
        case = CASES[name]
        if case.processes > len(gpus):
            results[name] = {"exit": f"not run: needs {case.processes} GPUs, --gpus gives {len(gpus)}", "command": "", "wall_s": 0}
            continue
        model = prepare_model(case.shape, args.work, args.tokenizer, gpus[0])
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(launch_command(case, model, rows, args.out / f'run-{name}', 0)[1:8])} ...", flush=True)
        results[name] = run_case(name, case, model, rows, args.out, gpus, args.timeout)
        if case.eval_fraction and "tokens_per_s" in results[name]:
            results[name]["adapter_check"] = adapter_check(args.out / f"run-{name}", args.out, gpus[0], args.timeout)
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {json.dumps({k: v for k, v in results[name].items() if k != 'log_tail'})}", flush=True)
        (args.out / "parallel.json").write_text(json.dumps(results, indent=2))
    text = report(results, measured_peak_tflops(gpus[0]))
    (args.out / "parallel.md").write_text(text + "\n")
    print(text)


def prepare_model(shape: str, work: Path, tokenizer: Path | None, gpu: str) -> Path:
    """The random model of `shape`, made once on one GPU in a process of its own."""
    folder = work / f"llama2-{shape}-shape-random" if shape == "7b" else work / f"llama2-{shape}-shape-random-nf4"
    if (folder / "config.json").is_file():
        return folder
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=gpu)
    start = time.perf_counter()
    if shape == "7b":
        cmd = [sys.executable, str(PROJECT_DIR / "benchmark.py"), "--build_model", str(folder), "--layers", "32"]
    else:
        cmd = [sys.executable, __file__, "--build_4bit", str(folder), "--shape", shape]
    cmd += ["--tokenizer", str(tokenizer)] if tokenizer else []
    subprocess.run(cmd, env=env, check=True, cwd=PROJECT_DIR)
    print(f"[{time.strftime('%H:%M:%S')}] built {folder} in {time.perf_counter() - start:.0f} s", flush=True)
    return folder


def build_main(argv) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--build_4bit", type=Path, required=True)
    parser.add_argument("--shape", choices=sorted(SHAPES), required=True)
    parser.add_argument("--tokenizer", type=Path)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    build_random_4bit(args.build_4bit, SHAPES[args.shape], args.tokenizer, args.device)


if __name__ == "__main__":
    if "--build_4bit" in sys.argv:
        build_main(sys.argv[1:])
    else:
        main()
