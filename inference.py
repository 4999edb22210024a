"""Use a fine-tune: answer a prompt, chat, answer a file of prompts, merge, or export to GGUF.

    python inference.py --adapter results/Llama-2-7b-chat-finetune "What is a large language model?"
    python inference.py --adapter DIR --chat                   # multi-turn, streamed; /reset, /system TEXT, /exit
    python inference.py --adapter DIR --input prompts.jsonl --output answers.jsonl   # batched, resumable
    python inference.py --adapter DIR --merge-to merged/       # a plain transformers model (vLLM, TGI)
    python inference.py --adapter DIR --export-gguf model.gguf --gguf-type q8_0      # llama.cpp, Ollama

Every prompt is built by chat_format.prompt_ids, token for token as training saw it, and generation
stops on chat_format.stop_token_ids. The adapter folder holds the config it was trained with
(run_config.json): it names the base model and gives the default generation settings.

Decoding is always plain `model.generate`; what changes is only how the same function is computed:
the 4-bit weights may be kept dequantised (the very values the 4-bit kernels compute with) and,
on a GPU, the decoding step compiled with a static KV cache, and the check for finished rows made
one step late so that the host queues each step while the GPU runs the one before. Greedy output is
token for token that of plain generate on the loaded model (tests check it on the CPU in float32).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

if __name__ == "__main__":  # Ctrl-C while torch and transformers import (seconds): a word, not a traceback
    signal.signal(signal.SIGINT, lambda *_: (print("\ninterrupted", file=sys.stderr), os._exit(128 + signal.SIGINT)))

import torch  # noqa: E402
from safetensors import SafetensorError  # noqa: E402

from chat_format import ConversationError, prompt_ids, stop_token_ids  # noqa: E402
from config import Config, ConfigError, generation_problems, validate_config  # noqa: E402
from model_setup import (DTYPES, SetupError, load_base_model, load_tokenizer, quiet_library_noise, resolve_model_path,  # noqa: E402
                         resolve_runtime)
from run_files import json_problem, safetensors_problem  # noqa: E402
from staging import discard, place, publish_permissions, staging_folder  # noqa: E402

PROJECT_DIR = Path(__file__).resolve().parent
CHOICES_AUTO = ("auto", "yes", "no")
MERGE_BASES = ("original", "dequantized")
GGUF_TYPES = ("f16", "q8_0")


class InferenceError(RuntimeError):
    """The adapter or the request cannot be used; the message says what to do."""


# ---------------------------------------------------------------------------- settings

@dataclass
class GenerationSettings:
    max_new_tokens: int = 200
    do_sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.9
    system_prompt: str = ""

    @classmethod
    def from_config(cls, cfg: Config) -> "GenerationSettings":
        return cls(cfg.max_new_tokens, cfg.do_sample, cfg.temperature, cfg.top_p, cfg.system_prompt)

    def check(self) -> "GenerationSettings":
        """Raise InferenceError with every problem (the same rules as main.py's config check)."""
        problems = generation_problems(self.max_new_tokens, self.do_sample, self.temperature, self.top_p)
        if problems:
            raise InferenceError("invalid generation settings:\n  - " + "\n  - ".join(problems))
        return self

    def generate_kwargs(self, tokenizer) -> dict:
        kwargs = dict(do_sample=self.do_sample, pad_token_id=tokenizer.pad_token_id, eos_token_id=stop_token_ids(tokenizer))
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p)
        else:  # the checkpoint's generation_config may carry sampling settings; greedy ignores them
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return kwargs


@dataclass
class InferenceArgs:
    """The command line of inference.py (transformers' dataclass parser, as main.py's)."""

    adapter: str = field(metadata={"help": "adapter folder written by main.py ('adapter saved to ...')"})
    base: str = field(default="", metadata={"help": "base model under the adapter (default: the one it was trained on)"})
    chat: bool = field(default=False, metadata={"help": "multi-turn chat in the terminal; with stdin not a terminal, one user turn per line"})
    input: str = field(default="", metadata={"help": "answer every line of this file: JSON lines {\"prompt\": ...} or training data (a 'text' column)"})
    output: str = field(default="", metadata={"help": "with --input: the answers, one JSON line per input line (an interrupted run resumes)"})
    batch_size: int = field(default=0, metadata={"help": "rows generated together with --input (0 = auto: 32 on a GPU, 8 on a CPU)"})
    max_new_tokens: int | None = field(default=None, metadata={"help": "longest answer in tokens (default: the adapter's run_config)"})
    do_sample: bool = field(default=False, metadata={"help": "sample instead of greedy decoding (greedy unless given)"})
    temperature: float | None = field(default=None, metadata={"help": "sampling temperature, > 0 (with --do_sample)"})
    top_p: float | None = field(default=None, metadata={"help": "nucleus sampling mass, in (0, 1] (with --do_sample)"})
    system_prompt: str | None = field(default=None, metadata={"help": "Llama-2 <<SYS>> prompt (default: the adapter's run_config)"})
    no_4bit: bool = field(default=False, metadata={"help": "load the base unquantised: the original weights, not the 4-bit ones training saw"})
    dequantize: str = field(default="auto", metadata={"help": f"keep the 4-bit weights dequantised (same values, faster, 2 bytes/param), one of {CHOICES_AUTO}; auto: where memory allows"})
    compile: str = field(default="auto", metadata={"help": f"static KV cache + torch.compile of the decoding step, one of {CHOICES_AUTO}; auto: on a GPU for --input"})
    quantized_cache: str = field(default=str(PROJECT_DIR / ".cache" / "4bit"), metadata={"help": "folder where the 4-bit base is saved once so later loads skip quantising ('off' = never)"})
    merge_to: str = field(default="", metadata={"help": "write base + adapter merged into this new folder and exit"})
    merge_base: str = field(default="original", metadata={"help": f"what the adapter is merged into, one of {MERGE_BASES}: the original weights, or the 4-bit weights dequantised (the function that was trained)"})
    merge_dtype: str = field(default="float16", metadata={"help": f"dtype of the merged weights, one of {tuple(DTYPES)}"})
    check_rows: int = field(default=8, metadata={"help": "held-out rows on which a merge is compared with the adapter model (0 = skip)"})
    export_gguf: str = field(default="", metadata={"help": "write the merged model to this GGUF file (llama.cpp, Ollama) and exit"})
    gguf_type: str = field(default="f16", metadata={"help": f"GGUF weight type, one of {GGUF_TYPES}"})


def argument_problems(args: InferenceArgs, prompt: str | None) -> list[str]:
    """Every problem with the command line, found before anything loads."""
    problems = []
    if prompt is not None and not prompt.strip():
        problems.append("the prompt is empty; give the question to answer in quotes")
    modes = [name for name, on in (("a prompt", bool(prompt and prompt.strip())), ("--chat", args.chat), ("--input", bool(args.input)),
                                    ("--merge-to", bool(args.merge_to)), ("--export-gguf", bool(args.export_gguf))) if on]
    if not modes:
        problems.append("nothing to do: give a prompt to answer, --chat, --input FILE --output FILE, --merge-to DIR or --export-gguf FILE")
    elif len(modes) > 1:
        problems.append(f"choose one of: a prompt, --chat, --input, --merge-to, --export-gguf (got {', '.join(modes)})")
    if len(modes) == 1:
        problems += unused_flags(args, modes[0])
    if bool(args.input) != bool(args.output):
        problems.append("--input and --output go together: --input prompts.jsonl --output answers.jsonl")
    if args.input and args.output and Path(args.input).resolve() == Path(args.output).resolve():
        problems.append(f"--output {args.output!r} is the input file; choose another name")
    for name, value, allowed in (("dequantize", args.dequantize, CHOICES_AUTO), ("compile", args.compile, CHOICES_AUTO),
                                 ("merge_base", args.merge_base, MERGE_BASES), ("merge_dtype", args.merge_dtype, tuple(DTYPES)),
                                 ("gguf_type", args.gguf_type, GGUF_TYPES)):
        if value not in allowed:
            problems.append(f"--{name.replace('_', '-')}={value!r} is not allowed; use one of: {', '.join(allowed)}")
    if args.batch_size < 0:
        problems.append(f"--batch_size={args.batch_size} must be >= 1, or 0 for auto")
    if args.check_rows < 0:
        problems.append(f"--check_rows={args.check_rows} must be >= 0")
    if not args.quantized_cache.strip():
        problems.append("--quantized_cache is empty: give a folder, or 'off' to never save the 4-bit copy")
    for flag, target in (("--merge-to", args.merge_to), ("--export-gguf", args.export_gguf)):
        if target:
            problems += target_problems(flag, Path(target), want_folder=flag == "--merge-to")
            problems += run_owned_problems(flag, Path(target), Path(args.adapter))
    if args.no_4bit and args.dequantize == "yes":
        problems.append("--no_4bit loads unquantised weights: there is nothing to dequantise; drop --dequantize yes")
    return problems


# The flags each mode uses; any other flag given away from its default is refused, not ignored.
GENERATION_FLAGS = ("base", "max_new_tokens", "do_sample", "temperature", "top_p", "system_prompt", "no_4bit",
                    "dequantize", "compile", "quantized_cache")
MODE_FLAGS = {
    "a prompt": GENERATION_FLAGS,
    "--chat": GENERATION_FLAGS,
    "--input": GENERATION_FLAGS + ("batch_size",),
    "--merge-to": ("base", "merge_base", "merge_dtype", "check_rows"),
    "--export-gguf": ("base", "merge_base", "merge_dtype", "gguf_type"),
}
ALWAYS_FLAGS = ("adapter", "chat", "input", "output", "merge_to", "export_gguf")


def unused_flags(args: "InferenceArgs", mode: str) -> list[str]:
    """Each flag set away from its default that `mode` would not use (a silently ignored flag misleads)."""
    used = MODE_FLAGS[mode] + ALWAYS_FLAGS
    given = [f.name for f in dataclasses.fields(args) if f.name not in used and getattr(args, f.name) != f.default]
    return [f"--{name} does not apply to {mode}; drop it" for name in given]


def run_owned_problems(flag: str, target: Path, adapter: Path) -> list[str]:
    """A target inside the adapter folder or another folder of its run would go with the run's next --overwrite."""
    from run_files import earlier_run_files

    run_dir = adapter.resolve().parent
    try:
        first = Path(os.path.realpath(target)).relative_to(run_dir).parts[0]
    except (ValueError, IndexError):
        return []
    if first in earlier_run_files(run_dir, adapter.name) and Path(os.path.realpath(target)) != run_dir / first:
        return [f"{flag} {str(target)!r} is inside {str(run_dir / first)!r}, which belongs to the training run "
                "(its next --overwrite replaces it): choose a place outside it"]
    return []


def target_problems(flag: str, target: Path, want_folder: bool) -> list[str]:
    """A merge or export never replaces anything: an existing target is refused before any work."""
    if want_folder and target.exists() and not target.is_dir():
        return [f"{flag} {str(target)!r} is an existing file; give the path of a new folder for the merged model"]
    if want_folder and target.is_dir() and any(target.iterdir()):
        return [f"{flag} {str(target)!r} already exists and is not empty; choose a new folder for the merged model"]
    if not want_folder and target.exists():
        return [f"{flag} {str(target)!r} already exists; choose a new file name (nothing is overwritten)"]
    if not want_folder and not target.parent.is_dir():
        return [f"{flag} {str(target)!r}: the folder {str(target.parent)!r} does not exist"]
    return []


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help keeps the module docstring's layout and shows the defaults its help texts do not name."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default in (None, "", False, argparse.SUPPRESS) or "default" in text:
            return text
        return f"{text} (default: {action.default})"


def parse_args(argv: list[str] | None = None) -> tuple[InferenceArgs, str | None]:
    """(arguments, prompt or None); raises InferenceError listing every problem."""
    from transformers import HfArgumentParser

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(InferenceArgs, description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("prompt", nargs="?", help="the question to answer")

    def fail(message: str):
        raise InferenceError(f"{message} (`python inference.py --help` lists every option)")

    parser.error = fail
    unknown = unknown_flags(argv, parser)
    if unknown:
        fail("; ".join(unknown))
    args, rest, stray = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if stray:
        fail(f"unexpected words {' '.join(stray)!r} after the prompt {rest.prompt!r}: put the whole prompt in quotes, "
             f'e.g. python inference.py --adapter DIR "{" ".join([rest.prompt or "", *stray]).strip()}"')
    problems = argument_problems(args, rest.prompt)
    if problems:
        raise InferenceError("invalid arguments:\n  - " + "\n  - ".join(problems))
    return args, rest.prompt


def unknown_flags(argv: list[str], parser) -> list[str]:
    known = [option for option in parser._option_string_actions if option.startswith("--")]
    problems = []
    for arg in argv:
        flag = arg.split("=", 1)[0]
        if flag.startswith("--") and flag not in known:
            close = difflib.get_close_matches(flag, known, n=2)
            problems.append(f"{flag} is not an option" + (f"; did you mean {' or '.join(close)}?" if close else ""))
    return problems


def settings_from(args: InferenceArgs, cfg: Config) -> GenerationSettings:
    """The generation settings: each flag given wins, the rest come from the adapter's run_config.

    Sampling is the exception: greedy unless --do_sample is given, whatever the run used.
    """
    stored = GenerationSettings.from_config(cfg)
    given = {name: getattr(args, name) for name in ("max_new_tokens", "temperature", "top_p", "system_prompt")
             if getattr(args, name) is not None}
    return dataclasses.replace(stored, do_sample=args.do_sample, **given).check()


# ---------------------------------------------------------------------------- the adapter and its base

def read_adapter_config(adapter: Path) -> Config:
    """The Config the adapter was trained with; fails clearly on a missing or broken folder."""
    if not adapter.is_dir():
        raise InferenceError(f"adapter folder {str(adapter)!r} does not exist; pass the folder that training printed ('adapter saved to ...')")
    missing = [name for name in ("adapter_config.json", "adapter_model.safetensors", "run_config.json") if not (adapter / name).is_file()]
    if missing:
        raise InferenceError(f"{adapter} is not a complete adapter folder: missing {', '.join(missing)}; re-run training or pick another folder")
    try:
        stored = json.loads((adapter / "run_config.json").read_text(encoding="utf-8"))
        json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InferenceError(f"{adapter} is corrupt: a config file does not parse ({exc}); re-run training") from None
    if not isinstance(stored, dict) or not isinstance(stored.get("model_name"), str) or not stored["model_name"]:
        raise InferenceError(f"{adapter / 'run_config.json'} does not name the base model ('model_name'); it is not what "
                             "training writes: re-run training, or restore the file from the run's folder")
    known = {k: v for k, v in stored.items() if k in Config.__dataclass_fields__}
    cfg = Config(**known)
    problems = validate_config(cfg)
    if problems:
        raise InferenceError(f"{adapter}/run_config.json holds invalid settings: {'; '.join(problems)}")
    return cfg


def check_adapter_base(adapter: Path, base_model_name: str) -> None:
    """Refuse an adapter trained on another base: its shapes may even fit, its weights never do."""
    trained_on = json.loads((adapter / "run_config.json").read_text(encoding="utf-8"))["model_name"]
    if trained_on != base_model_name:
        raise InferenceError(
            f"the adapter in {adapter} was trained on {trained_on!r}, not on {base_model_name!r}; "
            f"use --base {trained_on} (or the adapter trained for your base)"
        )


def adapter_settings(adapter: Path, base: str | None = None) -> Config:
    cfg = read_adapter_config(adapter)
    if base:
        check_adapter_base(adapter, base)
    cfg.allow_cpu = True  # inference of a small model on a CPU is fine; resolve_runtime still picks the GPU if present
    return cfg


def base_fingerprint(cfg: Config, compute_dtype: torch.dtype) -> str:
    """A name for the 4-bit copy of this base: its files (name, size, mtime) and the quantisation settings.

    A changed base file, other quantisation settings or another compute dtype give another name, so a
    stale copy is never loaded.
    """
    import hashlib

    import bitsandbytes
    import transformers

    path = Path(resolve_model_path(cfg.model_name))
    if not path.is_dir():  # a hub id: its files live in the hub cache's snapshot folder
        from transformers.utils import cached_file

        path = Path(cached_file(cfg.model_name, "config.json")).parent
    files = sorted(path.glob("*.safetensors")) + [path / "config.json"]
    stamp = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.exists()]
    key = json.dumps([str(path.resolve()), stamp, cfg.bnb_4bit_quant_type, cfg.use_nested_quant, str(compute_dtype),
                      bitsandbytes.__version__, transformers.__version__])
    name = "".join(c if c.isalnum() else "-" for c in cfg.model_name.split("/")[-1])[:40]
    return f"{name}-{cfg.bnb_4bit_quant_type}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def human_size(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:.2f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.1f} MiB"


def load_base(cfg: Config, runtime, quantized: bool, cache_root: Path | None, say=print):
    """The base as training saw it (4-bit), loaded from the saved 4-bit copy when there is one.

    Quantising the fp16 weights to NF4 is most of a 7B load; the 4-bit copy (about a quarter of
    the fp16 size on disk) is written once, atomically, and loads without re-quantising. A copy that
    is damaged (a cut file, a deleted one) is said so, quantised again and replaced.
    """
    if not quantized or cache_root is None:
        return load_base_model(cfg, runtime, quantized=quantized)
    copy = cache_root / base_fingerprint(cfg, runtime.compute_dtype)
    start = time.perf_counter()
    if copy.exists():
        problem = saved_copy_problem(copy)
        if problem is None:
            try:
                model = load_base_model(cfg, runtime, saved_4bit=str(copy))
                say(f"base: 4-bit copy loaded from {copy} ({human_size(folder_bytes(copy))}) in {time.perf_counter() - start:.1f} s")
                return model
            except (OSError, ValueError, KeyError, SafetensorError, SetupError) as exc:
                problem = f"it does not load: {str(exc).splitlines()[0][:200]}"
        say(f"base: the 4-bit copy in {copy} is damaged ({problem}); quantising again to replace it")
    model = load_base_model(cfg, runtime)
    quantise_s = time.perf_counter() - start
    say(f"base: quantised to 4 bits at load ({quantise_s:.1f} s); {save_4bit_copy(model, copy)}")
    return model


def saved_copy_problem(copy: Path) -> str | None:
    """What is wrong with a saved 4-bit copy's files, or None when they are whole."""
    problem = json_problem(copy / "config.json")
    if problem:
        return problem
    index = copy / "model.safetensors.index.json"
    if index.exists():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
            return f"{index.name} is truncated or not valid"
    else:
        shards = ["model.safetensors"]
    return next(filter(None, (safetensors_problem(copy / shard) for shard in shards)), None)


def save_4bit_copy(model, copy: Path) -> str:
    """Save the quantised base at `copy` (replacing a damaged copy, never a whole one); what happened, as a note."""
    later = "later loads will quantise again (--quantized_cache off to stop trying)"
    try:
        staging = staging_folder(copy, "saving")
    except OSError as exc:  # a read-only cache costs only the speed-up
        return f"could not save the 4-bit copy in {copy.parent} ({exc.strerror or exc}); {later}"
    try:
        model.save_pretrained(staging, safe_serialization=True)
        publish_permissions(staging)
        if copy.exists() and saved_copy_problem(copy):
            remove_damaged_copy(copy)
        place(staging, copy)
        return f"saved to {copy} ({human_size(folder_bytes(copy))}) so that later loads skip it"
    except FileExistsError:
        return f"another process saved the same 4-bit copy to {copy} meanwhile; later loads use it"
    except (OSError, SafetensorError) as exc:  # a full disk costs only the speed-up
        return f"could not save the 4-bit copy to {copy} ({getattr(exc, 'strerror', None) or exc}); {later}"
    finally:
        discard(staging)


def remove_damaged_copy(copy: Path) -> None:
    """Move a damaged copy aside under a name of this process's own, then delete it (the cache is ours)."""
    aside = staging_folder(copy, "damaged")
    try:
        os.rename(copy, aside)  # onto the new empty folder
    except FileNotFoundError:  # another process removed it first
        pass
    discard(aside)


# ---------------------------------------------------------------------------- how to decode

DEFERRED_STOP_REASON = "stop check one step late (the host queues each step while the GPU runs the last)"


@dataclass
class DecodingPlan:
    dequantize: bool
    compile: bool
    reason: str
    defer_stop_check: bool = True  # on a GPU: see stop_check_deferred


def free_memory_bytes(runtime) -> int:
    if runtime.is_cuda:
        return torch.cuda.mem_get_info(torch.device(runtime.device))[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def plan_decoding(dequantize: str, compile_: str, quantized: bool, is_cuda: bool, n_weights: int, dtype_bytes: int,
                  free_bytes: int, many_rows: bool) -> DecodingPlan:
    """Choose how the same function is computed; the user's yes/no always wins over auto.

    - dequantise: the 4-bit weights are replaced by their dequantised values (what the 4-bit kernels
      compute with at every step), in the compute dtype. auto: when the extra memory
      (n_weights x dtype bytes) leaves a quarter of the free memory for activations and the KV cache.
    - compile: a static KV cache and torch.compile of the decoding step (CUDA graphs): 4-5x faster
      decoding at batch 1 on a GPU, after a compilation that takes tens of seconds. bitsandbytes
      layers do not compile, so it needs dequantised (or unquantised) weights. auto: on a GPU for a
      file of prompts, where the compilation pays for itself; not for one answer or a chat.
    """
    reasons = []
    if not quantized:
        deq = False
        if dequantize == "yes":
            raise InferenceError("--dequantize yes: the base is not loaded in 4 bits, there is nothing to dequantise")
    elif dequantize != "auto":
        deq = dequantize == "yes"
        reasons.append(f"dequantise {dequantize} (as asked)")
    else:
        need = n_weights * dtype_bytes
        deq = need * 4 / 3 < free_bytes
        reasons.append(f"dequantise {'yes' if deq else 'no'} (auto: {human_size(need)} more needed, "
                       f"{human_size(free_bytes)} free)")
    compilable = deq or not quantized
    if compile_ == "yes" and not compilable:
        raise InferenceError("--compile yes needs --dequantize yes (or --no_4bit): bitsandbytes 4-bit layers do not compile")
    if compile_ != "auto":
        comp = compile_ == "yes"
        reasons.append(f"compile {compile_} (as asked)")
    else:
        comp = is_cuda and many_rows and compilable
        why = ("a GPU, many rows and compilable weights" if comp else "no GPU" if not is_cuda else
               "one answer or a chat: compiling costs more than it saves" if not many_rows else "4-bit layers do not compile")
        reasons.append(f"compile {'yes' if comp else 'no'} (auto: {why})")
    if is_cuda:
        reasons.append(DEFERRED_STOP_REASON)
    return DecodingPlan(deq, comp, "; ".join(reasons), defer_stop_check=is_cuda)


def weight_count(model) -> int:
    """Parameters of the 4-bit layers (their real element count), the ones dequantising would grow."""
    return sum(p.quant_state.shape.numel() for p in model.parameters() if getattr(p, "quant_state", None) is not None)


def load_for_inference(adapter: Path, base: str | None = None, quantized: bool | None = None, dequantize: str = "no",
                       compile_: str = "no", many_rows: bool = False, cache_root: Path | None = None, say=print):
    """(model, tokenizer, cfg, plan): the base (4-bit unless told) with the adapter on top, in eval mode."""
    from peft import PeftModel

    cfg = adapter_settings(adapter, base)
    runtime = resolve_runtime(cfg)
    tokenizer = load_tokenizer(cfg)
    quantized = cfg.use_4bit if quantized is None else quantized
    model = load_base(cfg, runtime, quantized, cache_root, say)
    dtype_bytes = torch.finfo(runtime.compute_dtype).bits // 8
    plan = plan_decoding(dequantize, compile_, quantized, runtime.is_cuda, weight_count(model), dtype_bytes,
                         free_memory_bytes(runtime), many_rows)
    if plan.dequantize:
        model = model.dequantize(runtime.compute_dtype)
    model.config.use_cache = True  # load_base_model switches it off for training
    try:
        model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
    except Exception as exc:  # shape mismatch, bad safetensors, ...
        raise InferenceError(f"could not load the adapter in {adapter} onto {cfg.model_name!r}: {exc}") from exc
    adapter_in_compute_dtype(model, runtime.compute_dtype)
    model.eval()
    return model, tokenizer, cfg, plan


def adapter_in_compute_dtype(model, compute_dtype: torch.dtype) -> None:
    """LoRA weights in the compute dtype, the precision training's autocast ran them in.

    PEFT loads them in float32, which turns each LoRA product into a float32 matmul with casts of the
    activations around it: on a GPU in bf16, slower for a function that training never computed.
    """
    for name, param in model.named_parameters():
        if "lora_" in name and param.dtype != compute_dtype:
            param.data = param.data.to(compute_dtype)


# ---------------------------------------------------------------------------- generating

@dataclass
class Answer:
    text: str
    token_ids: list[int]  # the answer's tokens, without the stop token
    tokens: int  # tokens generated, the stop token included
    stop_reason: str  # "stop": a stop token ended it; "length": max_new_tokens did


def context_window(model) -> int:
    return int(model.config.max_position_embeddings)


def fit_problem(n_prompt: int, max_new_tokens: int, window: int) -> str | None:
    """Why a prompt of n_prompt tokens cannot be answered in the model's context window (None if it can).

    Past the window, Llama's positions are ones it never saw: the output turns to garbage, silently.
    """
    if n_prompt + max_new_tokens <= window:
        return None
    room = window - n_prompt
    fix = f"shorten it, or lower max_new_tokens to {room} or less" if room >= 1 else "shorten it"
    return (f"the prompt is {n_prompt:,} tokens; with max_new_tokens={max_new_tokens} that is "
            f"{n_prompt + max_new_tokens:,}, more than the model's context of {window:,} tokens: {fix}")


def generate_kwargs_for(plan: DecodingPlan | None, max_len: int) -> dict:
    """The cache and compile arguments of generate() for a plan (nothing for plain decoding).

    The static cache is sized in steps of 256 positions, so that later calls reuse the compiled graph.
    """
    if plan is None or not plan.compile:
        return {}
    from transformers import CompileConfig

    compile_config = CompileConfig(fullgraph=False)
    compile_config._compile_all_devices = True  # also on a CPU: the tests compile on one
    return dict(cache_implementation="static", max_cache_len=-(-max_len // 256) * 256, compile_config=compile_config)


@contextlib.contextmanager
def stop_check_deferred(enabled: bool):
    """Within this block, generate() reads "are all rows finished?" one step late, on any device.

    Reading that flag every step makes the host wait for the GPU, so the GPU then idles while the
    host prepares the next step (about 3.5 ms of Python per token on an H200 host). transformers has
    the cure, DeferredStopCheck: the flag is copied asynchronously and read a step later, and the one
    extra step that this runs past the end is undone, so the tokens are the same. transformers 5
    turns it on only for Apple's mps devices ("enable it for cuda if we observe perf gains": a 7B
    model on an H200 decodes 16-19% faster, BENCHMARKS.md); this lifts only the device condition.
    Without that class (another transformers version), generate runs as it is.
    """
    from transformers.generation import utils as generation_utils

    deferred = getattr(generation_utils, "DeferredStopCheck", None)
    original = getattr(deferred, "__dict__", {}).get("is_supported")
    if not enabled or not isinstance(original, staticmethod):
        yield
        return

    def is_supported(device, *args, **kwargs):  # transformers' own rules, with the device taken as mps
        return original.__func__(torch.device("mps"), *args, **kwargs)

    deferred.is_supported = staticmethod(is_supported)
    try:
        yield
    finally:
        deferred.is_supported = original


def generate_batch(model, tokenizer, prompts: list[list[int]], settings: GenerationSettings, plan: DecodingPlan | None = None,
                   max_new_tokens: list[int] | None = None, streamer=None) -> list[Answer]:
    """One generate() call on prompts left-padded to the same length; an Answer per prompt.

    Left padding with an attention mask that is 0 on the padding: generate then numbers each row's
    positions from its first real token, so a row's answer is the one it gets alone. A row whose
    max_new_tokens is below the batch's is cut at its own limit (greedy: the same tokens it gets alone).
    On a GPU the stop check is deferred (stop_check_deferred) unless the plan says otherwise.
    """
    limits = max_new_tokens or [settings.max_new_tokens] * len(prompts)
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=model.device)
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    model.eval()
    defer = model.device.type == "cuda" and (plan is None or plan.defer_stop_check)
    with torch.inference_mode(), stop_check_deferred(defer):
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max(limits),
                             streamer=streamer, **settings.generate_kwargs(tokenizer),
                             **generate_kwargs_for(plan, width + max(limits)))
    stops = set(stop_token_ids(tokenizer))
    return [answer_of(row[width:].tolist()[:limit], stops, tokenizer) for row, limit in zip(out, limits)]


def answer_of(new_ids: list[int], stops: set[int], tokenizer) -> Answer:
    end = next((i for i, t in enumerate(new_ids) if t in stops), None)
    ids = new_ids if end is None else new_ids[:end]
    text = tokenizer.decode(ids, skip_special_tokens=True).strip()
    return Answer(text, ids, len(new_ids) if end is None else end + 1, "length" if end is None else "stop")


def conversation(question: str, system_prompt: str = "", history: list[dict] | None = None) -> list[dict]:
    """Messages for chat_format: an optional system message, earlier turns, then the question."""
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return system + list(history or []) + [{"role": "user", "content": question}]


def prompt_of(tokenizer, messages: list[dict], max_new_tokens: int, window: int) -> list[int]:
    """The prompt's token ids; InferenceError when the conversation is malformed or does not fit."""
    try:
        ids = prompt_ids(tokenizer, messages)
    except ConversationError as exc:
        raise InferenceError(str(exc)) from None
    problem = fit_problem(len(ids), max_new_tokens, window)
    if problem:
        raise InferenceError(problem)
    return ids


def answer_many(model, tokenizer, conversations: list[list[dict]], settings: GenerationSettings,
                plan: DecodingPlan | None = None, batch_size: int = 8, max_new_tokens: list[int] | None = None,
                progress=None) -> list[Answer]:
    """Answers to many conversations, in their order, generated in batches of similar length.

    Rows are sorted by (max_new_tokens, prompt length) so that a batch pads little and stops together.
    progress(n) is called after each batch with the number of rows it answered.
    """
    limits = max_new_tokens or [settings.max_new_tokens] * len(conversations)
    window = context_window(model)
    prompts = [prompt_of(tokenizer, c, n, window) for c, n in zip(conversations, limits)]
    order = sorted(range(len(prompts)), key=lambda i: (limits[i], len(prompts[i])))
    answers: list[Answer | None] = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        for i, answer in zip(chunk, generate_batch(model, tokenizer, [prompts[i] for i in chunk], settings, plan,
                                                   [limits[i] for i in chunk])):
            answers[i] = answer
        if progress:
            progress(chunk, [answers[i] for i in chunk])
    return answers


def answer(model, tokenizer, question: str, settings: GenerationSettings, plan: DecodingPlan | None = None,
           streamer=None) -> Answer:
    """The answer to one question, in the format training used."""
    ids = prompt_of(tokenizer, conversation(question, settings.system_prompt), settings.max_new_tokens, context_window(model))
    return generate_batch(model, tokenizer, [ids], settings, plan, streamer=streamer)[0]


# ---------------------------------------------------------------------------- command line

def announce(args: InferenceArgs, cfg: Config, plan: DecodingPlan, settings: GenerationSettings, say) -> None:
    how = "greedy" if not settings.do_sample else f"sampling (temperature {settings.temperature}, top_p {settings.top_p})"
    say(f"model: {cfg.model_name} + adapter {args.adapter}; decoding: {plan.reason}; {how}, "
        f"at most {settings.max_new_tokens} new tokens")


def run(args: InferenceArgs, prompt: str | None) -> int:
    adapter = Path(args.adapter)
    cache_root = None if args.quantized_cache.strip().lower() == "off" else Path(args.quantized_cache)
    err = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731 - notes go to stderr, answers to stdout
    if args.merge_to or args.export_gguf:
        from merging import export_or_merge

        return export_or_merge(args, adapter, say=err)
    cfg = adapter_settings(adapter, args.base or None)
    settings = settings_from(args, cfg)
    model, tokenizer, cfg, plan = load_for_inference(
        adapter, args.base or None, quantized=False if args.no_4bit else None, dequantize=args.dequantize,
        compile_=args.compile, many_rows=bool(args.input), cache_root=cache_root, say=err)
    announce(args, cfg, plan, settings, err)
    window = context_window(model)
    if settings.max_new_tokens >= window:
        raise InferenceError(f"max_new_tokens={settings.max_new_tokens} leaves no room for a prompt in the model's "
                             f"context of {window:,} tokens; give --max_new_tokens below {window:,} (a few hundred is usual)")
    if args.chat:
        from chat import run_chat

        return run_chat(model, tokenizer, settings, plan)
    if args.input:
        from batch_inference import run_batch

        return run_batch(model, tokenizer, settings, plan, Path(args.input), Path(args.output), args, say=err)
    result = answer(model, tokenizer, prompt, settings, plan)
    print(result.text)
    if result.stop_reason == "length":
        err(f"(the answer was cut at max_new_tokens={settings.max_new_tokens})")
    return 0


def main(argv: list[str] | None = None) -> int:
    from transformers.utils import logging as hf_logging

    from data_preparation import DataError

    quiet_library_noise()  # before bitsandbytes is first imported (by the model load below)
    hf_logging.set_verbosity_error()  # "modules are dequantized in ..." and the like: nothing a user can act on
    try:
        args, prompt = parse_args(argv)
        return run(args, prompt)
    except (InferenceError, SetupError, ConfigError, DataError) as exc:
        hint = "" if "--help" in str(exc) else "\n(`python inference.py --help` lists every option)"
        print(f"error: {exc}{hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    # Run the module imported under its own name: merging, chat and batch_inference import
    # InferenceError from `inference`, and `__main__` would hold a second class that main() cannot catch.
    import inference

    signal.signal(signal.SIGINT, signal.default_int_handler)  # from here main() handles Ctrl-C
    sys.exit(inference.main())
