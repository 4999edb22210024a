"""Supervised fine-tuning with TRL's SFTTrainer, fed from the Config.

    trainer = build_trainer(model, tokenizer, train_rows, eval_rows, cfg, runtime)
    summary = run_training(trainer)                 # progress bar, one loss line per log step
    adapter_dir = save_adapter(trainer.model, tokenizer, cfg)

The datasets come pre-tokenized from data_preparation.py (input_ids + labels), so SFTTrainer only
truncates, batches and trains; what carries a loss is decided in one place.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import math
import os
import shutil
import signal
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

import parallel
from config import Config, save_config
from model_setup import Runtime, count_parameters, keep_adapter_fp32

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and what to change."""


class NonFiniteLoss(TrainingError):
    """A loss became NaN or infinite (in one process of several, possibly only in that one)."""


@dataclass
class TrainSummary:
    wall_time_s: float
    train_tokens: int
    tokens_per_second: float
    peak_memory_gib: float
    peak_memory_kind: str  # "GPU allocated" or "process RSS"
    final_train_loss: float | None
    global_step: int
    trainable_params: int
    total_params: int
    processes: int = 1  # tokens and tokens/s count all of them; peak memory is the largest of one process


def report_to(cfg: Config) -> list[str]:
    """TensorBoard as the seed, unless the package is missing: then one warning and no logger."""
    if cfg.report_to == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        warnings.warn("tensorboard is not installed, so no TensorBoard logs are written (pip install tensorboard); training goes on")
        return ["none"]
    return [cfg.report_to]


def build_sft_config(cfg: Config, runtime: Runtime, has_eval: bool):
    from trl import SFTConfig

    eval_strategy = "no"
    if has_eval:
        eval_strategy = "steps" if cfg.eval_steps > 0 else "epoch"
    return SFTConfig(
        output_dir=cfg.output_dir,
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.per_device_eval_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        # Checkpointing is wired by model_setup.add_lora (non-reentrant); enabling it here again
        # would re-wrap the layers with the Trainer's own settings.
        gradient_checkpointing=False,
        max_grad_norm=cfg.max_grad_norm,
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        optim=cfg.optim,
        lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_ratio,  # a float < 1 is a ratio of the total steps (transformers 5)
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        # Rows arrive tokenized and cut to max_seq_length (data_preparation); padding-free batches
        # are one concatenated row, which TRL would otherwise cut to max_length as a whole.
        max_length=None if cfg.padding_free else cfg.max_seq_length,
        packing=cfg.packing,
        padding_free=bool(cfg.padding_free),
        pad_to_multiple_of=cfg.pad_to_multiple_of if (cfg.pad_to_multiple_of or 1) > 1 else None,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        eval_strategy=eval_strategy,
        eval_steps=cfg.eval_steps if cfg.eval_steps > 0 else None,
        save_strategy="steps" if cfg.save_steps > 0 else "no",
        save_steps=cfg.save_steps if cfg.save_steps > 0 else 500,
        save_total_limit=cfg.save_total_limit,
        report_to=report_to(cfg),
        seed=cfg.seed,
        bf16=runtime.is_cuda and runtime.compute_dtype == torch.bfloat16,
        fp16=runtime.is_cuda and runtime.compute_dtype == torch.float16,
        use_cpu=not runtime.is_cuda,
        use_liger_kernel=cfg.use_liger_kernel and runtime.is_cuda,
        include_num_input_tokens_seen="non_padding",
        # Several processes (DDP): every LoRA weight takes part in every step, so DDP need not search
        # the graph for unused ones each step (the Trainer's default when its own checkpointing is off).
        ddp_find_unused_parameters=False,
        logging_nan_inf_filter=False,  # a NaN must surface, not be averaged away
        dataset_kwargs={"skip_prepare_dataset": False},
        disable_tqdm=False,
    )


def format_log_line(logs: dict, step: int, max_steps: int, epoch: float | None) -> str | None:
    """One fixed-format line for a logging step, or None when the log holds no loss."""
    parts = [f"step {step:>5}/{max_steps}", f"epoch {epoch or 0:5.2f}"]
    for key, fmt in (("loss", "loss {:.4f}"), ("eval_loss", "eval_loss {:.4f}"),
                     ("grad_norm", "grad_norm {:.3f}"), ("learning_rate", "lr {:.2e}")):
        if isinstance(logs.get(key), (int, float)):
            parts.append(fmt.format(logs[key]))
    return " | ".join(parts) if len(parts) > 2 else None


class ProgressWithLossLines(ProgressCallback):
    """The Trainer's progress bar, printing one readable line per log instead of a raw dict."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero:
            return
        line = format_log_line(logs or {}, state.global_step, state.max_steps, state.epoch)
        if line is None:
            return
        if self.training_bar is not None:
            self.training_bar.write(line)
        else:
            print(line)


class StopOnNonFiniteLoss(TrainerCallback):
    """Stop at the first NaN/inf loss instead of training on garbage."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in ("loss", "eval_loss"):
            value = (logs or {}).get(key)
            if isinstance(value, float) and not math.isfinite(value):
                raise NonFiniteLoss(non_finite_message(key, value, state.global_step, args))


def non_finite_message(what: str, value: float, step: int, args) -> str:
    precision = "fp16" if args.fp16 else "bf16" if args.bf16 else "fp32"
    return (
        f"{what} became {value} at step {step}; stopped so as not to train on garbage. Likely causes: "
        f"fp16 overflow (compute is {precision}; use --bnb_4bit_compute_dtype auto or bfloat16 on a GPU that has it), "
        f"or a learning rate too high (learning_rate={args.learning_rate}; try half of it)."
    )


def guarded_trainer_class():
    """SFTTrainer that stops at the first non-finite training loss, naming the step."""
    from transformers.trainer_pt_utils import LengthGroupedSampler
    from trl import SFTTrainer

    class GuardedSFTTrainer(SFTTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            # The Trainer itself syncs on this check every micro-step (its NaN filter), so it is free.
            if not torch.isfinite(loss):
                raise NonFiniteLoss(non_finite_message("training loss", loss.item(), self.state.global_step + 1, self.args))
            return loss

        def _get_train_sampler(self, *args, **kwargs):
            # Length grouping sizes its groups from the rows of a step; the Trainer counts those per
            # process. Counted over all processes, N processes get the order one process gets, and as
            # each takes every N-th forward pass of it, every step trains on the same rows as one process.
            sampler = super()._get_train_sampler(*args, **kwargs)
            if isinstance(sampler, LengthGroupedSampler):
                sampler.batch_size *= self.args.world_size
            return sampler

    return GuardedSFTTrainer


class StopOnSignal(TrainerCallback):
    """Ctrl-C / SIGTERM: finish the current step, write a checkpoint, stop; a second signal aborts at once.

    With several processes the signal may reach one of them, or each at a different moment: at the end
    of every step they agree (the highest signal number any of them received), so all stop after the
    same step, write one checkpoint together and leave no process waiting for the others forever.
    """

    # The same signal twice within this many seconds is one delivery seen twice (a launcher forwarding
    # what the machine already sent to every process), not a person pressing Ctrl-C again.
    REPEAT_WINDOW_S = 1.0

    def __init__(self):
        self.received: int | None = None
        self._received_at = 0.0
        self._previous = {}

    def install(self) -> "StopOnSignal":
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame):
        if self.received is not None:
            if signum == self.received and time.monotonic() - self._received_at < self.REPEAT_WINDOW_S:
                return
            self.uninstall()  # asked twice: the user means it
            raise KeyboardInterrupt
        self.received, self._received_at = signum, time.monotonic()
        print(f"\n{signal.Signals(signum).name} received: stopping after this step and saving (again to abort at once)", flush=True)

    def on_step_end(self, args, state, control, **kwargs):
        agreed = int(parallel.max_over_processes(self.received or 0, str(args.device)))
        if agreed and self.received is None:  # another process was signalled
            self.received = agreed
            print(f"\n{signal.Signals(agreed).name} received by another process: stopping after this step and saving", flush=True)
        if self.received is not None:
            control.should_save = True  # a resumable checkpoint of exactly this step
            control.should_training_stop = True


def build_trainer(model, tokenizer, train_rows, eval_rows, cfg: Config, runtime: Runtime, callbacks=()):
    trainer = guarded_trainer_class()(
        model=model,
        args=build_sft_config(cfg, runtime, has_eval=eval_rows is not None),
        train_dataset=train_rows,
        eval_dataset=eval_rows,
        processing_class=tokenizer,
        callbacks=[StopOnNonFiniteLoss(), *callbacks],
    )
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(ProgressWithLossLines())
    keep_tensorboard_in_output_dir(trainer, cfg.output_dir)
    keep_adapter_fp32(trainer.model)  # undo TRL's bf16 cast of the LoRA weights (see model_setup)
    if trainer.is_fsdp_enabled:
        wrap_for_fsdp_qlora(trainer)
    return trainer


def wrap_for_fsdp_qlora(trainer) -> None:
    """FSDP settings for 4-bit weights with a LoRA adapter, set before anything wraps the model.

    The Trainer applies them itself only when training starts; the held-out evaluation before training
    would already have wrapped the model with the launch config's plain policy. PEFT's policy gives
    every LoRA matrix its own FSDP unit (its float32 weights apart from the frozen compute-dtype ones)
    and each decoder layer one more; the mixed precision follows bnb_4bit_quant_storage.
    """
    from transformers.distributed.fsdp import update_fsdp_plugin_peft

    update_fsdp_plugin_peft(trainer.model, trainer.accelerator)


def keep_tensorboard_in_output_dir(trainer, output_dir: str) -> None:
    """The TensorBoard callback picks its folder only when training starts; an evaluation before
    that (the base model's held-out loss) would otherwise write to ./runs in the working directory."""
    from transformers.integrations import TensorBoardCallback
    from transformers.integrations.integration_utils import default_logdir

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback) and callback.logging_dir is None:
            callback.logging_dir = str(Path(output_dir) / default_logdir())


def peak_memory(runtime: Runtime) -> tuple[float, str]:
    if runtime.is_cuda:
        return torch.cuda.max_memory_allocated() / 2**30, "GPU allocated"
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "process RSS"  # ru_maxrss is KiB on Linux


def run_training(trainer, runtime: Runtime, resume_from: str | None = None) -> TrainSummary:
    let_training_wrap(trainer)
    trainable, total = count_parameters(trainer.model)
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume_from)
    wall = time.perf_counter() - start
    tokens = int(trainer.state.num_input_tokens_seen - getattr(trainer, "_initial_num_input_tokens_seen", 0))
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    peak, kind = peak_memory(runtime)
    peak = parallel.max_over_processes(peak, runtime.device)  # the tokens are already counted over all of them
    return TrainSummary(
        wall_time_s=wall,
        train_tokens=tokens,
        tokens_per_second=tokens / wall if wall > 0 else 0.0,
        peak_memory_gib=peak,
        peak_memory_kind=kind,
        final_train_loss=losses[-1] if losses else result.training_loss,
        global_step=trainer.state.global_step,
        trainable_params=trainable,
        total_params=total,
        processes=parallel.world_size(),
    )


def let_training_wrap(trainer) -> None:
    """Undo accelerate's mark on a model evaluated before training (the base model's held-out loss).

    It marks the model prepared without wrapping it in DistributedDataParallel (no gradients to
    share in an evaluation), and train() then refuses to wrap it: every process would train its own
    copy on its own rows, silently, while the logged loss (averaged over the processes) looks right.
    """
    model = trainer.model
    if parallel.world_size() > 1 and not trainer.is_fsdp_enabled and trainer.model_wrapped is model:
        model._is_accelerate_prepared = False
        if model in trainer.accelerator._models:
            trainer.accelerator._models.remove(model)


def format_parameter_counts(model) -> str:
    trainable, total = count_parameters(model)
    return f"trainable params: {trainable:,} / {total:,} ({100 * trainable / total:.3f}%)"


def format_summary(summary: TrainSummary) -> str:
    loss = "n/a" if summary.final_train_loss is None else f"{summary.final_train_loss:.4f}"
    return (
        f"wall time {summary.wall_time_s:.1f} s | {summary.global_step} steps | "
        f"{summary.train_tokens:,} tokens at {summary.tokens_per_second:,.0f} tokens/s | "
        f"peak memory {summary.peak_memory_gib:.2f} GiB ({summary.peak_memory_kind}{per_process(summary)}) | "
        f"final train loss {loss}"
    )


def per_process(summary: TrainSummary) -> str:
    return f", the most of {summary.processes} processes" if summary.processes > 1 else ""


def adapter_dir(cfg: Config) -> Path:
    return Path(cfg.output_dir) / cfg.new_model


def gathered_adapter_weights(trainer) -> dict | None:
    """Under FSDP every process holds a shard of each LoRA matrix: gather them whole into the main
    process's CPU memory (the frozen 4-bit weights stay where they are). None when the model is
    whole in this process (one process, or DDP), where save_pretrained reads it directly.
    Every process must call this: the gathering is collective."""
    if not getattr(trainer, "is_fsdp_enabled", False):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    return get_model_state_dict(trainer.model_wrapped, options=options)


def save_trained_adapter(trainer, tokenizer, cfg: Config) -> Path:
    """The trained adapter, written once by the main process (under FSDP from the weights every process
    helped gather); every process returns its folder, or raises the main process's error."""
    weights = gathered_adapter_weights(trainer)
    model = trainer.accelerator.unwrap_model(trainer.model)
    return parallel.on_main_process(save_adapter, model, tokenizer, cfg, state_dict=weights)


def save_adapter(model, tokenizer, cfg: Config, target: Path | None = None, state_dict: dict | None = None) -> Path:
    """Write adapter + tokenizer + the config used, atomically.

    Everything goes to a temporary sibling folder first and replaces the target only once
    complete, so a crash or a full disk never leaves a half-written adapter, and an earlier adapter
    survives a failed save.
    """
    target = Path(target or adapter_dir(cfg))
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.saving")
    previous = target.with_name(f".{target.name}.previous")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        model.save_pretrained(staging, safe_serialization=True, state_dict=state_dict)
        tokenizer.save_pretrained(staging)
        save_config(cfg, staging / "run_config.json")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(previous, ignore_errors=True)
    if target.exists():
        os.replace(target, previous)
    os.replace(staging, target)  # same folder, so a rename: never half done
    shutil.rmtree(previous, ignore_errors=True)
    return target


def free_memory() -> None:
    """Return cached GPU memory and Python garbage before inference, as the seed does."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def summary_dict(summary: TrainSummary) -> dict:
    return asdict(summary)


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str), encoding="utf-8")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------- output folder and resuming

RUN_MARKERS = ("metrics.json", "report.md", "trainer_state.json")


def existing_run_files(cfg: Config) -> list[str]:
    """What in output_dir belongs to an earlier run (checkpoints, adapter, report)."""
    out = Path(cfg.output_dir)
    if not out.is_dir():
        return []
    found = sorted(p.name for p in out.glob("checkpoint-*"))
    found += [name for name in RUN_MARKERS if (out / name).exists()]
    if adapter_dir(cfg).exists():
        found.append(cfg.new_model)
    return found


def latest_checkpoint(output_dir: str) -> Path | None:
    from transformers.trainer_utils import get_last_checkpoint

    if not Path(output_dir).is_dir():
        return None
    last = get_last_checkpoint(output_dir)
    return Path(last) if last else None


def prepare_output_dir(cfg: Config) -> Path | None:
    """Check output_dir before anything heavy loads; returns the checkpoint to resume from, if any.

    A run never replaces an earlier run's files unless --overwrite is given; --resume continues one.
    """
    if cfg.resume:
        checkpoint = latest_checkpoint(cfg.output_dir) if cfg.resume == "latest" else Path(cfg.resume)
        if checkpoint is None:
            raise TrainingError(f"--resume latest: no checkpoint-* folder in {cfg.output_dir}; start a fresh run without --resume")
        if not (checkpoint / "trainer_state.json").is_file():
            raise TrainingError(f"--resume {cfg.resume}: {checkpoint} is not a checkpoint folder (no trainer_state.json)")
        return checkpoint
    existing = existing_run_files(cfg)
    if existing and not cfg.overwrite:
        raise TrainingError(
            f"{cfg.output_dir} already holds a run ({', '.join(existing[:6])}); nothing was changed. "
            "Continue it with --resume latest, replace it with --overwrite, or pick another --output_dir"
        )
    if existing:  # --overwrite: old checkpoints would confuse a later --resume latest
        for old in Path(cfg.output_dir).glob("checkpoint-*"):
            shutil.rmtree(old)
    return None


def micro_batch_of(checkpoint: Path | None) -> int | None:
    """The rows per forward pass a checkpoint was trained with: a resumed run must keep it so that
    the data position (counted in forward passes) lands on the same rows."""
    if checkpoint is None:
        return None
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text(encoding="utf-8"))
    return state.get("train_batch_size")


class OutOfMemory(TrainingError):
    """CUDA ran out of memory; the message names the values that ran and what to lower."""


def out_of_memory_message(cfg: Config) -> str:
    """`cfg` is the Config that ran (after performance.apply_plan), so the values named are the real ones."""
    return (
        f"CUDA ran out of memory with per_device_train_batch_size={cfg.per_device_train_batch_size}, "
        f"gradient_checkpointing={cfg.gradient_checkpointing}, dequantize_frozen={cfg.dequantize_frozen}, "
        f"max_seq_length={cfg.max_seq_length}. Lower memory, in this order: --dequantize_frozen False, "
        "--gradient_checkpointing True, a smaller --per_device_train_batch_size (the accumulation follows, so the rows "
        "per step stay), a smaller --max_seq_length; or --performance_mode memory for the leanest layout. "
        "Also check that no other process holds GPU memory (nvidia-smi)."
    )
