"""Every speed and memory decision of a run, made in one place before the model loads.

`rows_per_step` (the seed's batch 1 x accumulation 8) fixes the math of an optimizer step. What is
decided here only changes how those rows are computed: how many go through one forward pass,
whether activations are recomputed, which kernels run, how batches are padded. Every choice
trains the same model up to float rounding (tests/test_same_math.py).

A field you set, in config.py or with a flag, is what runs. Only the fields left at None (or
`optim="auto"`) are chosen, following `performance_mode`:

- auto   : the fastest layout that fits the free GPU memory
- speed  : the fastest layout, whatever the memory (all rows of a step in one pass, no recomputation)
- memory : the leanest layout (all rows in one pass, with recomputation: measured leaner *and*
           faster than the seed's one row per pass, as the frozen weights dominate the peak)

    plan = plan_performance(cfg, runtime, model_config)    # before the model loads
    print(format_plan(plan))                                # each choice, and why
    cfg = apply_plan(cfg, plan)                             # a Config in which every field is concrete

Everything downstream (model_setup, training, the out-of-memory message) reads only that Config.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from dataclasses import dataclass, field

from config import Config

# Activation bytes per token per (layer x hidden) unit, fitted to peaks measured on the Llama-2-7B
# shape with NF4 + LoRA q/v, bf16, 8 rows of up to 256 tokens (BENCHMARKS.md: 11.5 GiB without
# checkpointing, 5.0 GiB with): without checkpointing every layer keeps its attention/MLP
# intermediates; with it, one bf16 hidden state per layer plus one layer's recompute buffers.
ACT_BYTES_NO_CKPT = 26
ACT_BYTES_CKPT = 3
LOGIT_BYTES_PER_VOCAB = 12  # fp32 logits, their softmax and gradient (without a fused loss kernel)
SAFETY = 0.85  # leave 15% of the free memory for fragmentation and the allocator's cache
NF4_BYTES_PER_WEIGHT = 0.53  # 4 bits + one absmax per 64 values

# With cuDNN attention, padding every batch to a multiple of this leaves at most 4 shapes at
# max_seq_length 256 instead of one per row length, each new shape costing a ~2 s cuDNN plan. Without
# cuDNN attention (the default) shapes cost nothing and the extra padding only costs compute
# (measured on the 7B shape, BENCHMARKS.md: 0.164 s per step without it, 0.171-0.210 s with it).
CUDNN_PAD_MULTIPLE = 64
# Padding-free batches measured slower on an H200 (0.23 s per step against 0.16-0.17 padded, BENCHMARKS.md):
# PyTorch's attention runs a block-diagonal mask over the whole concatenated sequence.
AUTO_PADDING_FREE = False


class PlanError(ValueError):
    """The speed/memory settings contradict each other or this machine; the message says what to change."""


@dataclass
class Plan:
    micro_batch: int  # rows per forward pass on each device
    accumulation: int  # forward passes per optimizer step
    world_size: int  # processes (GPUs) taking part in each step
    checkpointing: bool
    optim: str
    dequantize: bool
    pad_to_multiple_of: int
    padding_free: bool
    torch_compile: bool
    cudnn_attention: bool
    liger: bool
    cpu_threads: int | None  # torch's CPU threads in each process (None: torch's default, all cores)
    notes: list[str] = field(default_factory=list)  # one line per decision: the value, then "set" or "auto: why"

    @property
    def rows_per_step(self) -> int:
        return self.micro_batch * self.accumulation * self.world_size


# ---------------------------------------------------------------------------- memory model

def matmul_params(model_config) -> int:
    h, L = model_config.hidden_size, model_config.num_hidden_layers
    kv = model_config.num_key_value_heads * (h // model_config.num_attention_heads)
    return L * (2 * h * h + 2 * h * kv + 3 * h * model_config.intermediate_size)


def weight_bytes(model_config, quantized: bool, fp32_frozen: bool, dequantized: bool = False) -> float:
    """Frozen weights on the GPU, plus ~1 GiB for the CUDA context and the LoRA state."""
    h, v = model_config.hidden_size, model_config.vocab_size
    per_weight = NF4_BYTES_PER_WEIGHT + (2 if dequantized else 0) if quantized else 2
    embed_and_head = 2 * v * h * (4 if fp32_frozen else 2)
    return matmul_params(model_config) * per_weight + embed_and_head + 1.0 * 2**30


def activation_bytes(model_config, tokens: int, checkpointing: bool, fused_loss: bool) -> float:
    unit = model_config.num_hidden_layers * model_config.hidden_size
    per_token = unit * (ACT_BYTES_CKPT if checkpointing else ACT_BYTES_NO_CKPT)
    logits = 0 if fused_loss else LOGIT_BYTES_PER_VOCAB * model_config.vocab_size
    return tokens * (per_token + logits)


def free_gpu_bytes(runtime) -> float:
    """Free memory of this process's GPU; with several processes, the least free on any of their GPUs,
    so that every process plans the same layout and each one fits (parallel.py)."""
    import torch

    from parallel import min_over_processes

    return min_over_processes(float(torch.cuda.mem_get_info(runtime.device)[0]), runtime.device)


def per_process_weight_bytes(model_config, quantized: bool, fp32_frozen: bool, dequantized: bool, shards: int) -> float:
    """The frozen weights one process holds: all of them, or under FSDP its 1/shards of them plus the
    decoder layer being gathered (and the next, prefetched). bitsandbytes' quantisation statistics
    are not parameters, so FSDP leaves them whole on every GPU (~0.03 bytes per weight)."""
    whole = weight_bytes(model_config, quantized, fp32_frozen, dequantized)
    if shards == 1:
        return whole
    context = 1.0 * 2**30
    layer = (whole - context) / model_config.num_hidden_layers
    statistics = matmul_params(model_config) * (NF4_BYTES_PER_WEIGHT - 0.5) if quantized and not dequantized else 0
    return (whole - context - statistics) / shards + statistics + 2 * layer + context


# ---------------------------------------------------------------------------- the plan

def plan_performance(cfg: Config, runtime, model_config, free_bytes: float | None = None,
                     world_size: int | None = None, resumed_micro_batch: int | None = None,
                     sharded: bool | None = None, cpus: int | None = None) -> Plan:
    """Decide every speed/memory field that `cfg` leaves open, keep every one it sets, and say why.

    free_bytes: free GPU memory to plan with (probed when None: with several processes, the least
    over their GPUs); world_size: processes per step (WORLD_SIZE when None); resumed_micro_batch: the
    micro-batch of the checkpoint being resumed; sharded: FSDP shards the frozen weights over the
    processes (from the accelerate launch config when None); cpus: CPU cores this machine gives the
    run (probed when None).
    """
    import parallel

    world_size = world_size or parallel.world_size()
    sharded = parallel.fsdp_enabled() if sharded is None else sharded
    notes: list[str] = []
    liger = decide_liger(cfg, runtime, notes)
    check_sharding(cfg, sharded)
    micro, accumulation = split_rows(cfg, world_size, resumed_micro_batch, notes)
    if runtime.is_cuda and free_bytes is None and cfg.performance_mode == "auto":
        free_bytes = free_gpu_bytes(runtime)
        if world_size > 1:
            notes.append(f"free GPU memory: {free_bytes / 2**30:.1f} GiB, the least over the {world_size} processes' GPUs "
                         "(one plan for all)")
    shards = world_size if sharded else 1
    micro, accumulation, checkpointing = decide_layout(cfg, runtime, model_config, free_bytes, world_size,
                                                       micro, accumulation, liger, notes, shards)
    dequantize = decide_dequantize(cfg, runtime, model_config, free_bytes, micro, checkpointing, liger, notes, shards)
    return Plan(
        micro_batch=micro, accumulation=accumulation, world_size=world_size, checkpointing=checkpointing,
        optim=decide_optim(cfg, runtime, notes), dequantize=dequantize,
        pad_to_multiple_of=decide_padding(cfg, runtime, notes), padding_free=decide_padding_free(cfg, runtime, notes),
        torch_compile=decide_compile(cfg, runtime, notes), cudnn_attention=decide_cudnn(cfg, runtime, notes),
        liger=liger, cpu_threads=decide_cpu_threads(cfg, world_size, parallel.local_world_size(), cpus, notes),
        notes=notes,
    )


def check_sharding(cfg: Config, sharded: bool) -> None:
    """FSDP flattens each decoder layer's frozen weights into one tensor of one dtype: float32 norms
    next to 4-bit weights stored in the compute dtype cannot be flattened together."""
    if sharded and cfg.fp32_frozen_weights:
        raise PlanError("fp32_frozen_weights=True cannot run under FSDP (it flattens each decoder layer's frozen weights "
                        "into one tensor of one dtype); drop --fp32_frozen_weights, or launch without the FSDP config")


def split_rows(cfg: Config, world_size: int, resumed_micro_batch: int | None,
               notes: list[str]) -> tuple[int | None, int | None]:
    """(micro-batch, accumulation) as far as the user fixed them; None where auto may choose.

    Raises PlanError when the set values cannot give rows_per_step on world_size processes.
    """
    micro, accumulation = cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps
    if micro is not None and accumulation is not None:
        rows = micro * accumulation * world_size
        if rows != cfg.rows_per_step and cfg.rows_per_step != Config.rows_per_step:
            raise PlanError(
                f"per_device_train_batch_size={micro} x gradient_accumulation_steps={accumulation} x {world_size} "
                f"process(es) = {rows} rows per step, but rows_per_step={cfg.rows_per_step}; set two of the three, "
                "not all three")
        return micro, accumulation
    if cfg.rows_per_step % world_size:
        raise PlanError(f"rows_per_step={cfg.rows_per_step} cannot be shared evenly by {world_size} processes; "
                        f"use a multiple of {world_size} (e.g. --rows_per_step {world_size * max(1, cfg.rows_per_step // world_size)})")
    per_device = cfg.rows_per_step // world_size
    fixed = micro or accumulation
    if fixed is not None and per_device % fixed:
        name = "per_device_train_batch_size" if micro else "gradient_accumulation_steps"
        raise PlanError(f"{name}={fixed} does not divide the {per_device} rows per step of each process "
                        f"(rows_per_step={cfg.rows_per_step} / {world_size} process(es)); pick a divisor of {per_device}")
    if micro is not None:
        return micro, per_device // micro
    if accumulation is not None:
        return per_device // accumulation, accumulation
    if resumed_micro_batch and per_device % resumed_micro_batch == 0:
        # The data position of a checkpoint is counted in forward passes: keep its micro-batch.
        notes.append(f"{resumed_micro_batch} rows per forward pass (auto: as in the checkpoint being resumed)")
        return resumed_micro_batch, per_device // resumed_micro_batch
    return None, None


def layouts(per_device_rows: int, micro: int | None, checkpointing: bool | None) -> list[tuple[int, bool]]:
    """(micro_batch, checkpointing) candidates from the fastest to the leanest, within what is fixed.

    Rough speed model: a forward pass of fewer than ~8 rows leaves the GPU partly idle, and
    checkpointing recomputes the forward pass (about 25% more work per step).
    """
    sizes = [micro] if micro else [m for m in (64, 32, 16, 8, 4, 2, 1) if per_device_rows % m == 0]
    ckpts = [checkpointing] if checkpointing is not None else [False, True]
    candidates = [(m, c) for m in sizes for c in ckpts]
    return sorted(candidates, key=lambda c: (min(c[0], 8) / 8 * (0.75 if c[1] else 1.0), c[0]), reverse=True)


def decide_layout(cfg: Config, runtime, model_config, free_bytes: float | None, world_size: int,
                  micro: int | None, accumulation: int | None, liger: bool,
                  notes: list[str], shards: int = 1) -> tuple[int, int, bool]:
    """(micro-batch, accumulation, checkpointing): the user's values, the open ones filled."""
    per_device = micro * accumulation if micro and accumulation else cfg.rows_per_step // world_size
    checkpointing = cfg.gradient_checkpointing
    if micro is None or checkpointing is None:
        micro, checkpointing = fill_layout(cfg, runtime, model_config, free_bytes, per_device, micro, checkpointing,
                                           liger, notes, shards)
    if cfg.per_device_train_batch_size is not None or cfg.gradient_accumulation_steps is not None:
        notes.append(f"{micro} rows per forward pass x {per_device // micro} accumulation (set)")
    if cfg.gradient_checkpointing is not None:
        notes.append(f"checkpointing {'on' if checkpointing else 'off'} (set)")
    return micro, per_device // micro, checkpointing


def fill_layout(cfg: Config, runtime, model_config, free_bytes: float | None, per_device: int, micro: int | None,
                checkpointing: bool | None, liger: bool, notes: list[str], shards: int = 1) -> tuple[int, bool]:
    if not runtime.is_cuda:
        notes.append("CPU: the open layout fields keep the seed's values (1 row per forward pass, checkpointing)")
        return micro or 1, True if checkpointing is None else checkpointing
    if cfg.performance_mode in ("speed", "memory"):
        lean = cfg.performance_mode == "memory"
        notes.append(f"{cfg.performance_mode} mode: all {per_device} rows of a step in one forward pass, "
                     f"checkpointing {'on' if lean else 'off'} (where not set)")
        return micro or per_device, lean if checkpointing is None else checkpointing
    candidates = layouts(per_device, micro, checkpointing)
    budget = free_bytes * SAFETY - per_process_weight_bytes(model_config, cfg.use_4bit, cfg.fp32_frozen_weights,
                                                            False, shards)
    for m, c in candidates:
        need = activation_bytes(model_config, m * cfg.max_seq_length, c, fused_loss=liger)
        if need <= budget:
            notes.append(f"auto: {m} rows per forward pass, checkpointing {'on' if c else 'off'}: activations need "
                         f"~{need / 2**30:.1f} of the {budget / 2**30:.1f} GiB left after the weights")
            return m, c
    m, c = candidates[-1]
    notes.append(f"auto: little GPU memory free ({free_bytes / 2**30:.1f} GiB): the leanest layout "
                 f"({m} row(s) per pass, checkpointing {'on' if c else 'off'})")
    return m, c


def decide_dequantize(cfg: Config, runtime, model_config, free_bytes: float | None, micro: int,
                      checkpointing: bool, liger: bool, notes: list[str], shards: int = 1) -> bool:
    """Keep the frozen weights dequantised when memory allows: the same values, no per-use
    dequantisation (measured 1.3-1.8x the tokens/s on the 7B shape, BENCHMARKS.md)."""
    if cfg.dequantize_frozen is not None:
        if cfg.dequantize_frozen and not cfg.use_4bit:
            raise PlanError("dequantize_frozen=True needs use_4bit=True (there is nothing to dequantise); drop one")
        notes.append(f"frozen weights {'kept dequantised' if cfg.dequantize_frozen else 'dequantised at each use'} (set)")
        return cfg.dequantize_frozen
    if not runtime.is_cuda or not cfg.use_4bit or cfg.performance_mode == "memory":
        return False
    if shards > 1:
        notes.append("FSDP: frozen weights stay 4-bit (a dequantised copy is made whole on every GPU before sharding)")
        return False
    extra = matmul_params(model_config) * 2
    if cfg.performance_mode == "speed":
        notes.append(f"speed mode: frozen weights kept dequantised (+{extra / 2**30:.1f} GiB)")
        return True
    need = weight_bytes(model_config, True, cfg.fp32_frozen_weights, dequantized=True) + activation_bytes(
        model_config, micro * cfg.max_seq_length, checkpointing, fused_loss=liger)
    fits = need <= free_bytes * SAFETY
    notes.append(f"auto: frozen weights {'kept dequantised' if fits else 'dequantised at each use'} "
                 f"(a dequantised copy needs +{extra / 2**30:.1f} GiB: {'fits' if fits else 'does not fit'})")
    return fits


def decide_optim(cfg: Config, runtime, notes: list[str]) -> str:
    """LoRA's AdamW state is small (16.8M parameters x 8 bytes = 0.13 GiB for the 7B default), so
    paging it (the seed's paged_adamw_32bit) buys nothing; the same update runs fused on a GPU."""
    if cfg.optim != "auto":
        return cfg.optim
    chosen = "adamw_torch_fused" if runtime.is_cuda else "adamw_torch"
    notes.append(f"auto: optimizer {chosen} (the update of paged_adamw_32bit, {'one fused kernel' if runtime.is_cuda else 'on the CPU'})")
    return chosen


def decide_padding(cfg: Config, runtime, notes: list[str]) -> int:
    if cfg.pad_to_multiple_of is not None:
        return cfg.pad_to_multiple_of
    if runtime.is_cuda and cfg.cudnn_attention:
        notes.append(f"auto: batches padded to a multiple of {CUDNN_PAD_MULTIPLE} tokens (cuDNN attention builds a plan "
                     "for each new shape: a few shapes instead of one per length)")
        return CUDNN_PAD_MULTIPLE
    return 1


def decide_padding_free(cfg: Config, runtime, notes: list[str]) -> bool:
    if cfg.padding_free is not None:
        if cfg.padding_free and cfg.packing:
            raise PlanError("padding_free=True and packing=True both rearrange the rows of a batch; choose one")
        return cfg.padding_free
    return AUTO_PADDING_FREE and runtime.is_cuda and not cfg.packing


def decide_compile(cfg: Config, runtime, notes: list[str]) -> bool:
    """Compiled decoder layers ran 0.10-0.14 s per step against 0.16-0.17 eager on the 7B shape, after
    a one-off compile of ~85 s and a second of ~15 s when the first padded batch arrives (BENCHMARKS.md).
    That pays back after ~2,000 steps: speed mode compiles; auto does not, since the seed's recipe (10
    epochs of guanaco-1k) is ~1,100 steps."""
    if cfg.torch_compile is not None:
        return cfg.torch_compile
    chosen = runtime.is_cuda and cfg.performance_mode == "speed"
    if runtime.is_cuda:
        notes.append(f"{'speed mode' if chosen else 'auto'}: torch.compile of the decoder layers "
                     f"{'on (~1.5 min of compiling, then ~25% faster steps)' if chosen else 'off (~1.5 min of compiling pays back only after ~2,000 steps; --torch_compile True for long runs)'}")
    return chosen


def decide_cudnn(cfg: Config, runtime, notes: list[str]) -> bool:
    if cfg.cudnn_attention is not None:
        return cfg.cudnn_attention
    if runtime.is_cuda:
        notes.append("auto: cuDNN attention off (it builds a plan for every new sequence length, ~2 s each)")
    return False


def decide_liger(cfg: Config, runtime, notes: list[str]) -> bool:
    if not cfg.use_liger_kernel:
        return False
    if not runtime.is_cuda:
        raise PlanError("use_liger_kernel=True needs a CUDA GPU (its kernels are Triton); drop --use_liger_kernel here")
    if importlib.util.find_spec("liger_kernel") is None:
        raise PlanError("use_liger_kernel=True but liger-kernel is not installed: pip install liger-kernel, "
                        "or drop --use_liger_kernel")
    notes.append("liger kernels on (set): RMSNorm, RoPE, SwiGLU, fused linear cross-entropy")
    return True


def decide_cpu_threads(cfg: Config, world_size: int, local_processes: int, cpus: int | None,
                       notes: list[str]) -> int | None:
    """CPU threads per process. One process keeps torch's default (every core). With several, torchrun
    and accelerate launch export OMP_NUM_THREADS=1 unless told otherwise, and a GPU step still has CPU
    work (batching, kernel launches): on 2 x H200 that default scaled to 48%, 8 threads to 68% (issue 12).
    So the cores of this machine are shared out instead; an OMP_NUM_THREADS other than the launchers'
    1 counts as the user's choice, as does cpu_threads."""
    if cfg.cpu_threads is not None:
        notes.append(f"{cfg.cpu_threads} CPU threads per process (set)")
        return cfg.cpu_threads
    if world_size == 1:
        return None
    exported = os.environ.get("OMP_NUM_THREADS", "")
    if exported.isdigit() and int(exported) > 1:
        notes.append(f"{exported} CPU threads per process (set: OMP_NUM_THREADS)")
        return int(exported)
    cores = cpus or os.cpu_count() or 1
    threads = max(1, cores // local_processes)
    if cpus is None:  # a launcher that pins each process to a few cores (NUMA binding) has the last word
        threads = min(threads, len(os.sched_getaffinity(0)))
    notes.append(f"auto: {threads} CPU threads per process ({cores} cores, {local_processes} process(es) on this machine; "
                 "the launchers' default of 1 starves each GPU's CPU work)")
    return threads


def format_plan(plan: Plan) -> str:
    """What runs, in one line, then one line per decision."""
    head = (f"layout: {plan.rows_per_step} rows per step = {plan.micro_batch} per forward pass x "
            f"{plan.accumulation} accumulation x {plan.world_size} process(es); checkpointing "
            f"{'on' if plan.checkpointing else 'off'}; {plan.optim}")
    return "\n".join([head, *(f"  - {note}" for note in plan.notes)])


def apply_plan(cfg: Config, plan: Plan) -> Config:
    """The Config with every speed/memory field concrete: what the rest of the run reads."""
    return dataclasses.replace(
        cfg, rows_per_step=plan.rows_per_step, per_device_train_batch_size=plan.micro_batch,
        gradient_accumulation_steps=plan.accumulation, gradient_checkpointing=plan.checkpointing,
        optim=plan.optim, dequantize_frozen=plan.dequantize, pad_to_multiple_of=plan.pad_to_multiple_of,
        padding_free=plan.padding_free, torch_compile=plan.torch_compile, cudnn_attention=plan.cudnn_attention,
        use_liger_kernel=plan.liger, cpu_threads=plan.cpu_threads)
