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
from transformers.trainer_callback import ExportableState, ProgressCallback
from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices

import parallel
from config import TINY_MODEL_NAME, Config, save_config
from model_setup import Runtime, count_parameters, keep_adapter_fp32
from run_files import (SetAside, check_save_target, describe_checkpoints, is_adapter_folder,
                       replace_folder, safetensors_problem, save_failed_message)

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and what to change."""


class SaveFailed(TrainingError):
    """A checkpoint or the adapter could not be written (full disk, quota, I/O); the run can be resumed."""


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
    """SFTTrainer that stops at the first non-finite loss, replays the data order exactly on resume,
    reports a failed checkpoint save clearly, and writes no TRL model card."""
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from trl import SFTTrainer

    class GuardedSFTTrainer(SFTTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            # The Trainer itself syncs on this check every micro-step (its NaN filter), so it is free.
            if not torch.isfinite(loss):
                raise NonFiniteLoss(non_finite_message("training loss", loss.item(), self.state.global_step + 1, self.args))
            return loss

        def _get_train_sampler(self, train_dataset=None):
            # Length grouping sizes its groups from the rows of a step; the Trainer counts those per
            # process. Counted over all processes, N processes get the order one process gets, and as
            # each takes every N-th forward pass of it, every step trains on the same rows as one process.
            sampler = super()._get_train_sampler(train_dataset)
            if isinstance(sampler, LengthGroupedSampler):
                sampler.batch_size *= self.args.world_size
            return epoch_seeded(sampler, self.args)

        def _save_checkpoint(self, model, trial):
            folder = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
            existed = folder.exists()
            try:
                super()._save_checkpoint(model, trial)
            except Exception as exc:  # a full disk reaches here as OSError, RuntimeError or SafetensorError
                if not existed:
                    shutil.rmtree(folder, ignore_errors=True)  # half written: gives the room it took back
                kept = (f"{'Removed the partial' if not existed else 'Left the incomplete'} {folder.name}; "
                        f"{describe_checkpoints(self.args.output_dir)}, and the adapter from before is untouched.")
                raise SaveFailed(save_failed_message("checkpoint", folder, exc, kept)) from exc

        def create_model_card(self, *args, **kwargs):
            """TRL's card in output_dir names no base for a local model ("fine-tuned version of [None]")
            and no result; report.md is the run's card, and the adapter gets report.render_model_card's."""

    return GuardedSFTTrainer


class EpochSeededLengthGroupedSampler(LengthGroupedSampler):
    """Length-grouped order that depends on (seed, epoch) only, so a resumed run replays it exactly.

    transformers 5.23 builds its LengthGroupedSampler without a generator: every epoch's order is
    drawn from the global torch RNG, whose state by then depends on all the dropout masks drawn in
    the epochs before. A resumed run restores the RNG only at its checkpoint, so from the first
    epoch boundary after it (and in the epoch it resumes in, if that is not the first) it drew
    another order than the uninterrupted run: losses differed by up to 1.7. The Trainer calls
    set_epoch at the start of every epoch, as for accelerate's SeedableRandomSampler (the random
    strategy, which was exact already), and this order follows from it alone.
    """

    def __init__(self, batch_size: int, lengths: list[int], seed: int):
        super().__init__(batch_size, lengths=lengths)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))


def epoch_seeded(sampler, args):
    if type(sampler) is LengthGroupedSampler:
        seed = args.data_seed if args.data_seed is not None else args.seed
        return EpochSeededLengthGroupedSampler(sampler.batch_size, sampler.lengths, seed)
    return sampler


class CheckpointBookkeeping(TrainerCallback):
    """After each complete checkpoint: record the run's settings in it (run_files.shape_changes reads
    them on resume) and drop the earlier run that --overwrite set aside, since the new run now has
    something to replace it with."""

    def __init__(self, cfg: Config, earlier: SetAside | None = None):
        self.cfg, self.earlier = cfg, earlier

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            try:
                save_config(self.cfg, folder / "run_config.json")
            except OSError as exc:  # a full disk: the Trainer's part of the checkpoint is whole, this is not
                raise SaveFailed(save_failed_message("checkpoint", folder, exc, f"{folder.name} lacks its run_config.json; "
                                                     f"{describe_checkpoints(args.output_dir)}.")) from exc
        if self.earlier is not None:
            self.earlier.drop()


class TrainingClock(TrainerCallback, ExportableState):
    """Seconds spent in training and its peak memory, over every process that trained this run.

    The Trainer keeps this state in each checkpoint's trainer_state.json, so a resumed run's summary
    covers the whole run, and a finished run that is resumed only to finish its report can still
    say how fast it trained.
    """

    def __init__(self, seconds: float = 0.0, peak_memory_gib: float = 0.0):
        self.seconds, self.peak_memory_gib = seconds, peak_memory_gib
        self._since: float | None = None

    def elapsed(self) -> float:
        return self.seconds + (time.perf_counter() - self._since if self._since is not None else 0.0)

    def on_train_begin(self, args, state, control, **kwargs):
        self._since = time.perf_counter()
        # A checkpoint written before this clock existed has no slot for it, and the Trainer's save
        # would fail on the missing key.
        state.stateful_callbacks.setdefault(type(self).__name__, self.state())

    def on_step_end(self, args, state, control, **kwargs):
        self.peak_memory_gib = max(self.peak_memory_gib, peak_memory(args.device.type == "cuda")[0])

    def on_train_end(self, args, state, control, **kwargs):
        self.seconds, self._since = self.elapsed(), None

    def state(self) -> dict:
        return {"args": {"seconds": self.elapsed(), "peak_memory_gib": self.peak_memory_gib}, "attributes": {}}


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


def peak_memory(is_cuda: bool) -> tuple[float, str]:
    if is_cuda:
        return torch.cuda.max_memory_allocated() / 2**30, "GPU allocated"
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "process RSS"  # ru_maxrss is KiB on Linux


def optimizer_steps(batches_per_epoch: int, accumulation: int, epochs: float, max_steps: int) -> tuple[int, int]:
    """(optimizer steps per epoch, in the whole run), counted as transformers 5.23's Trainer does."""
    per_epoch = max(math.ceil(batches_per_epoch / accumulation), 1)
    return per_epoch, max_steps if max_steps > 0 else math.ceil(epochs * per_epoch)


def check_steps(train_rows: int, micro_batch: int, accumulation: int, processes: int, epochs: float, max_steps: int,
                warmup_ratio: float, printer=print) -> None:
    """Refuse a layout whose optimizer steps are not what the settings say, before the model loads,
    and say so when warmup takes every step (a 1-step run learns nothing at learning rate 0).

    An optimizer step never spans two epochs: with more accumulation than the forward passes of an
    epoch, each epoch made one short step instead.
    """
    batches = math.ceil(train_rows / (micro_batch * processes))
    if accumulation > batches:
        per_pass = f"{micro_batch} per pass" + (f" on each of {processes} processes" if processes > 1 else "")
        raise TrainingError(
            f"gradient_accumulation_steps={accumulation} is more than the {batches} forward passes of one epoch "
            f"({train_rows} training rows, {per_pass}): an optimizer step cannot span two epochs, so each would take "
            f"one step of {batches} passes instead. Lower gradient_accumulation_steps to at most {batches}, or train "
            "on more rows")
    _, total = optimizer_steps(batches, accumulation, epochs, max_steps)
    warmup = math.ceil(total * warmup_ratio)
    if warmup >= total:
        printer(f"note: this run makes {total} optimizer step(s), and warmup_ratio={warmup_ratio} spends all of them "
                "warming the learning rate up from 0: the adapter will learn nothing. Train longer, or set --warmup_ratio 0")


def planned_steps(trainer) -> int:
    """How many optimizer steps this trainer's run makes in all, from its real dataloader."""
    args = trainer.args
    return optimizer_steps(len(trainer.get_train_dataloader()), args.gradient_accumulation_steps,
                           args.num_train_epochs, args.max_steps)[1]


def run_training(trainer, runtime: Runtime, resume_from: Path | None = None) -> tuple[TrainSummary, bool]:
    """Train (or continue from `resume_from`); returns the summary over the whole run, and whether
    the checkpoint had finished training already, in which case nothing is trained again."""
    clock = TrainingClock()
    trainer.add_callback(clock)
    if resume_from is not None and checkpoint_state(resume_from)["global_step"] >= planned_steps(trainer):
        finished = load_finished_checkpoint(trainer, resume_from)
        print(f"resume: training finished at step {trainer.state.global_step} in {resume_from.name}; nothing is "
              "trained again and no weight changes, only what is missing is finished (adapter, evaluation, report)")
        return summarize(trainer, runtime, finished), True
    let_training_wrap(trainer)
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    clock = next(c for c in trainer.callback_handler.callbacks if isinstance(c, TrainingClock))  # a resume replaces it
    return summarize(trainer, runtime, clock, result.training_loss), False


def checkpoint_state(checkpoint: Path) -> dict:
    return json.loads((Path(checkpoint) / "trainer_state.json").read_text(encoding="utf-8"))


def load_finished_checkpoint(trainer, checkpoint: Path) -> TrainingClock:
    """Put a finished checkpoint's LoRA weights and log into the trainer, without a training step."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import TrainerState

    weights = load_file(str(checkpoint / "adapter_model.safetensors"), device=str(trainer.model.device))
    loaded = set_peft_model_state_dict(trainer.model, weights)
    if loaded.unexpected_keys:
        raise TrainingError(f"{checkpoint} holds weights this model has no place for ({loaded.unexpected_keys[:3]}); "
                            "resume with the settings it was trained with")
    trainer.state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))
    stored = trainer.state.stateful_callbacks.get(TrainingClock.__name__, {}).get("args", {})
    return TrainingClock(**stored)


def summarize(trainer, runtime: Runtime, clock: TrainingClock, training_loss: float | None = None) -> TrainSummary:
    trainable, total = count_parameters(trainer.model)
    wall = clock.elapsed()
    tokens = int(trainer.state.num_input_tokens_seen)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    peak, kind = peak_memory(runtime.is_cuda)
    peak = parallel.max_over_processes(peak, runtime.device)  # the tokens are already counted over all of them
    return TrainSummary(
        wall_time_s=wall,
        train_tokens=tokens,
        tokens_per_second=tokens / wall if wall > 0 else 0.0,
        peak_memory_gib=max(peak, clock.peak_memory_gib),
        peak_memory_kind=kind,
        final_train_loss=losses[-1] if losses else training_loss,
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
    if trainer.is_fsdp_enabled and trainer.accelerator.unwrap_model(model) is not model:
        # Under FSDP that evaluation sharded the model and made trainer.model the sharded one, but left
        # model_wrapped on the unsharded one: train() would then never create its (delayed) optimizer
        # ("'NoneType' object has no attribute 'param_groups'", seen on 2 H200s). Name the sharded
        # model as the wrapped one, as train() itself does when it shards.
        trainer.model_wrapped = model
        return
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
    """Under FSDP every process holds a shard of each LoRA matrix: gather them whole, one FSDP unit at
    a time, and keep them in the main process's CPU memory. None when the model is whole in this process
    (one process, or DDP), where save_pretrained reads it directly. Every process must call this: each
    gathering is collective.

    Only units that hold trainable weights are gathered: under PEFT's policy (wrap_for_fsdp_qlora) each
    LoRA matrix is a unit of its own (a few MiB); the frozen 4-bit weights are never gathered. torch's
    get_model_state_dict(ignore_frozen_params, cpu_offload) would do it in one call, but fails on every
    process but the first (KeyError on a frozen weight, torch 2.11); gathering to the main process only
    (rank0_only) crashes on CPU processes (gloo), where the tests run.
    """
    if not getattr(trainer, "is_fsdp_enabled", False):
        return None
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    weights = {}
    for name, unit in trainer.model_wrapped.named_modules():
        own = trainable_weights_of_unit(unit)
        if not own:
            continue
        with FSDP.summon_full_params(unit, recurse=False, writeback=False, rank0_only=False, offload_to_cpu=False):
            if parallel.is_main_process():
                params = dict(unit.module.named_parameters())
                for param_name in own:
                    weights[f"{name}.{param_name}".replace("_fsdp_wrapped_module.", "")] = params[param_name].detach().clone().cpu()
    return weights  # empty on the other processes; an empty one on the main process fails save_adapter's check


def trainable_weights_of_unit(unit) -> list[str]:
    """The trainable weights an FSDP unit itself holds (not those of the units nested in it), by their
    names inside it; [] for anything that is not an FSDP unit."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    if not isinstance(unit, FSDP):
        return []
    return [name for name, param in unit.module.named_parameters()
            if param.requires_grad and "_fsdp_wrapped_module" not in name]


def save_adapter(model, tokenizer, cfg: Config, state_dict: dict | None = None) -> Path:
    """Write adapter + tokenizer + the config used, atomically, to output_dir/new_model.

    Everything goes to a temporary sibling folder first and replaces the adapter folder only once
    complete (run_files.replace_folder, which replaces nothing but that folder), so a crash or a full
    disk never leaves a half-written adapter, and an earlier adapter survives a failed save.
    """
    target = adapter_dir(cfg)
    target.parent.mkdir(parents=True, exist_ok=True)
    check_save_target(target, cfg.output_dir)  # before anything is written next to it
    staging = target.with_name(f".{target.name}.saving")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        if state_dict is None:
            model.save_pretrained(staging, safe_serialization=True)
        else:
            save_gathered_adapter(model, state_dict, staging)
        check_weights_written(staging / "adapter_model.safetensors")
        tokenizer.save_pretrained(staging)
        save_config(cfg, staging / "run_config.json")
        name_the_base(staging, cfg.model_name)
    except SaveFailed:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    except Exception as exc:  # a full disk reaches here as OSError, RuntimeError or SafetensorError
        shutil.rmtree(staging, ignore_errors=True)
        kept = (f"The adapter in {target} from before is untouched" if target.exists() else "No adapter was written")
        raise SaveFailed(save_failed_message("the adapter to", target, exc,
                                                f"{kept}; {describe_checkpoints(cfg.output_dir)}.")) from exc
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return replace_folder(staging, target, cfg.output_dir)


def save_gathered_adapter(model, weights: dict, folder: Path) -> None:
    """What PEFT's save_pretrained writes (adapter_model.safetensors, adapter_config.json), from LoRA
    weights gathered out of FSDP shards under their plain names (...q_proj.lora_A.default.weight).

    PEFT (0.21) cannot take them itself: it picks an adapter's weights by the model's module names,
    which under FSDP include the wrappers' (layers.0._fsdp_wrapped_module.self_attn...), so it keeps
    none of them and writes an empty adapter (seen on 2 H200s).
    """
    import copy

    from safetensors.torch import save_file

    adapter = model.active_adapter
    marker = f".{adapter}."  # PEFT's file names drop the adapter's name: lora_A.default.weight -> lora_A.weight
    tensors = {name.replace(marker, ".", 1): tensor.contiguous() for name, tensor in weights.items() if marker in name}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = copy.copy(model.peft_config[adapter])
    config.inference_mode = True  # as save_pretrained writes it
    config.save_pretrained(str(folder))


def check_weights_written(path: Path) -> None:
    """An adapter file without a tensor loads silently as the untrained base model: never write one."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        if not list(f.keys()):
            raise SaveFailed(f"the adapter came out empty ({path.name} held no weights), so it was not written: it would "
                             "load as the untrained base model. This is a bug; please report it with this run's log")


def name_the_base(adapter: Path, model_name: str) -> None:
    """adapter_config.json names the base as PEFT loaded it: for the tiny model, this machine's cache
    folder. It names 'tiny-llama' instead, which resolves wherever this project runs (hub ids and
    local folders stay as given). PEFT's template model card goes: it is empty but for that path, and
    report.render_model_card writes a real one once the run is evaluated."""
    if model_name == TINY_MODEL_NAME:
        config_path = adapter / "adapter_config.json"
        adapter_config = json.loads(config_path.read_text(encoding="utf-8"))
        adapter_config["base_model_name_or_path"] = model_name
        config_path.write_text(json.dumps(adapter_config, indent=2), encoding="utf-8")
    (adapter / "README.md").unlink(missing_ok=True)


def save_or_keep_adapter(trainer, tokenizer, cfg: Config, finished_checkpoint: Path | None) -> Path:
    """Save the trained adapter, once, from the main process (under FSDP from the weights every process
    helped gather); every process returns its folder, or raises the main process's error. Unless this
    run only finishes a finished checkpoint whose weights the saved adapter holds already: then it is
    kept as it is, and that is said."""
    adapter = adapter_dir(cfg)
    if finished_checkpoint is not None and holds_weights_of(adapter, finished_checkpoint):
        print(f"adapter: {adapter} already holds the weights of {finished_checkpoint.name}; kept as it is")
        return adapter
    weights = gathered_adapter_weights(trainer)  # collective under FSDP: every process takes part
    model = trainer.accelerator.unwrap_model(trainer.model)
    return parallel.on_main_process(save_adapter, model, tokenizer, cfg, state_dict=weights)


def holds_weights_of(adapter: Path, checkpoint: Path) -> bool:
    """Whether the saved adapter folder is whole and has exactly the checkpoint's LoRA weights."""
    from safetensors.torch import load_file

    weights = "adapter_model.safetensors"
    if not is_adapter_folder(adapter) or safetensors_problem(adapter / weights):
        return False
    saved, trained = load_file(str(adapter / weights)), load_file(str(checkpoint / weights))
    return saved.keys() == trained.keys() and all(torch.equal(saved[k], trained[k]) for k in saved)


def processes() -> int:
    """Training processes of this run (torchrun / accelerate launch set WORLD_SIZE)."""
    return parallel.world_size()


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


# ---------------------------------------------------------------------------- resuming

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
