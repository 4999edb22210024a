"""Fine-tune Llama 2 with QLoRA, end to end: config, data, model, train, save, evaluate, infer.

    python main.py                      # the real run: Llama-2-7b-chat on guanaco-1k, needs an NVIDIA GPU
    python main.py --preset tiny        # the same pipeline on the bundled tiny model, on a CPU, ~1 minute
    python main.py --resume latest      # continue an interrupted run from its newest checkpoint
    python main.py --help               # every setting; any can be overridden by name

Settings live in config.py. Everything a run writes goes to `output_dir` (README.md, "Outputs").
Exit status: 0 done, 2 bad input (the message says what to change), 130/143 interrupted (saved).
"""

from __future__ import annotations

import signal
import sys
import warnings

import torch

import parallel
from config import Config, ConfigError, parse_config
from data_preparation import DataError, prepare_datasets
from inference import GenerationSettings, generate, make_generator
from model_setup import SetupError, add_lora, load_base_model, load_model_config, load_tokenizer, resolve_runtime
from performance import PlanError, apply_plan, format_plan, plan_performance
from report import (PhaseClock, build_metrics, compare_answers, eval_seconds, format_held_out, format_phases,
                    held_out_metrics, write_report)
from training import (NonFiniteLoss, OutOfMemory, StopOnSignal, TrainingError, build_trainer, format_parameter_counts,
                      format_summary, free_memory, micro_batch_of, out_of_memory_message, prepare_output_dir, run_training,
                      save_trained_adapter)

USER_ERRORS = (ConfigError, DataError, SetupError, TrainingError, PlanError)
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
    resume_from = parallel.on_main_process(prepare_output_dir, cfg)  # one process touches output_dir
    plan = plan_performance(cfg, runtime, load_model_config(cfg), resumed_micro_batch=micro_batch_of(resume_from))
    cfg = apply_plan(cfg, plan)  # from here on, cfg holds the values that run
    print(format_plan(plan))
    if cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
    try:
        return train_with_plan(cfg, runtime, resume_from, argv, clock)
    except torch.OutOfMemoryError:
        raise OutOfMemory(out_of_memory_message(cfg)) from None


def train_with_plan(cfg: Config, runtime, resume_from, argv: list[str], clock: PhaseClock) -> dict:
    with clock.phase("load"):
        tokenizer = load_tokenizer(cfg)
    with clock.phase("data"):
        train_rows, eval_rows = prepare_datasets(cfg, tokenizer)
    with clock.phase("load"):
        model = add_lora(load_base_model(cfg, runtime), cfg)
    print(format_parameter_counts(model))
    stop = StopOnSignal().install()
    try:
        trainer = build_trainer(model, tokenizer, train_rows, eval_rows, cfg, runtime, callbacks=[stop])
        with clock.phase("evaluation"):
            before = held_out_metrics(trainer, base_model=True)
        with clock.phase("train"):
            summary = run_training(trainer, runtime, str(resume_from) if resume_from else None)
    finally:
        stop.uninstall()
    with clock.phase("save"):
        adapter = save_trained_adapter(trainer, tokenizer, cfg)
    if stop.received is not None:
        raise Interrupted(stop.received, interrupted_message(trainer.state.global_step, adapter, cfg, argv))
    with clock.phase("evaluation"):
        after = held_out_metrics(trainer)
    return {"trainer": trainer, "tokenizer": tokenizer, "summary": summary, "adapter": adapter,
            "before": before, "after": after, "cfg": cfg}


def interrupted_message(step: int, adapter, cfg: Config, argv: list[str]) -> str:
    args = " ".join(a for a in argv if a not in ("--resume",)) if argv else ""
    launcher = "python" if parallel.world_size() == 1 else "<the same launcher and processes as before>"
    return (f"interrupted at step {step}: adapter of this state saved to {adapter}, checkpoint in {cfg.output_dir}.\n"
            f"resume with: {launcher} main.py {args} --resume latest".replace("  ", " "))


def evaluate_and_report(cfg: Config, run: dict, clock: PhaseClock) -> dict:
    free_memory()  # as the seed: give cached GPU memory back before generating
    trainer, summary = run["trainer"], run["summary"]
    with clock.phase("generation"):
        answer, answers = generate_answers(trainer.model, run["tokenizer"], cfg)
    phases = clock.split(eval_seconds(trainer.state.log_history))
    metrics = build_metrics(cfg, summary, run["before"], run["after"], trainer.state.log_history,
                            eval_seconds(trainer.state.log_history), phases)
    paths = write_report(cfg.output_dir, metrics, answers)
    print(f"\n{format_summary(summary)}\n{format_phases(phases)}\n{format_held_out(run['before'], run['after'])}")
    print(f"adapter saved to {run['adapter']}\nreport: {paths['report']} (metrics: {paths['metrics']}, curve: {paths['curve']})\n")
    if answer is not None:
        print(f"[INST] {cfg.example_prompt} [/INST]\n{answer}")
    return {**run, "answer": answer, "paths": paths}


def generate_answers(model, tokenizer, cfg: Config) -> tuple[str | None, list[dict]]:
    """The example answer and the report's base-vs-tuned answers; none under FSDP, where every process
    holds a shard of the weights and generating would gather the whole model for every token."""
    if parallel.fsdp_enabled():
        print("answers: not generated under FSDP (the weights are sharded); generate from the saved adapter with inference.py")
        return None, []
    settings = GenerationSettings.from_config(cfg)
    generator = make_generator(model, tokenizer)
    answer = generate(generator, cfg.example_prompt, settings)
    return answer, compare_answers(model, generator, cfg.report_prompts, settings, generate)


def run(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    parallel.quiet_other_processes()  # each line once: only the main process prints
    clock = PhaseClock()
    result = train_and_save(parse_config(argv), argv, clock)
    if not parallel.is_main_process():  # generating and writing the report is the main process's part
        return result
    return evaluate_and_report(result["cfg"], result, clock)


def report_error(exc: Exception) -> None:
    if parallel.world_size() == 1:
        print(f"error: {exc}", file=sys.stderr)
    elif isinstance(exc, PER_PROCESS_ERRORS):
        print(f"error in process {parallel.rank()} of {parallel.world_size()}: {exc}", file=sys.stderr)
    elif parallel.is_main_process():
        print(f"error: {exc}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    # Library deprecation chatter (gradient_checkpointing renames) is not the user's concern.
    warnings.filterwarnings("ignore", message=r".*gradient_checkpointing.*deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*deprecated", category=FutureWarning)
    try:
        run(argv)
    except OutOfMemory as exc:
        report_error(exc)
        return 3
    except USER_ERRORS as exc:
        report_error(exc)
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
    sys.exit(main())
