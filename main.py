"""Fine-tune Llama 2 with QLoRA, end to end: config, data, model, train, save, evaluate, infer.

    python main.py                      # the real run: Llama-2-7b-chat on guanaco-1k, needs an NVIDIA GPU
    python main.py --preset tiny        # the same pipeline on the bundled tiny model, on a CPU, ~1 minute
    python main.py --resume latest      # continue an interrupted run from its newest checkpoint
    python main.py --help               # every setting; any can be overridden by name

Settings live in config.py. Everything a run writes goes to `output_dir` (README.md, "Outputs").
Exit status: 0 done, 2 bad input (the message says what to change), 130/143 interrupted (saved).
"""

from __future__ import annotations

import os
import shlex
import signal
import sys

if __name__ == "__main__":  # Ctrl-C while torch and transformers import (seconds): a word, not a traceback
    signal.signal(signal.SIGINT, lambda *_: (print("\ninterrupted", file=sys.stderr), os._exit(128 + signal.SIGINT)))

from model_setup import quiet_library_noise  # noqa: E402

# Here, not in main(): bitsandbytes logs its noise when it is imported, and the imports below
# (transformers' Trainer, then PEFT) import it.
quiet_library_noise()

import torch  # noqa: E402

import parallel  # noqa: E402

from chat_format import prompt_text  # noqa: E402
from config import Config, ConfigError, parse_config  # noqa: E402
from data_preparation import DataError, prepare_datasets  # noqa: E402
from inference import GenerationSettings, InferenceError, answer  # noqa: E402
from model_setup import (SetupError, add_lora, count_parameters, load_base_model, load_model_config,  # noqa: E402
                         load_tokenizer, resolve_lora_targets, resolve_runtime)
from performance import PlanError, apply_plan, format_plan, plan_performance  # noqa: E402
from report import (PhaseClock, build_metrics, compare_answers, eval_seconds, format_held_out,  # noqa: E402
                    format_phases, held_out_metrics, report_is_written, write_report)
from run_files import OutputDirError, hold_output_dir, inspect_output_dir, recover_interrupted_replace  # noqa: E402
from training import (CheckpointBookkeeping, NonFiniteLoss, OutOfMemory, SaveFailed, StopOnSignal, TrainingError,  # noqa: E402
                      build_trainer, check_steps, format_parameter_counts, format_summary, free_memory,
                      micro_batch_of, out_of_memory_message, processes, run_training, save_or_keep_adapter)

USER_ERRORS = (ConfigError, DataError, SetupError, TrainingError, OutputDirError, PlanError, InferenceError)
# Errors that may strike one process of several (its own rows, its own GPU): each process names its own.
# Every other error is found identically by all of them, and the main process alone prints it.
PER_PROCESS_ERRORS = (OutOfMemory, NonFiniteLoss)


class Interrupted(Exception):
    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


def train_and_save(cfg: Config, argv: list[str], clock: PhaseClock) -> dict:
    runtime = resolve_runtime(cfg)
    parallel.start(runtime.is_cuda)  # with several processes: join them, before anything is agreed
    print(f"device: {runtime.reason}; {parallel.describe()}")
    model_config = load_model_config(cfg)
    cfg, lora_reason = resolve_lora_targets(cfg, model_config)
    print(f"lora: {lora_reason}")
    start = inspect_output_dir(cfg)  # what to resume or replace; nothing is changed before every check below
    plan = plan_performance(cfg, runtime, model_config, resumed_micro_batch=micro_batch_of(start.checkpoint))
    cfg = apply_plan(cfg, plan)  # from here on, cfg holds the values that run
    print(format_plan(plan))
    if cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
    try:
        return train_with_plan(cfg, runtime, start, argv, clock)
    except torch.OutOfMemoryError:
        raise OutOfMemory(out_of_memory_message(cfg)) from None


def train_with_plan(cfg: Config, runtime, start, argv: list[str], clock: PhaseClock) -> dict:
    with clock.phase("load"):
        tokenizer = load_tokenizer(cfg)
    with clock.phase("data"):
        train_rows, eval_rows = prepare_datasets(cfg, tokenizer)
    check_steps(len(train_rows), cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps, processes(),
                cfg.num_train_epochs, cfg.max_steps, cfg.warmup_ratio)
    with clock.phase("load"):
        model = add_lora(load_base_model(cfg, runtime), cfg)
    print(format_parameter_counts(model))
    start.check_disk(count_parameters(model)[0], cfg.save_steps, cfg.save_total_limit)
    stop = StopOnSignal().install()
    try:
        with start.replacing() as earlier:  # an earlier run (--overwrite) stays until this one has saved something
            trainer = build_trainer(model, tokenizer, train_rows, eval_rows, cfg, runtime,
                                    callbacks=[stop, CheckpointBookkeeping(cfg, earlier)])
            with clock.phase("evaluation"):
                before = held_out_metrics(trainer, base_model=True)
            with clock.phase("train"):
                summary, finished_before = run_training(trainer, runtime, start.checkpoint)
            with clock.phase("save"):
                adapter = save_or_keep_adapter(trainer, tokenizer, cfg,
                                               start.checkpoint if finished_before else None)
    finally:
        stop.uninstall()
    if stop.received is not None:
        raise Interrupted(stop.received, interrupted_message(trainer.state.global_step, adapter, cfg, argv))
    with clock.phase("evaluation"):
        after = held_out_metrics(trainer)
    return {"trainer": trainer, "tokenizer": tokenizer, "summary": summary, "adapter": adapter,
            "before": before, "after": after, "finished_before": finished_before, "cfg": cfg}


def resume_command(argv: list[str]) -> str:
    """The command that continues this run, shell-quoted so that it works when pasted: the same
    flags without --resume/--overwrite (and their values), then --resume latest."""
    kept, drop_value = [], False
    for arg in argv:
        if drop_value and not arg.startswith("--"):
            drop_value = False
            continue
        drop_value = arg in ("--resume", "--overwrite")
        if not drop_value and not arg.startswith(("--resume=", "--overwrite=")):
            kept.append(arg)
    return shlex.join(["python", "main.py", *kept, "--resume", "latest"])


def interrupted_message(step: int, adapter, cfg: Config, argv: list[str]) -> str:
    command = resume_command(argv)
    if parallel.world_size() > 1:
        command = command.replace("python main.py", "<the same launcher and processes as before> main.py", 1)
    return (f"interrupted at step {step}: adapter of this state saved to {adapter}, checkpoint in {cfg.output_dir}.\n"
            f"resume with: {command}")


def evaluate_and_report(cfg: Config, run: dict, clock: PhaseClock) -> dict:
    trainer, summary = run["trainer"], run["summary"]
    if run["finished_before"] and report_is_written(cfg.output_dir):
        print(f"\n{format_summary(summary)}\nthe run was already complete: adapter {run['adapter']}, report in "
              f"{cfg.output_dir}; nothing was missing")
        return {**run, "answer": None, "paths": None}
    free_memory()  # as the seed: give cached GPU memory back before generating
    with clock.phase("generation"):
        answer_text, answers = generate_answers(trainer.model, run["tokenizer"], cfg)
    phases = clock.split(eval_seconds(trainer.state.log_history))
    metrics = build_metrics(cfg, summary, run["before"], run["after"], trainer.state.log_history,
                            eval_seconds(trainer.state.log_history), phases)
    paths = write_report(cfg.output_dir, metrics, answers, run["adapter"])
    print(f"\n{format_summary(summary)}\n{format_phases(phases)}\n{format_held_out(run['before'], run['after'])}")
    print(f"adapter saved to {run['adapter']}\nreport: {paths['report']} (metrics: {paths['metrics']}, curve: {paths['curve']})\n")
    if answer_text is not None:
        print(f"{prompt_text(run['tokenizer'], [{'role': 'user', 'content': cfg.example_prompt}])}\n{answer_text}")
    return {**run, "answer": answer_text, "paths": paths}


def generate_answers(model, tokenizer, cfg: Config) -> tuple[str | None, list[dict]]:
    """The example answer and the report's base-vs-tuned answers; none under FSDP, where every process
    holds a shard of the weights and generating would gather the whole model for every token."""
    if parallel.fsdp_enabled():
        print("answers: not generated under FSDP (the weights are sharded); generate from the saved adapter with inference.py")
        return None, []
    settings = GenerationSettings.from_config(cfg)
    return (answer(model, tokenizer, cfg.example_prompt, settings).text,
            compare_answers(model, tokenizer, cfg.report_prompts, settings))



def run(argv: list[str] | None = None) -> dict:
    argv = [str(arg) for arg in (sys.argv[1:] if argv is None else argv)]
    parallel.quiet_other_processes()  # each line once: only the main process prints
    cfg = parse_config(argv)
    clock = PhaseClock()
    with hold_output_dir(cfg.output_dir):  # one run per output_dir (held by the main process), released however this ends
        recover_interrupted_replace(cfg.output_dir)
        result = train_and_save(cfg, argv, clock)
        if not parallel.is_main_process():  # generating and writing the report is the main process's part
            return result
        return evaluate_and_report(result["cfg"], result, clock)


def report_error(exc: Exception, suffix: str = "") -> None:
    if parallel.world_size() == 1:
        print(f"error: {exc}{suffix}", file=sys.stderr)
    elif isinstance(exc, PER_PROCESS_ERRORS):
        print(f"error in process {parallel.rank()} of {parallel.world_size()}: {exc}{suffix}", file=sys.stderr)
    elif parallel.is_main_process():
        print(f"error: {exc}{suffix}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = [str(arg) for arg in (sys.argv[1:] if argv is None else argv)]
    try:
        run(argv)
    except OutOfMemory as exc:
        report_error(exc)
        return 3
    except USER_ERRORS as exc:
        resume = f"\nresume with: {resume_command(argv)}" if isinstance(exc, SaveFailed) else ""
        report_error(exc, f"{resume}\n(`python main.py --help` lists every setting)")
        return 2
    except Interrupted as exc:
        if parallel.is_main_process():
            print(f"\n{exc}", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        if parallel.is_main_process():
            print("\naborted (nothing saved from the step in progress)", file=sys.stderr)
        return 128 + signal.SIGINT
    finally:
        parallel.finish()
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)  # from here main() handles Ctrl-C
    sys.exit(main())
