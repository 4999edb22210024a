"""Several processes: torchrun and accelerate launch, run on the CPU (gloo) as on several GPUs (NCCL).

The two-process runs train the tiny preset for a few steps and compare with one process training the
same rows per step: on the CPU in float32 only the order of float additions differs between them (the
gradient all-reduce), so per-step losses agree to 1e-4 and the adapters' weights to 1e-5; a process
training on its own (no gradient sharing) or on other rows moves losses by 1e-3 or more within 4 steps.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig

import main
import parallel
from conftest import PROJECT_DIR
from model_setup import Runtime, build_bnb_config, placement
from performance import PlanError, per_process_weight_bytes, plan_performance, weight_bytes
from config import parse_config
from training import StopOnSignal

QUICK = ["--preset", "tiny", "--report_to", "none", "--report_prompts", "Hi", "--max_new_tokens", "4",
         "--lora_dropout", "0", "--max_steps", "4", "--logging_steps", "1", "--save_steps", "2"]
# A held-out file of its own: the base model is evaluated before training (which once kept DDP from
# wrapping the model at all), and all 120 bundled rows train (a count at which length grouping by
# per-process rows would have ordered them differently from one process).
HELD_OUT = ["--eval_dataset", str(PROJECT_DIR / "data" / "sample.jsonl")]
ADAPTER = "tiny-llama-finetune"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(free_port()), str(PROJECT_DIR / "main.py")]


def launch_env() -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")


def metrics(out):
    return json.loads((out / "metrics.json").read_text())


def losses(out) -> list[float]:
    return [p["loss"] for p in metrics(out)["train_loss_per_step"]]


@pytest.fixture(scope="module")
def one_and_two(tmp_path_factory, tiny_model_dir):
    """The same 4 steps of 8 rows: one process (1 x 8) and `torchrun --nproc_per_node 2` (1 x 4 x 2)."""
    root = tmp_path_factory.mktemp("ddp")
    main.run(QUICK + HELD_OUT + ["--output_dir", str(root / "one")])
    proc = subprocess.run([*torchrun(2), *QUICK, *HELD_OUT, "--output_dir", str(root / "two")], cwd=PROJECT_DIR, env=launch_env(),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"STDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-3000:]}"
    return root / "one", root / "two", proc


def test_two_processes_train_the_rows_one_process_trains(one_and_two):
    one, two, _ = one_and_two
    assert len(losses(two)) == len(losses(one)) == 4
    assert losses(two) == pytest.approx(losses(one), abs=1e-4)
    assert metrics(two)["eval_loss_after"] == pytest.approx(metrics(one)["eval_loss_after"], abs=1e-4)
    # tokens/s is for the whole job: both processes' tokens, which are the rows one process trains on
    assert metrics(two)["train"]["train_tokens"] == metrics(one)["train"]["train_tokens"]
    assert metrics(two)["config"]["gradient_accumulation_steps"] == 4 and metrics(one)["config"]["gradient_accumulation_steps"] == 8


def test_two_processes_write_one_adapter_equal_to_one_process(one_and_two):
    one, two, _ = one_and_two
    assert sorted(p.name for p in two.iterdir() if p.name.startswith(".")) == []  # no staging folder left
    weights_one = load_file(str(one / ADAPTER / "adapter_model.safetensors"))
    weights_two = load_file(str(two / ADAPTER / "adapter_model.safetensors"))
    assert weights_one.keys() == weights_two.keys() and len(weights_one) > 0
    for key in weights_one:
        assert torch.allclose(weights_one[key], weights_two[key], atol=1e-5), key
    assert any(weights_two[key].abs().sum() > 0 for key in weights_two if "lora_B" in key)  # it trained
    # checkpoints as the Trainer writes them: the model once, an RNG state per process
    for step in (2, 4):
        checkpoint = two / f"checkpoint-{step}"
        assert (checkpoint / "adapter_model.safetensors").is_file()
        assert (checkpoint / "rng_state_0.pth").is_file() and (checkpoint / "rng_state_1.pth").is_file()


def test_two_processes_print_each_line_once(one_and_two):
    _, two, proc = one_and_two
    out = proc.stdout
    assert out.count("layout: 8 rows per step = 1 per forward pass x 4 accumulation x 2 process(es)") == 1
    assert out.count("2 processes (2 on this machine), DDP") == 1
    assert out.count("wall time ") == 1 and out.count(f"adapter saved to {two / ADAPTER}") == 1
    assert out.count("step     3/4 | epoch") == 1 and out.count("data: 120 training rows") == 1
    assert "the most of 2 processes" in out and "Traceback" not in proc.stderr


def test_a_signal_to_one_process_stops_all_at_the_same_step(tmp_path, tiny_model_dir):
    """SIGTERM reaches only process 1: both stop after the same step, one checkpoint and one adapter."""
    out = tmp_path / "run"
    args = [*QUICK[:-6], "--num_train_epochs", "50", "--save_steps", "0", "--logging_steps", "1", "--eval_fraction", "0",
            "--output_dir", str(out)]
    proc = subprocess.Popen([*torchrun(2), *args], cwd=PROJECT_DIR, env=launch_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 400
    for line in proc.stdout:  # wait until training is under way
        if "| loss" in line or time.time() > deadline:
            break
    os.kill(worker_pid(proc.pid, rank=1), signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=400)
    assert "SIGTERM received by another process: stopping after this step" in stdout
    messages = [line for line in stderr.splitlines() if line.startswith("interrupted at step")]
    assert len(messages) == 1, stderr[-3000:]
    step = int(messages[0].split()[3].rstrip(":"))
    checkpoint = out / f"checkpoint-{step}"  # written by both processes together, at the same step
    assert (checkpoint / "rng_state_0.pth").is_file() and (checkpoint / "rng_state_1.pth").is_file()
    assert [p.name for p in out.glob("checkpoint-*")] == [checkpoint.name]
    assert (out / ADAPTER / "adapter_model.safetensors").is_file()
    assert "exitcode  : 143" in stderr  # each process ended with 128 + SIGTERM; torchrun reports it
    assert not list(out.glob(".*.saving"))


def worker_pid(launcher_pid: int, rank: int) -> int:
    """The pid of the torchrun worker with this RANK (its children carry it in their environment)."""
    children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(launcher_pid)], capture_output=True, text=True).stdout.split()
    for pid in map(int, children):
        environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return pid
    raise AssertionError(f"no worker with RANK={rank} among {children}")


def test_multinode_config_runs_two_machines_on_localhost(tmp_path, tiny_model_dir):
    """launch/multinode_ddp.yaml as README says to use it, with two "machines" of one process each
    on this one (the only change: the main address is localhost, the process count 2)."""
    out, port = tmp_path / "run", free_port()
    machines = [subprocess.Popen(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(PROJECT_DIR / "launch" / "multinode_ddp.yaml"),
         "--num_processes", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
         str(PROJECT_DIR / "main.py"), *QUICK, "--max_steps", "2", "--eval_fraction", "0", "--output_dir", str(out)],
        cwd=PROJECT_DIR, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    results = [machine.communicate(timeout=600) for machine in machines]
    for machine, (stdout, stderr) in zip(machines, results):
        assert machine.returncode == 0, f"STDOUT:\n{stdout[-2000:]}\nSTDERR:\n{stderr[-3000:]}"
    assert "2 processes (1 on this machine), DDP" in results[0][0]
    assert "wall time" in results[0][0] and "wall time" not in results[1][0]  # machine 1 runs rank 1: silent
    assert (out / ADAPTER / "adapter_model.safetensors").is_file() and (out / "report.md").is_file()


# ---------------------------------------------------------------------------- decisions, without launching

LLAMA2_70B = LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                         num_key_value_heads=8, vocab_size=32000)
GPU = Runtime("cuda:0", torch.bfloat16, "test")
GiB = 2**30


def test_cpu_threads_share_the_cores_unless_set(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # what torchrun and accelerate launch export by default
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    cfg = parse_config([])
    plan = lambda c, world: plan_performance(c, GPU, LLAMA2_70B, free_bytes=140 * GiB, world_size=world, cpus=32)  # noqa: E731
    assert plan(cfg, 2).cpu_threads == 16
    assert plan(cfg, 1).cpu_threads is None  # one process: torch's own default
    assert plan(parse_config(["--cpu_threads", "3"]), 2).cpu_threads == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "6")
    chosen = plan(cfg, 2)
    assert chosen.cpu_threads == 6 and any("OMP_NUM_THREADS" in note for note in chosen.notes)


def test_fsdp_plans_with_a_shard_of_the_weights():
    """70B in 4 bits (~36 GiB) cannot sit whole on a 40 GiB card next to its activations; half of it can."""
    whole = weight_bytes(LLAMA2_70B, True, False)
    sharded = per_process_weight_bytes(LLAMA2_70B, True, False, False, shards=2)
    assert whole > 34 * GiB and 17 * GiB < sharded < 22 * GiB
    cfg = parse_config([])
    alone = plan_performance(cfg, GPU, LLAMA2_70B, free_bytes=40 * GiB, world_size=2, sharded=False, cpus=2)
    fsdp = plan_performance(cfg, GPU, LLAMA2_70B, free_bytes=40 * GiB, world_size=2, sharded=True, cpus=2)
    assert any("little GPU memory" in note for note in alone.notes)
    assert fsdp.micro_batch * fsdp.accumulation == 4 and not fsdp.dequantize
    assert any(note.startswith("auto: 4 rows per forward pass") for note in fsdp.notes), fsdp.notes
    roomy = plan_performance(cfg, GPU, LLAMA2_70B, free_bytes=140 * GiB, world_size=2, sharded=True, cpus=2)
    assert not roomy.dequantize and any("FSDP: frozen weights stay 4-bit" in note for note in roomy.notes)


def test_fsdp_refuses_float32_frozen_weights():
    with pytest.raises(PlanError, match="fp32_frozen_weights=True cannot run under FSDP"):
        plan_performance(parse_config(["--fp32_frozen_weights", "True"]), GPU, LLAMA2_70B, free_bytes=80 * GiB,
                         world_size=2, sharded=True, cpus=2)


def test_fsdp_stores_4bit_values_in_the_compute_dtype_and_loads_4bit_checkpoints_on_the_cpu():
    cfg = parse_config([])
    assert build_bnb_config(cfg, torch.bfloat16, sharded=True).bnb_4bit_quant_storage == torch.bfloat16
    assert build_bnb_config(cfg, torch.bfloat16).bnb_4bit_quant_storage == torch.uint8
    assert placement(GPU, sharded=True, prequantized=True)[0] == {"": "cpu"}
    assert placement(GPU, sharded=True, prequantized=False)[0] == {"": "cuda:0"}
    assert placement(GPU, sharded=False, prequantized=True)[0] == {"": "cuda:0"}
    assert placement(Runtime("cpu", torch.float32, "test"), sharded=True, prequantized=True)[0] is None


def test_one_process_runs_on_main_as_it_is():
    assert parallel.on_main_process(lambda x: x + 1, 1) == 2
    with pytest.raises(KeyError):
        parallel.on_main_process(lambda: {}["missing"])
    assert parallel.max_over_processes(3.0) == 3.0 and parallel.describe() == "1 process"


def test_a_signal_delivered_twice_is_one_signal_and_a_later_one_aborts():
    """A launcher forwards the SIGTERM the machine already sent to every process: that must not abort
    the save. A person pressing Ctrl-C again, later, does abort."""
    stop = StopOnSignal().install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # the same delivery, forwarded
        assert stop.received == signal.SIGTERM
        stop._received_at -= 2 * StopOnSignal.REPEAT_WINDOW_S
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
    finally:
        stop.uninstall()


def test_a_checkpoint_written_in_4_bits_loads_to_the_same_model(tmp_path, tiny_model_dir):
    """quantize.py's checkpoint is what loading would have quantised, bit for bit, and main.py loads it
    without a quantization_config of its own (the checkpoint brings one)."""
    from config import parse_config as parse
    from model_setup import is_prequantized, load_base_model, load_model_config, resolve_runtime
    from quantize import QuantizeArgs, convert, main as quantize_main

    out = convert(QuantizeArgs(model_name=str(tiny_model_dir), out=str(tmp_path / "nf4"), compute_dtype="float32",
                               device="cpu"))
    assert (out / "model.safetensors.index.json").is_file() and (out / "tokenizer.json").is_file()
    cfg = parse(["--preset", "tiny"])
    runtime = resolve_runtime(cfg)
    at_load = load_base_model(cfg, runtime)
    converted_cfg = parse(["--preset", "tiny", "--model_name", str(out)])
    assert is_prequantized(load_model_config(converted_cfg)) and not is_prequantized(load_model_config(cfg))
    converted = load_base_model(converted_cfg, runtime)
    ids = torch.tensor([[1, 5, 9, 20, 30, 40, 7]])
    with torch.no_grad():
        assert torch.equal(at_load(ids).logits, converted(ids).logits)
    assert quantize_main(["--model_name", str(tiny_model_dir), "--out", str(out), "--device", "cpu"]) == 2  # exists


def test_quantize_interrupted_or_misnamed_leaves_nothing_and_says_what_to_do(tmp_path, tiny_model_dir, monkeypatch, capsys):
    import quantize

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(quantize, "quantize_weight", interrupted)
    args = ["--model_name", str(tiny_model_dir), "--out", str(tmp_path / "nf4"), "--device", "cpu", "--compute_dtype", "float32"]
    assert quantize.main(args) == 130
    assert "nothing was written to --out" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # neither --out nor its staging folder
    assert quantize.main(["--model_name", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--device", "cpu"]) == 2
    assert "does not exist" in capsys.readouterr().err and list(tmp_path.iterdir()) == []


def test_benchmark_random_4bit_checkpoint_loads_as_a_quantised_model(tmp_path):
    """benchmark_parallel's 70B/13B stand-ins: a 4-bit checkpoint of random weights, written through
    quantize.py's writer, that from_pretrained reads as a bitsandbytes model with the given shape."""
    from transformers import AutoModelForCausalLM

    from benchmark_parallel import build_random_4bit

    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=128)
    folder = build_random_4bit(tmp_path / "nf4", shape, tokenizer_dir=None, device="cpu")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert type(q_proj).__name__ == "Linear4bit" and q_proj.weight.quant_state.nested
    assert model.model.layers[1].self_attn.k_proj.out_features == 32  # 2 KV heads of 16
    import bitsandbytes as bnb

    weight = bnb.functional.dequantize_4bit(q_proj.weight.data, q_proj.weight.quant_state)
    assert 0.01 < weight.float().std().item() < 0.03  # normal(0, 0.02), within NF4's rounding
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
    assert not (tmp_path / "nf4.partial").exists()


def test_benchmark_adapter_check_reproduces_the_runs_held_out_loss(tiny_run):
    """The FSDP adapter check: the saved adapter, loaded with plain PEFT in a fresh process, gives the
    held-out loss the run measured on its trained model. Here on a one-process run, where it is exact;
    an adapter saved without its trained weights would give the base model's loss instead."""
    from benchmark_parallel import held_out_loss_of_saved_adapter

    out, _ = tiny_run
    check = held_out_loss_of_saved_adapter(out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert check["rows"] == metrics["held_out_rows"] > 0
    assert check["plain_peft_eval_loss"] == pytest.approx(metrics["eval_loss_after"], abs=1e-4)
    assert abs(check["plain_peft_eval_loss"] - metrics["eval_loss_before"]) > 1e-3  # the trained weights, not the base


def test_fsdp_launch_without_a_gpu_is_a_clear_error(monkeypatch):
    """accelerate's FSDP would fail deep inside the Trainer, after the model loaded (seen on this CPU)."""
    from config import parse_config
    from model_setup import SetupError, resolve_runtime

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(SetupError, match="FSDP config .* no CUDA GPU .* torchrun --nproc_per_node N main.py"):
        resolve_runtime(parse_config(["--preset", "tiny"]), cuda_available=False)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    assert resolve_runtime(parse_config(["--preset", "tiny"]), cuda_available=False).device == "cpu"


FSDP_SAVE_SCRIPT = """
import sys, torch, torch.distributed as dist
sys.path.insert(0, {project!r})
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils.other import fsdp_auto_wrap_policy
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from transformers import AutoModelForCausalLM, AutoTokenizer
import config, training

dist.init_process_group("gloo")
def base():
    return AutoModelForCausalLM.from_pretrained({model!r}, dtype=torch.float32)
torch.manual_seed(0)
model = get_peft_model(base(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
sharded = FSDP(model, auto_wrap_policy=fsdp_auto_wrap_policy(model), use_orig_params=True, device_id=torch.device("cpu"))
optimizer = torch.optim.AdamW([p for p in sharded.parameters() if p.requires_grad], lr=1e-2)
ids = torch.tensor([[1, 5, 9, 20, 30, 40, 7, 8]])
for _ in range(3):  # every LoRA matrix moves away from its start (B from 0)
    sharded(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
with torch.no_grad():
    trained_logits = sharded(input_ids=ids).logits
trainer = type("Trainer", (), dict(is_fsdp_enabled=True, model_wrapped=sharded))()
weights = training.gathered_adapter_weights(trainer)
if dist.get_rank() == 0:
    cfg = config.parse_config(["--preset", "tiny", "--output_dir", {out!r}])
    adapter = training.save_adapter(model, AutoTokenizer.from_pretrained({model!r}), cfg, state_dict=weights)
    reloaded = PeftModel.from_pretrained(base(), str(adapter)).eval()
    with torch.no_grad():
        difference = (reloaded(input_ids=ids).logits - trained_logits).abs().max().item()
        untrained = (base()(input_ids=ids).logits - trained_logits).abs().max().item()
    print("saved", len(weights), "difference", difference, "untrained", untrained)
else:
    assert weights == {{}}
dist.destroy_process_group()
"""


def test_an_fsdp_trained_adapter_reloads_with_plain_peft_to_the_trained_logits(tmp_path, tiny_model_dir):
    """Under FSDP each process holds a shard of every LoRA matrix. The adapter is saved from them,
    gathered whole one FSDP unit at a time, and loads with plain PEFT onto the base to exactly the
    logits of the sharded, trained model. Here FSDP shards a tiny PEFT model over two CPU processes
    (gloo) as the Trainer does on GPUs (PEFT's wrapping policy, use_orig_params). On 2 H200s the first
    version of this saved an empty adapter file: PEFT matched no weight under FSDP's module names."""
    script = tmp_path / "fsdp_save.py"
    script.write_text(FSDP_SAVE_SCRIPT.format(project=str(PROJECT_DIR), model=str(tiny_model_dir), out=str(tmp_path / "out")))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), str(script)], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    words = proc.stdout.split()
    saved, difference, untrained = int(words[1]), float(words[3]), float(words[5])
    assert saved == 8  # 2 layers x (q, v) x (A, B)
    assert difference < 1e-5 < untrained


MAPPED_LOAD_SCRIPT = """
import re, sys, torch
sys.path.insert(0, {project!r})
from transformers import AutoModelForCausalLM
from model_setup import Runtime, placement

def anonymous_mib():  # memory this process owns (not file pages it maps, which processes share)
    return int(re.search(r"Anonymous:\\s+(\\d+)", open("/proc/self/smaps_rollup").read()).group(1)) / 1024

device_map, _ = placement(Runtime("cuda:0", torch.float32, "test"), sharded=True, prequantized=True)
AutoModelForCausalLM.from_pretrained({folder!r}, dtype=torch.float32, device_map=device_map)  # warm-up: the
# first load imports bitsandbytes and the model code, ~130 MiB of this process's own memory
before = anonymous_mib()
model = AutoModelForCausalLM.from_pretrained({folder!r}, dtype=torch.float32, device_map=device_map)
print(device_map, anonymous_mib() - before)
"""


def test_fsdp_processes_map_the_4bit_checkpoint_instead_of_copying_it(tmp_path):
    """Under FSDP every process loads the 4-bit checkpoint into CPU memory before FSDP moves its shard
    to its GPU. The weights stay memory-mapped from the files (the OS keeps one copy for all the
    processes of a machine); a process that copied them would add their size in memory of its own."""
    from benchmark_parallel import build_random_4bit

    shape = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=8, vocab_size=32000, max_position_embeddings=256)
    folder = build_random_4bit(tmp_path / "nf4", shape, tokenizer_dir=None, device="cpu")
    size_mib = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**20
    script = tmp_path / "load.py"
    script.write_text(MAPPED_LOAD_SCRIPT.format(project=str(PROJECT_DIR), folder=str(folder)))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    device_map, grown_mib = proc.stdout.split("}")[0] + "}", float(proc.stdout.split("}")[1])
    assert device_map == "{'': 'cpu'}"
    assert size_mib > 100 and grown_mib < 0.2 * size_mib, (size_mib, grown_mib)
