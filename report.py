"""What a run did, measured: held-out loss before/after, a loss curve, and base-vs-tuned answers.

    before = held_out_metrics(trainer)           # base model (LoRA B is zero before training)
    ... train ...
    after = held_out_metrics(trainer)            # same held-out rows, fine-tuned
    paths = write_report(output_dir, cfg, summary, before, after, trainer.state.log_history, answers)

Files written to output_dir: metrics.json (for programs), loss_curve.png, report.md (for people).
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from config import config_to_dict
from training import TrainSummary, summary_dict, write_json

METRICS_FILE, CURVE_FILE, REPORT_FILE = "metrics.json", "loss_curve.png", "report.md"


@dataclass
class HeldOut:
    loss: float
    perplexity: float
    rows: int
    seconds: float


def held_out_metrics(trainer, base_model: bool = False) -> HeldOut | None:
    """Loss and perplexity on the trainer's eval rows (None when there is no held-out split).

    base_model=True measures with the adapter switched off: the base model exactly, whether this
    is before training or after a --resume.
    """
    if trainer.eval_dataset is None:
        return None
    logged = None if base_model else evaluation_at(trainer.state.log_history, trainer.state.global_step)
    if logged is not None:  # the Trainer evaluated these weights already (at the last epoch's end): no second pass
        loss = float(logged["eval_loss"])
        return HeldOut(loss, safe_exp(loss), len(trainer.eval_dataset), float(logged.get("eval_runtime", 0.0)))
    prefix = "base" if base_model else "eval"
    if base_model:
        with adapter_switched_off(trainer.model):
            metrics = trainer.evaluate(metric_key_prefix=prefix)
    else:
        metrics = trainer.evaluate(metric_key_prefix=prefix)
    loss = float(metrics[f"{prefix}_loss"])
    return HeldOut(loss, safe_exp(loss), len(trainer.eval_dataset), float(metrics.get(f"{prefix}_runtime", 0.0)))


@contextmanager
def adapter_switched_off(model):
    """The base model exactly: PEFT's adapter switch, with the LoRA weights still marked trainable.

    PEFT's switch also freezes them (requires_grad=False). The first evaluation under FSDP is what
    shards the model, and FSDP groups weights by whether they train: frozen, the float32 LoRA
    weights would be flattened into one tensor with the bf16 base weights, which FSDP refuses
    ("Must flatten tensors with uniform dtype"). Switched off, they take no part in the forward
    pass either way, and evaluation computes no gradients.
    """
    trainable = [param for param in model.parameters() if param.requires_grad]
    with model.disable_adapter():
        for param in trainable:
            param.requires_grad_(True)
        yield


@dataclass
class PhaseClock:
    """Wall time per phase of a run (load, data, train, evaluation, save, generation)."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def split(self, eval_seconds_during_training: float) -> dict[str, float]:
        """The phases, with the evaluations run inside training counted as evaluation, not training."""
        phases = dict(self.seconds)
        if "train" in phases:
            moved = min(eval_seconds_during_training, phases["train"])
            phases["train"] -= moved
            phases["evaluation"] = phases.get("evaluation", 0.0) + moved
        phases["total"] = sum(self.seconds.values())
        return phases


def format_phases(phases: dict[str, float]) -> str:
    return "time: " + " | ".join(f"{name} {seconds:.1f} s" for name, seconds in phases.items())


def evaluation_at(log_history: list[dict], step: int) -> dict | None:
    """The held-out evaluation logged at `step`, if the Trainer made one there."""
    return next((e for e in reversed(log_history) if "eval_loss" in e and e.get("step") == step), None)


def safe_exp(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")


def loss_history(log_history: list[dict]) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(train, eval) points as (step, loss) from the Trainer's log history."""
    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    evals = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e and "step" in e]
    return train, evals


def plot_loss_curve(train: list, evals: list, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", color="tab:blue", marker=".")
    if evals:
        ax.plot(*zip(*evals), label="held-out loss", color="tab:orange", marker="o")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats per answer token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def build_metrics(cfg, summary: TrainSummary, before: HeldOut | None, after: HeldOut | None, log_history: list[dict],
                  eval_seconds_during_training: float, phase_seconds: dict[str, float] | None = None) -> dict:
    train, evals = loss_history(log_history)
    if before is not None:  # the base model's held-out loss is where the held-out curve starts
        evals = [(0, before.loss)] + evals
    return {
        "eval_loss_before": before.loss if before else None,
        "eval_loss_after": after.loss if after else None,
        "perplexity_before": before.perplexity if before else None,
        "perplexity_after": after.perplexity if after else None,
        "held_out_rows": after.rows if after else 0,
        "tokens_per_second": summary.tokens_per_second,
        "peak_memory_gib": summary.peak_memory_gib,
        "peak_memory_kind": summary.peak_memory_kind,
        "wall_time_s": summary.wall_time_s,
        "eval_seconds_during_training": eval_seconds_during_training,
        "phase_seconds": phase_seconds or {},
        "train": summary_dict(summary),
        "train_loss_per_step": [{"step": s, "loss": v} for s, v in train],
        "eval_loss_per_step": [{"step": s, "loss": v} for s, v in evals],
        "config": config_to_dict(cfg),
    }


def eval_seconds(log_history: list[dict]) -> float:
    return float(sum(e.get("eval_runtime", 0.0) for e in log_history))


def render_markdown(metrics: dict, answers: list[dict], curve_name: str) -> str:
    cfg = metrics["config"]
    lines = [f"# Fine-tuning report: {cfg['model_name']} on {cfg['dataset_name']}", ""]
    if metrics["eval_loss_before"] is not None:
        change = 100 * (metrics["eval_loss_after"] - metrics["eval_loss_before"]) / metrics["eval_loss_before"]
        lines += [
            f"Held-out rows: {metrics['held_out_rows']} (loss on answer tokens only: {cfg['train_on_answers_only']})",
            "",
            "| | base model | fine-tuned | change |",
            "|---|---|---|---|",
            f"| held-out loss | {metrics['eval_loss_before']:.4f} | {metrics['eval_loss_after']:.4f} | {change:+.1f}% |",
            f"| perplexity | {metrics['perplexity_before']:.2f} | {metrics['perplexity_after']:.2f} | |",
            "",
        ]
    else:
        lines += ["No held-out split (eval_fraction=0 and no eval_dataset): nothing to compare.", ""]
    train = metrics["train"]
    lines += [
        f"Training: {train['global_step']} steps in {train['wall_time_s']:.1f} s, "
        f"{train['tokens_per_second']:,.0f} tokens/s, peak memory {train['peak_memory_gib']:.2f} GiB "
        f"({train['peak_memory_kind']}); evaluation during training took {metrics['eval_seconds_during_training']:.1f} s.",
        "",
        f"![loss curve]({curve_name})",
        "",
        "## Answers, base model vs fine-tuned (greedy unless do_sample)",
        "",
    ]
    for item in answers:
        lines += [f"### {item['prompt']}", "", "| base model | fine-tuned |", "|---|---|",
                  f"| {_cell(item['base'])} | {_cell(item['tuned'])} |", ""]
    return "\n".join(lines)


def _cell(text: str) -> str:
    return (text or "*(empty)*").replace("|", "\\|").replace("\n", "<br>")


def compare_answers(model, tokenizer, prompts: list[str], settings) -> list[dict]:
    """The same prompts answered with the adapter off (base) and on (fine-tuned), each side in one batch.

    Through inference.answer_many: the prompts are built by chat_format as training saw them, and a
    batch gives each row the answer it gets alone (tests check it).
    """
    from inference import answer_many, conversation

    questions = [conversation(p, settings.system_prompt) for p in prompts]
    tuned = answer_many(model, tokenizer, questions, settings, batch_size=len(prompts))
    with model.disable_adapter():
        base = answer_many(model, tokenizer, questions, settings, batch_size=len(prompts))
    return [{"prompt": p, "base": b.text, "tuned": t.text} for p, b, t in zip(prompts, base, tuned)]


def render_model_card(metrics: dict, adapter_name: str) -> str:
    """The adapter's README.md: what it was trained from, how, and what it measured."""
    cfg, train = metrics["config"], metrics["train"]
    rows_per_step = cfg["per_device_train_batch_size"] * cfg["gradient_accumulation_steps"]
    base = f"{'NF4' if cfg['bnb_4bit_quant_type'] == 'nf4' else 'FP4'} 4-bit" if cfg["use_4bit"] else "unquantised"
    if metrics["eval_loss_before"] is not None:
        result = (f"held-out loss {metrics['eval_loss_before']:.4f} (base) -> {metrics['eval_loss_after']:.4f} "
                  f"(fine-tuned), perplexity {metrics['perplexity_before']:.2f} -> {metrics['perplexity_after']:.2f}, "
                  f"on {metrics['held_out_rows']} held-out rows")
    else:
        result = "no held-out rows (eval_fraction=0 and no eval_dataset)"
    return "\n".join([
        "---", f"base_model: {cfg['model_name']}", "library_name: peft", "tags: [lora, qlora, sft]", "---", "",
        f"# {adapter_name}", "",
        f"A LoRA adapter for `{cfg['model_name']}`, fine-tuned on `{cfg['dataset_name']}` with QLoRA "
        "(LlamaFinetuning). Prompts are Llama-2 chat: `[INST] {question} [/INST]`.", "",
        "| | |", "|---|---|",
        f"| base model | `{cfg['model_name']}`, loaded {base} |",
        f"| data | `{cfg['dataset_name']}`; loss on {'the answers only' if cfg['train_on_answers_only'] else 'the whole text'} |",
        f"| LoRA | r={cfg['lora_r']}, alpha={cfg['lora_alpha']}, dropout={cfg['lora_dropout']}, on "
        f"{', '.join(cfg['lora_target_modules'])} |",
        f"| training | {train['global_step']} steps of {rows_per_step} rows, learning rate {cfg['learning_rate']} "
        f"({cfg['lr_scheduler_type']}), up to {cfg['max_seq_length']} tokens per row, seed {cfg['seed']} |",
        f"| result | {result} |", "",
        "Use it: `python inference.py --adapter <this folder> \"your question\"` (every setting: run_config.json).", "",
    ])


def report_is_written(output_dir: str | os.PathLike) -> bool:
    """Whether output_dir holds a complete report (metrics.json parses, report.md is there)."""
    out = Path(output_dir)
    try:
        json.loads((out / METRICS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (out / REPORT_FILE).is_file()


def write_report(output_dir: str | os.PathLike, metrics: dict, answers: list[dict], adapter: Path | None = None) -> dict[str, Path]:
    """metrics.json, loss_curve.png and report.md in output_dir, and the adapter's model card."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    train = [(p["step"], p["loss"]) for p in metrics["train_loss_per_step"]]
    evals = [(p["step"], p["loss"]) for p in metrics["eval_loss_per_step"]]
    curve = plot_loss_curve(train, evals, out / CURVE_FILE, f"{metrics['config']['model_name']}: loss per step")
    write_json(out / METRICS_FILE, {**metrics, "answers": answers})
    report = out / REPORT_FILE
    report.write_text(render_markdown(metrics, answers, CURVE_FILE), encoding="utf-8")
    if adapter is not None:
        (Path(adapter) / "README.md").write_text(render_model_card(metrics, Path(adapter).name), encoding="utf-8")
    return {"metrics": out / METRICS_FILE, "curve": curve, "report": report}


def format_held_out(before: HeldOut | None, after: HeldOut | None) -> str:
    if before is None or after is None:
        return "held-out: none (eval_fraction=0)"
    return (f"held-out loss {before.loss:.4f} -> {after.loss:.4f} | perplexity {before.perplexity:.2f} -> "
            f"{after.perplexity:.2f} ({after.rows} rows)")
