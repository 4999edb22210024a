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

from config import Config, ConfigError, parse_config
from data_preparation import DataError, prepare_datasets
from inference import GenerationSettings, InferenceError, answer
from model_setup import SetupError, add_lora, load_base_model, load_model_config, load_tokenizer, resolve_runtime
from performance import apply_plan, plan_performance
from report import build_metrics, compare_answers, eval_seconds, format_held_out, held_out_metrics, write_report
from training import (StopOnSignal, TrainingError, build_trainer, format_parameter_counts, format_summary,
                      free_memory, micro_batch_of, out_of_memory_message, prepare_output_dir, run_training, save_adapter)

USER_ERRORS = (ConfigError, DataError, SetupError, TrainingError, InferenceError)


class Interrupted(Exception):
    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


def train_and_save(cfg: Config, argv: list[str]) -> dict:
    runtime = resolve_runtime(cfg)
    print(f"device: {runtime.reason}")
    resume_from = prepare_output_dir(cfg)
    plan = plan_performance(cfg, runtime, load_model_config(cfg), resumed_micro_batch=micro_batch_of(resume_from))
    cfg = apply_plan(cfg, plan)
    print(f"layout: {plan.reason}")
    tokenizer = load_tokenizer(cfg)
    train_rows, eval_rows = prepare_datasets(cfg, tokenizer)
    model = add_lora(load_base_model(cfg, runtime), cfg)
    print(format_parameter_counts(model))
    stop = StopOnSignal().install()
    try:
        trainer = build_trainer(model, tokenizer, train_rows, eval_rows, cfg, runtime, callbacks=[stop])
        before = held_out_metrics(trainer, base_model=True)
        summary = run_training(trainer, runtime, str(resume_from) if resume_from else None)
    finally:
        stop.uninstall()
    adapter = save_adapter(trainer.model, tokenizer, cfg)
    if stop.received is not None:
        raise Interrupted(stop.received, interrupted_message(trainer.state.global_step, adapter, cfg, argv))
    after = held_out_metrics(trainer)
    return {"trainer": trainer, "tokenizer": tokenizer, "summary": summary, "adapter": adapter,
            "before": before, "after": after}


def interrupted_message(step: int, adapter, cfg: Config, argv: list[str]) -> str:
    args = " ".join(a for a in argv if a not in ("--resume",)) if argv else ""
    return (f"interrupted at step {step}: adapter of this state saved to {adapter}, checkpoint in {cfg.output_dir}.\n"
            f"resume with: python main.py {args} --resume latest".replace("  ", " "))


def evaluate_and_report(cfg: Config, run: dict) -> dict:
    free_memory()  # as the seed: give cached GPU memory back before generating
    trainer, summary = run["trainer"], run["summary"]
    settings = GenerationSettings.from_config(cfg)
    answer_text = answer(trainer.model, run["tokenizer"], cfg.example_prompt, settings).text
    answers = compare_answers(trainer.model, run["tokenizer"], cfg.report_prompts, settings)
    metrics = build_metrics(cfg, summary, run["before"], run["after"], trainer.state.log_history,
                            eval_seconds(trainer.state.log_history))
    paths = write_report(cfg.output_dir, metrics, answers)
    print(f"\n{format_summary(summary)}\n{format_held_out(run['before'], run['after'])}")
    print(f"adapter saved to {run['adapter']}\nreport: {paths['report']} (metrics: {paths['metrics']}, curve: {paths['curve']})\n")
    print(f"[INST] {cfg.example_prompt} [/INST]\n{answer_text}")
    return {**run, "answer": answer_text, "paths": paths}


def run(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = parse_config(argv)
    return evaluate_and_report(cfg, train_and_save(cfg, argv))


def main(argv: list[str] | None = None) -> int:
    # Library deprecation chatter (gradient_checkpointing renames) is not the user's concern.
    warnings.filterwarnings("ignore", message=r".*gradient_checkpointing.*deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*deprecated", category=FutureWarning)
    try:
        run(argv)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Interrupted as exc:
        print(f"\n{exc}", file=sys.stderr)
        return 128 + exc.signum
    except torch.OutOfMemoryError:
        cfg = parse_config(argv)
        print(f"error: {out_of_memory_message(cfg)}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("\naborted (nothing saved from the step in progress)", file=sys.stderr)
        return 128 + signal.SIGINT
    return 0


if __name__ == "__main__":
    sys.exit(main())
