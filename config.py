"""Every setting of the pipeline, in one place.

Edit a default below, or override any field on the command line by its own name:

    python main.py --num_train_epochs 1 --learning_rate 1e-4
    python main.py --preset tiny            # the bundled tiny model and data, runs on a CPU

`parse_config(argv)` turns the command line into a `Config`; `validate_config(cfg)` lists every
problem at once, before anything heavy is loaded. Defaults are the seed project's values; the few
deliberate deviations (compute dtype `auto`, a pad token distinct from EOS, answer-only loss, ...)
are listed in README.md with the reason for each.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass, field

# The name that selects the tiny Llama built offline by tiny_model.py (random weights, tokenizer
# trained on data/sample.jsonl). Any other model_name is a hub id or a local folder.
TINY_MODEL_NAME = "tiny-llama"
BUNDLED_DATASET = "data/sample.jsonl"

COMPUTE_DTYPES = ("auto", "bfloat16", "float16", "float32")
QUANT_TYPES = ("nf4", "fp4")
OPTIMIZERS = (
    "auto", "paged_adamw_32bit", "paged_adamw_8bit", "adamw_torch", "adamw_torch_fused", "adamw_8bit", "sgd",
)
SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial")
REPORT_TO = ("tensorboard", "none")
PERFORMANCE_MODES = ("auto", "speed", "memory")
DATASET_FORMATS = ("auto", "text", "messages", "sharegpt", "alpaca", "prompt_completion")
BAD_ROW_POLICIES = ("error", "skip")
AUTO = "auto"


@dataclass
class Config:
    # ---------------------------------------------------------------- model and data
    model_name: str = field(
        default="NousResearch/Llama-2-7b-chat-hf",
        metadata={"help": f"Hub id or local folder of the base model; '{TINY_MODEL_NAME}' builds the bundled tiny Llama."},
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Run model code shipped with the checkpoint. Llama is built into transformers: leave off."},
    )
    dataset_name: str = field(
        default="mlabonne/guanaco-llama2-1k",
        metadata={"help": "Hub id, or a local .json/.jsonl/.csv/.parquet file or saved-dataset folder, in one of the "
                          "formats of dataset_format."},
    )
    dataset_split: str = field(default="train", metadata={"help": "Split of a hub dataset to train on."})
    train_on_answers_only: bool = field(
        default=True,
        metadata={"help": "Loss on the answers (and their end-of-turn token) only; the prompts are masked. False: whole text, as the seed."},
    )
    eval_fraction: float = field(
        default=0.1,
        metadata={"help": "Share of the rows held out for evaluation (0 = no held-out split; ignored if eval_dataset is set)."},
    )
    eval_dataset: str = field(
        default="", metadata={"help": "Optional separate held-out file or hub id; empty = split eval_fraction off the training data."}
    )
    output_dir: str = field(
        default="./results",
        metadata={"help": "Where everything of a run goes: checkpoints, TensorBoard logs, metrics, report, adapter."},
    )
    new_model: str = field(
        default="Llama-2-7b-chat-finetune",
        metadata={"help": "Folder name of the saved adapter, inside output_dir."},
    )
    overwrite: bool = field(
        default=False, metadata={"help": "Allow a run to reuse an output_dir that already holds a run's files."}
    )
    resume: str = field(
        default="",
        metadata={"help": "Continue a run: bare --resume (or 'latest') = newest checkpoint in output_dir, or a checkpoint folder.",
                  "nargs": "?", "const": "latest"},
    )
    # ---------------------------------------------------------------- LoRA
    lora_r: int = field(default=32, metadata={"help": "Rank of the LoRA update matrices."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator: updates are scaled by alpha / r (= 0.5 here)."})
    lora_dropout: float = field(default=0.1, metadata={"help": "Dropout on the LoRA input, in [0, 1)."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: [AUTO],
        metadata={"help": "Linear layers that get LoRA adapters (space-separated on the command line). auto: the "
                          "architecture's attention projections from PEFT's table (q_proj v_proj for Llama, Qwen, "
                          "Gemma, Mistral: the seed's choice), printed at the start of a run."},
    )
    # ---------------------------------------------------------------- 4-bit quantisation (bitsandbytes)
    use_4bit: bool = field(default=True, metadata={"help": "Load the frozen base in 4 bits (QLoRA). False: plain LoRA on a 16/32-bit base."})
    bnb_4bit_quant_type: str = field(default="nf4", metadata={"help": f"4-bit data type: one of {QUANT_TYPES}."})
    bnb_4bit_compute_dtype: str = field(
        default="auto",
        metadata={"help": f"Matmul dtype, one of {COMPUTE_DTYPES}. auto: bfloat16 where the GPU supports it, else float16; float32 on CPU."},
    )
    use_nested_quant: bool = field(default=False, metadata={"help": "Double quantisation: ~0.4 bit/param less memory, a little slower."})
    # ---------------------------------------------------------------- training
    num_train_epochs: float = field(default=10, metadata={"help": "Passes over the training rows."})
    max_steps: int = field(default=-1, metadata={"help": "Stop after this many optimizer steps (-1 = run all epochs)."})
    rows_per_step: int = field(
        default=8,
        metadata={"help": "Rows per optimizer step, over all GPUs: the math of a step (the seed's batch 1 x accumulation 8). "
                          "How they are split into forward passes is a speed/memory choice that leaves the math alone."},
    )
    per_device_train_batch_size: int | None = field(
        default=None,
        metadata={"help": "Rows per forward pass on each device. None = auto: chosen with performance_mode from the "
                          "free GPU memory (1 on a CPU, as the seed)."},
    )
    per_device_eval_batch_size: int = field(default=4, metadata={"help": "Rows per forward pass when evaluating."})
    gradient_accumulation_steps: int | None = field(
        default=None,
        metadata={"help": "Forward passes per optimizer step. None = auto: rows_per_step / (batch size x GPUs). "
                          "Set both this and the batch size and rows_per_step follows from them."},
    )
    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={"help": "Recompute activations in backward: much less memory, ~30% more compute. None = auto "
                          "(on where memory needs it, and on a CPU as the seed).", "nargs": "?", "const": True},
    )
    max_grad_norm: float = field(default=0.3, metadata={"help": "Clip the gradient norm to this (QLoRA paper's value)."})
    learning_rate: float = field(default=2e-4, metadata={"help": "Peak learning rate of the LoRA weights."})
    weight_decay: float = field(default=0.001, metadata={"help": "AdamW weight decay on the LoRA weights."})
    optim: str = field(
        default="auto",
        metadata={"help": f"Optimizer, one of {OPTIMIZERS}. auto: AdamW fused into one kernel on a GPU, plain AdamW on a "
                          "CPU: the update of the seed's paged_adamw_32bit (LoRA's optimizer state is small, paging buys nothing)."},
    )
    lr_scheduler_type: str = field(default="cosine", metadata={"help": f"Learning-rate schedule, one of {SCHEDULERS}."})
    warmup_ratio: float = field(default=0.03, metadata={"help": "Share of the steps spent warming the learning rate up, in [0, 1)."})
    group_by_length: bool = field(
        default=True, metadata={"help": "Batch rows of similar length together: less padding, same data each epoch."}
    )
    max_seq_length: int = field(
        default=256, metadata={"help": "Tokens per row; longer rows are cut. Activation memory grows with batch x this."}
    )
    packing: bool = field(default=False, metadata={"help": "Pack several rows into one max_seq_length sequence."})
    seed: int = field(default=42, metadata={"help": "Seed for the data order, LoRA init and dropout."})
    # ---------------------------------------------------------------- speed and memory (performance.py decides)
    # Every field below left at None (or auto) is chosen by performance.plan_performance, which prints each
    # choice and why; a value you set here or on the command line is what runs.
    performance_mode: str = field(
        default="auto",
        metadata={"help": "How the fields below that you leave at None are chosen: auto (the fastest layout that fits the "
                          "free GPU memory), speed (fastest, whatever the memory), memory (leanest). Same math in every mode."},
    )
    fp32_frozen_weights: bool = field(
        default=False,
        metadata={"help": "Keep the frozen non-4-bit weights (norms, embeddings, output layer) in float32, as PEFT's "
                          "k-bit preparation does. False keeps them in the compute dtype: less memory and traffic."},
    )
    dequantize_frozen: bool | None = field(
        default=None,
        metadata={"help": "GPU speed option: after 4-bit loading, keep the frozen weights dequantised in the compute dtype "
                          "(the same values the 4-bit kernels compute with; 2 bytes/param: 13 GiB for 7B) instead of "
                          "dequantising them at every use. None = auto (on where it fits).", "nargs": "?", "const": True},
    )
    pad_to_multiple_of: int | None = field(
        default=None,
        metadata={"help": "Pad each batch's length up to a multiple of this (1 = to its longest row only). None = auto: "
                          "64 when cuDNN attention is on (a handful of shapes instead of one per length: each new shape "
                          "costs it a plan), else 1. Padding carries no loss: the math is unchanged."},
    )
    cudnn_attention: bool | None = field(
        default=None,
        metadata={"help": "Let PyTorch's attention use its cuDNN kernels. None = auto: off, because cuDNN builds a plan "
                          "for every new sequence length (~2 s each, measured on an H200).", "nargs": "?", "const": True},
    )
    padding_free: bool | None = field(
        default=None,
        metadata={"help": "Concatenate the rows of a forward pass into one sequence with no padding at all (attention "
                          "kept within each row through position ids). None = auto (see performance.py).",
                  "nargs": "?", "const": True},
    )
    torch_compile: bool | None = field(
        default=None,
        metadata={"help": "Compile each decoder layer with torch.compile: ~25% faster steps after a one-off ~1.5 min "
                          "compile (H200, 7B). None = auto: on in performance_mode speed, off otherwise (it pays back "
                          "after ~2,000 steps).", "nargs": "?", "const": True},
    )
    cpu_threads: int | None = field(
        default=None,
        metadata={"help": "torch's CPU threads in each process. None = auto: torch's default in a one-process run; with "
                          "several processes (torchrun, accelerate launch) this machine's cores shared among them, as the "
                          "launchers' default of 1 thread starves the GPUs (OMP_NUM_THREADS other than 1 is respected)."},
    )
    use_liger_kernel: bool = field(
        default=False,
        metadata={"help": "Fused Triton kernels (liger-kernel) on a GPU when installed. Off: measured slower with NF4 + "
                          "LoRA here (BENCHMARKS.md), and they recompile for each new sequence length."},
    )
    # ---------------------------------------------------------------- data format and bad rows (README "Your own data")
    dataset_format: str = field(
        default=AUTO,
        metadata={"help": f"Layout of the rows, one of {DATASET_FORMATS}. auto: detected from the columns, and "
                          "printed. Each row is written in the model's chat format (its chat template, or Llama-2's)."},
    )
    on_bad_rows: str = field(
        default="error",
        metadata={"help": f"Rows that cannot be trained on as they are, one of {BAD_ROW_POLICIES}: error stops and lists "
                          "them; skip drops them and prints how many, why, and their indices."},
    )
    # ---------------------------------------------------------------- logging, evaluation, checkpoints
    logging_steps: int = field(default=25, metadata={"help": "Print and log the loss every this many optimizer steps."})
    eval_steps: int = field(
        default=0, metadata={"help": "Evaluate on the held-out rows every this many steps (0 = once per epoch)."}
    )
    save_steps: int = field(default=25, metadata={"help": "Write a resumable checkpoint every this many optimizer steps (0 = never)."})
    save_total_limit: int = field(default=3, metadata={"help": "Keep only this many newest checkpoints."})
    report_to: str = field(default="tensorboard", metadata={"help": f"Metric logger, one of {REPORT_TO}."})
    allow_cpu: bool = field(
        default=False, metadata={"help": "Run on the CPU when no CUDA GPU is present (only sensible for tiny models)."}
    )
    # ---------------------------------------------------------------- inference after training
    example_prompt: str = field(
        default="What is a large language model?", metadata={"help": "Question answered by the fine-tuned model at the end."}
    )
    report_prompts: list[str] = field(
        default_factory=lambda: [
            "What is a large language model?",
            "How do I boil an egg?",
            "Explain what a prime number is.",
        ],
        metadata={"help": "Questions answered by the base and the fine-tuned model side by side in report.md."},
    )
    system_prompt: str = field(default="", metadata={"help": "Optional system prompt for inference, in the model's chat format (guanaco has none)."})
    max_new_tokens: int = field(default=200, metadata={"help": "Longest generated answer, in tokens."})
    do_sample: bool = field(default=False, metadata={"help": "Sample instead of greedy decoding."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature (with do_sample)."})
    top_p: float = field(default=0.9, metadata={"help": "Nucleus sampling mass (with do_sample)."})
    preset: str = field(default="", metadata={"help": "Named group of settings applied before your overrides: " + ", ".join(["tiny", "seed"])})


# A preset switches many fields at once; explicit command-line flags still win over it.
PRESETS: dict[str, dict] = {
    # The bundled tiny Llama and data: the seed's recipe (NF4, LoRA r=32/alpha=16 on q/v, batch 1 x
    # accumulation 8, cosine, paged AdamW) on a model small enough to train in about a minute on 2
    # CPU cores. Only the model, the data, the length of training and the learning rate differ.
    "tiny": {
        "model_name": TINY_MODEL_NAME,
        "dataset_name": BUNDLED_DATASET,
        "output_dir": "./results-tiny",
        "new_model": "tiny-llama-finetune",
        "num_train_epochs": 10,
        "learning_rate": 5e-3,
        "logging_steps": 5,
        "save_steps": 20,
        "allow_cpu": True,
        "max_new_tokens": 64,
        # Trained questions show what the fine-tune learnt; the tiny model knows nothing else.
        "example_prompt": "What is the chemical symbol for gold?",
        "report_prompts": ["What is the chemical symbol for gold?", "How many continents are there on Earth?",
                           "What is a large language model?"],
    },
    # The seed project's exact settings, including fp16 compute (use only if you need to reproduce it).
    "seed": {
        "bnb_4bit_compute_dtype": "float16",
        "per_device_train_batch_size": 1,
        "gradient_accumulation_steps": 8,
        "gradient_checkpointing": True,
        "optim": "paged_adamw_32bit",
        "dequantize_frozen": False,
        "pad_to_multiple_of": 1,
        "torch_compile": False,
        "use_liger_kernel": False,
        "fp32_frozen_weights": True,
        "train_on_answers_only": False,
        "eval_fraction": 0.0,
    },
}


class ConfigError(ValueError):
    """One or more settings are wrong; the message lists every problem found."""


def _choice_error(name: str, value, allowed) -> str:
    return f"{name}={value!r} is not allowed; use one of: {', '.join(map(str, allowed))}"


def generation_problems(max_new_tokens: int, do_sample: bool, temperature: float, top_p: float) -> list[str]:
    """Every problem with a set of generation settings, as readable lines (empty list = valid).

    The one check of these settings: validate_config (main.py) and inference.py both call it, so a
    value one entry point accepts the other accepts too.
    """
    problems = []
    if not max_new_tokens >= 1:
        problems.append(f"max_new_tokens={max_new_tokens} must be >= 1 (e.g. 200)")
    if not (math.isfinite(temperature) and temperature >= 0):
        problems.append(f"temperature={temperature} must be a finite number > 0 (e.g. 0.7)")
    elif do_sample and temperature == 0:
        problems.append("temperature=0 with do_sample: sampling needs temperature > 0 (e.g. 0.7); for the single "
                        "most likely answer drop do_sample instead (greedy decoding is the default)")
    if not (math.isfinite(top_p) and 0 < top_p <= 1):
        problems.append(f"top_p={top_p} must be in (0, 1]: the share of probability mass sampled from (e.g. 0.9; 1 = all)")
    return problems


def validate_config(cfg: Config) -> list[str]:
    """Return every problem with `cfg` as a readable line (empty list = valid)."""
    problems = []

    def check(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    check(cfg.learning_rate > 0 and math.isfinite(cfg.learning_rate), f"learning_rate={cfg.learning_rate} must be > 0 (e.g. 2e-4)")
    check(cfg.lora_r >= 1, f"lora_r={cfg.lora_r} must be >= 1 (e.g. 8, 16, 32, 64)")
    check(cfg.lora_alpha > 0, f"lora_alpha={cfg.lora_alpha} must be > 0 (e.g. 16)")
    check(0 <= cfg.lora_dropout < 1, f"lora_dropout={cfg.lora_dropout} must be in [0, 1) (e.g. 0.1)")
    check(len(cfg.lora_target_modules) > 0, "lora_target_modules is empty; name at least one layer, e.g. q_proj v_proj, or auto")
    check(AUTO not in cfg.lora_target_modules or cfg.lora_target_modules == [AUTO],
          f"lora_target_modules={cfg.lora_target_modules} mixes 'auto' with layer names; give either auto or the names")
    check(cfg.dataset_format in DATASET_FORMATS, _choice_error("dataset_format", cfg.dataset_format, DATASET_FORMATS))
    check(cfg.on_bad_rows in BAD_ROW_POLICIES, _choice_error("on_bad_rows", cfg.on_bad_rows, BAD_ROW_POLICIES))
    check(cfg.bnb_4bit_quant_type in QUANT_TYPES, _choice_error("bnb_4bit_quant_type", cfg.bnb_4bit_quant_type, QUANT_TYPES))
    check(cfg.bnb_4bit_compute_dtype in COMPUTE_DTYPES, _choice_error("bnb_4bit_compute_dtype", cfg.bnb_4bit_compute_dtype, COMPUTE_DTYPES))
    check(cfg.optim in OPTIMIZERS, _choice_error("optim", cfg.optim, OPTIMIZERS))
    check(cfg.lr_scheduler_type in SCHEDULERS, _choice_error("lr_scheduler_type", cfg.lr_scheduler_type, SCHEDULERS))
    check(cfg.report_to in REPORT_TO, _choice_error("report_to", cfg.report_to, REPORT_TO))
    check(cfg.performance_mode in PERFORMANCE_MODES, _choice_error("performance_mode", cfg.performance_mode, PERFORMANCE_MODES))
    check(cfg.preset in ("", *PRESETS), _choice_error("preset", cfg.preset, PRESETS))
    check(cfg.max_seq_length >= 1, f"max_seq_length={cfg.max_seq_length} must be >= 1 (e.g. 256)")
    check(cfg.num_train_epochs > 0 or cfg.max_steps > 0, f"num_train_epochs={cfg.num_train_epochs} must be > 0 (or set max_steps)")
    check(cfg.max_steps == -1 or cfg.max_steps >= 1, f"max_steps={cfg.max_steps} must be -1 (off) or >= 1")
    check(cfg.rows_per_step >= 1, f"rows_per_step={cfg.rows_per_step} must be >= 1 (the seed's is 8)")
    check(cfg.per_device_train_batch_size is None or cfg.per_device_train_batch_size >= 1,
          f"per_device_train_batch_size={cfg.per_device_train_batch_size} must be >= 1 (or None for auto)")
    check(cfg.per_device_eval_batch_size >= 1, f"per_device_eval_batch_size={cfg.per_device_eval_batch_size} must be >= 1")
    check(cfg.gradient_accumulation_steps is None or cfg.gradient_accumulation_steps >= 1,
          f"gradient_accumulation_steps={cfg.gradient_accumulation_steps} must be >= 1 (or None for auto)")
    check(cfg.pad_to_multiple_of is None or cfg.pad_to_multiple_of >= 1,
          f"pad_to_multiple_of={cfg.pad_to_multiple_of} must be >= 1 (1 = no rounding, or None for auto)")
    check(cfg.cpu_threads is None or cfg.cpu_threads >= 1, f"cpu_threads={cfg.cpu_threads} must be >= 1 (or None for auto)")
    check(cfg.max_grad_norm > 0, f"max_grad_norm={cfg.max_grad_norm} must be > 0 (e.g. 0.3)")
    check(cfg.weight_decay >= 0, f"weight_decay={cfg.weight_decay} must be >= 0")
    check(0 <= cfg.warmup_ratio < 1, f"warmup_ratio={cfg.warmup_ratio} must be in [0, 1) (e.g. 0.03)")
    check(0 <= cfg.eval_fraction < 1, f"eval_fraction={cfg.eval_fraction} must be in [0, 1) (e.g. 0.1, or 0 for none)")
    check(cfg.logging_steps >= 1, f"logging_steps={cfg.logging_steps} must be >= 1")
    check(cfg.eval_steps >= 0, f"eval_steps={cfg.eval_steps} must be >= 0 (0 = once per epoch)")
    check(cfg.save_steps >= 0, f"save_steps={cfg.save_steps} must be >= 0 (0 = no checkpoints)")
    check(cfg.save_total_limit >= 1, f"save_total_limit={cfg.save_total_limit} must be >= 1")
    problems += generation_problems(cfg.max_new_tokens, cfg.do_sample, cfg.temperature, cfg.top_p)
    check(bool(cfg.model_name.strip()), "model_name is empty; give a hub id or a local folder")
    check(bool(cfg.dataset_name.strip()), "dataset_name is empty; give a hub id or a local file")
    check(bool(cfg.output_dir.strip()), "output_dir is empty; give the folder for the run's files, e.g. --output_dir results")
    check(0 <= cfg.seed < 2**32, f"seed={cfg.seed} must be in [0, 2**32 - 1] (numpy's seed range), e.g. 42")
    check(not (cfg.resume and cfg.overwrite),
          "--resume continues the run in output_dir and --overwrite replaces it; give only one of them")
    problems += _non_finite_numbers(cfg)
    name_problem = adapter_name_problem(cfg.new_model)
    check(name_problem is None, f"new_model={cfg.new_model!r} {name_problem}")
    return problems


def _non_finite_numbers(cfg: Config) -> list[str]:
    """inf and nan pass every `>= 0` check above, and then train on garbage: no float setting may hold them."""
    return [f"{f.name}={getattr(cfg, f.name)} must be a finite number" for f in dataclasses.fields(cfg)
            if isinstance(getattr(cfg, f.name), float) and not math.isfinite(getattr(cfg, f.name))]


def adapter_name_problem(name: str) -> str | None:
    """Why `name` cannot be the adapter's folder inside output_dir, or None.

    The adapter is saved by replacing the folder output_dir/name; a name that resolves anywhere else
    ('.', '..', an absolute path, a path with a separator) would make that replace hit output_dir itself
    or a folder outside it. Names starting with '.' are output_dir's own temporary folders.
    """
    if not name.strip():
        return "is empty; give a folder name such as my-adapter"
    separators = {"/", "\\", os.sep, os.altsep or "/"}
    if name in (".", "..") or any(sep in name for sep in separators) or "\0" in name or os.path.isabs(name):
        return "must be a plain folder name inside output_dir (no '.', '..', separators or absolute paths), e.g. my-adapter"
    if name.startswith("."):
        return "must not start with '.' (output_dir keeps its temporary folders under such names)"
    return None


def _build_parser(preset_defaults: dict):
    # transformers' dataclass parser: one --flag per field, typed, unknown flags rejected.
    from transformers import HfArgumentParser

    parser = HfArgumentParser(Config, description="QLoRA fine-tuning of Llama 2 (see README.md).")
    parser.set_defaults(**preset_defaults)

    def fail(message: str):  # argparse would print the whole usage and exit; say just what was wrong
        raise ConfigError(f"{message} (`python main.py --help` lists every field)")

    parser.error = fail
    for action in parser._actions:  # argparse reads '%' in help as a format code ("30% more" crashed --help)
        if isinstance(action.help, str):
            action.help = action.help.replace("%", "%%")
    return parser


def _preset_from_argv(argv: list[str]) -> str:
    """The one --preset on the command line ('' for none); two are refused, since only one can apply."""
    presets = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == "--preset"]
    presets += [arg.split("=", 1)[1] for arg in argv if arg.startswith("--preset=")]
    if len(presets) > 1:
        raise ConfigError(f"--preset is given {len(presets)} times ({', '.join(presets)}); give one, then override "
                          "single fields by name (`python main.py --help` lists them)")
    return presets[0] if presets else ""


def _unknown_flags(argv: list[str], parser) -> list[str]:
    """Each --flag the parser does not know, with the closest field names as a hint."""
    import difflib

    known = {option for option in parser._option_string_actions if option.startswith("--")}
    names = [f.name for f in dataclasses.fields(Config)]
    problems = []
    for arg in argv:
        flag = arg.split("=", 1)[0]
        if not flag.startswith("--") or flag in known:
            continue
        name = flag[2:].replace("-", "_")
        close = difflib.get_close_matches(name, names, n=3)
        hint = f"; did you mean {', '.join('--' + c for c in close)}?" if close else ""
        problems.append(f"--{name} is not a setting{hint} (`python main.py --help` lists them all)")
    return problems


def parse_config(argv: list[str] | None = None) -> Config:
    """Command line -> validated Config. Raises ConfigError listing every problem.

    Order of precedence: explicit flags > the preset's values > the defaults in this file.
    """
    argv = [str(arg) for arg in (sys.argv[1:] if argv is None else argv)]
    preset = _preset_from_argv(argv)
    if preset and preset not in PRESETS:
        raise ConfigError(_choice_error("preset", preset, PRESETS))
    parser = _build_parser(PRESETS.get(preset, {}))
    unknown = _unknown_flags(argv, parser)
    if unknown:
        raise ConfigError("unknown setting(s):\n  - " + "\n  - ".join(unknown))
    cfg, stray = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if stray:
        raise ConfigError(f"unexpected argument(s) {' '.join(stray)!r}: settings are given as --name value, "
                          "e.g. --dataset_name my_rows.jsonl (`python main.py --help` lists them)")
    problems = validate_config(cfg)
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))
    return cfg


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str) -> None:
    """Write the settings whole or not at all (a temporary file renamed into place): a kill or a full
    disk mid-write never leaves a truncated run_config.json for a resume to trip on."""
    temporary = f"{path}.partial"
    try:
        with open(temporary, "w", encoding="utf-8") as f:
            json.dump(config_to_dict(cfg), f, indent=2)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
