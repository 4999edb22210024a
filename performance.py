"""How fast a run goes: micro-batch, activation checkpointing and fused kernels, chosen from the GPU.

The rows per optimizer step (per_device_train_batch_size x gradient_accumulation_steps, 1 x 8 in
the seed) fix the math. `performance_mode` only decides how those rows are split into forward
passes and how activations are kept, so every mode trains the same model up to float rounding:

- auto   : the largest micro-batch (and no checkpointing if possible) that fits the free GPU memory
- speed  : all rows of a step in one forward pass, no checkpointing (needs memory)
- memory : all rows of a step in one forward pass, with checkpointing (measured leaner *and* 7x
           faster than the seed's one row per pass: the frozen weights dominate the peak)
- manual : exactly the batch/accumulation/checkpointing fields as set

    plan = plan_performance(cfg, runtime, model_config)      # before the model is loaded
    cfg = apply_plan(cfg, plan)
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass

from config import Config

# Activation bytes per token per (layer x hidden) unit, fitted to peaks measured on the Llama-2-7B
# shape with NF4 + LoRA q/v, bf16, 8 rows of up to 256 tokens (BENCHMARKS.md: 11.5 GiB without
# checkpointing, 5.0 GiB with): without checkpointing every layer keeps its attention/MLP
# intermediates; with it, one bf16 hidden state per layer plus one layer's recompute buffers.
ACT_BYTES_NO_CKPT = 26
ACT_BYTES_CKPT = 3
LOGIT_BYTES_PER_VOCAB = 12  # fp32 logits, their softmax and gradient (without a fused loss kernel)
SAFETY = 0.85  # leave 15% of the free memory for fragmentation and the allocator's cache


@dataclass
class Plan:
    micro_batch: int
    accumulation: int
    checkpointing: bool
    use_liger: bool
    reason: str
    optim: str = ""
    dequantize: bool = False


def liger_available(runtime) -> tuple[bool, str]:
    if not runtime.is_cuda:
        return False, "liger kernels off: they need a CUDA GPU (Triton)"
    if importlib.util.find_spec("liger_kernel") is None:
        return False, "liger kernels off: liger-kernel is not installed (pip install liger-kernel)"
    return True, "liger kernels on (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy)"


def matmul_params(model_config) -> int:
    h, L = model_config.hidden_size, model_config.num_hidden_layers
    kv = model_config.num_key_value_heads * (h // model_config.num_attention_heads)
    return L * (2 * h * h + 2 * h * kv + 3 * h * model_config.intermediate_size)


def weight_bytes(model_config, quantized: bool, fp32_frozen: bool) -> float:
    h, v = model_config.hidden_size, model_config.vocab_size
    matmul = matmul_params(model_config)
    per_weight = 0.53 if quantized else 2  # NF4: 4 bits + absmax per 64 values
    embed_and_head = 2 * v * h * (4 if fp32_frozen else 2)
    return matmul * per_weight + embed_and_head + 1.0 * 2**30  # + ~1 GiB for the CUDA context and LoRA state


def activation_bytes(model_config, tokens: int, checkpointing: bool, fused_loss: bool) -> float:
    unit = model_config.num_hidden_layers * model_config.hidden_size
    per_token = unit * (ACT_BYTES_CKPT if checkpointing else ACT_BYTES_NO_CKPT)
    logits = 0 if fused_loss else LOGIT_BYTES_PER_VOCAB * model_config.vocab_size
    return tokens * (per_token + logits)


def layouts(rows_per_step: int) -> list[tuple[int, bool]]:
    """(micro_batch, checkpointing) from the fastest to the leanest, all with the same rows per step.

    Rough speed model: a forward pass of fewer than ~8 rows leaves the GPU partly idle, and
    checkpointing recomputes the forward pass (about 25% more work per step).
    """
    sizes = [m for m in (64, 32, 16, 8, 4, 2, 1) if rows_per_step % m == 0 and m <= rows_per_step]
    candidates = [(m, ckpt) for m in sizes for ckpt in (False, True)]
    return sorted(candidates, key=lambda c: (min(c[0], 8) / 8 * (0.75 if c[1] else 1.0), c[0]), reverse=True)


def plan_performance(cfg: Config, runtime, model_config, free_bytes: float | None = None,
                     resumed_micro_batch: int | None = None) -> Plan:
    """Decide micro-batch, checkpointing, kernels and optimizer for this run, and say why."""
    plan = plan_layout(cfg, runtime, model_config, free_bytes, resumed_micro_batch)
    plan.optim, why = optimizer_for(cfg, runtime)
    plan.reason += why
    plan.dequantize, why = dequantize_for(cfg, runtime, model_config, plan, free_bytes)
    plan.reason += why
    return plan


def dequantize_for(cfg: Config, runtime, model_config, plan: Plan, free_bytes: float | None) -> tuple[bool, str]:
    """Keep the frozen weights dequantised when the memory allows: the same values, no per-use
    dequantisation (measured 1.46x the plain-best tokens/s on the 7B shape, BENCHMARKS.md)."""
    if cfg.performance_mode == "manual" or not runtime.is_cuda or not cfg.use_4bit:
        return cfg.dequantize_frozen, ""
    if cfg.performance_mode == "memory":
        return False, ""
    if free_bytes is None:
        import torch

        free_bytes = torch.cuda.mem_get_info(runtime.device)[0]
    extra = matmul_params(model_config) * (2 - 0.53)  # bf16 copy instead of NF4
    need = weight_bytes(model_config, True, cfg.fp32_frozen_weights) + extra + activation_bytes(
        model_config, plan.micro_batch * cfg.max_seq_length, plan.checkpointing, fused_loss=plan.use_liger)
    if need <= free_bytes * SAFETY:
        return True, f"; frozen weights kept dequantised (+{extra / 2**30:.1f} GiB, fits)"
    return False, "; frozen weights dequantised at each use (a dequantised copy would not fit)"


def plan_layout(cfg: Config, runtime, model_config, free_bytes: float | None,
                resumed_micro_batch: int | None) -> Plan:
    rows = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
    liger, liger_reason = liger_available(runtime) if cfg.use_liger_kernel else (False, "liger kernels off (use_liger_kernel=False)")
    if resumed_micro_batch and cfg.performance_mode != "manual" and rows % resumed_micro_batch == 0:
        return Plan(resumed_micro_batch, rows // resumed_micro_batch, cfg.gradient_checkpointing or resumed_micro_batch == 1,
                    liger, f"resumed: {resumed_micro_batch} rows per forward pass as in the checkpoint; {liger_reason}")
    if cfg.performance_mode == "manual" or not runtime.is_cuda:
        why = "manual" if cfg.performance_mode == "manual" else "CPU: layout as configured"
        return Plan(cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps, cfg.gradient_checkpointing,
                    liger, f"{why}; {liger_reason}")
    if cfg.performance_mode == "speed":
        return Plan(rows, 1, False, liger, f"speed: {rows} rows per forward pass, no checkpointing; {liger_reason}")
    if cfg.performance_mode == "memory":
        return Plan(rows, 1, True, liger, f"memory: {rows} rows per forward pass, checkpointing; {liger_reason}")
    if free_bytes is None:
        import torch

        free_bytes = torch.cuda.mem_get_info(runtime.device)[0]
    budget = free_bytes * SAFETY - weight_bytes(model_config, cfg.use_4bit, cfg.fp32_frozen_weights)
    for micro, ckpt in layouts(rows):
        need = activation_bytes(model_config, micro * cfg.max_seq_length, ckpt, fused_loss=liger)
        if need <= budget:
            return Plan(micro, rows // micro, ckpt, liger,
                        f"auto: {micro} rows per forward pass x {rows // micro} accumulation, checkpointing "
                        f"{'on' if ckpt else 'off'} (needs ~{need / 2**30:.1f} of {budget / 2**30:.1f} GiB left "
                        f"for activations); {liger_reason}")
    return Plan(1, rows, True, liger, f"auto: little memory free ({free_bytes / 2**30:.1f} GiB), the leanest layout; {liger_reason}")


def optimizer_for(cfg: Config, runtime) -> tuple[str, str]:
    """Paged AdamW guards against memory spikes of a large optimizer state; LoRA's is tiny
    (16.8M parameters x 8 bytes = 0.13 GiB for the 7B default), so on a GPU the same AdamW update
    runs as one fused kernel instead."""
    if cfg.performance_mode != "manual" and runtime.is_cuda and cfg.optim == "paged_adamw_32bit":
        return "adamw_torch_fused", "; AdamW fused (same update as paged_adamw_32bit)"
    return cfg.optim, ""


def apply_plan(cfg: Config, plan: Plan) -> Config:
    return dataclasses.replace(cfg, per_device_train_batch_size=plan.micro_batch,
                               gradient_accumulation_steps=plan.accumulation,
                               gradient_checkpointing=plan.checkpointing, use_liger_kernel=plan.use_liger,
                               optim=plan.optim or cfg.optim, dequantize_frozen=plan.dequantize)
