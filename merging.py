"""Merge an adapter into a plain model, measure how far the merge is from the adapter model, export GGUF.

    python inference.py --adapter DIR --merge-to merged/                              # the original weights
    python inference.py --adapter DIR --merge-to merged/ --merge-base dequantized     # the trained function
    python inference.py --adapter DIR --export-gguf model.gguf --gguf-type q8_0       # llama.cpp, Ollama

The adapter was trained on top of the 4-bit weights, so there are two honest merges:
- `original`: the base's original weights + B·A·alpha/r. What a merged Hugging Face folder usually
  is; it differs from the trained function by the 4-bit quantisation error.
- `dequantized`: the 4-bit weights as training saw them, dequantised, + B·A·alpha/r: the trained
  function itself, up to the rounding of the merge dtype.
Each merge is then compared with the adapter model (4-bit base + adapter, the way it was trained)
on held-out rows: the largest and mean |logit difference| and how often both pick the same next
token are printed and saved as merge_check.json in the merged folder, so users can choose.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError

from inference import InferenceError, adapter_settings, conversation, load_for_inference, target_problems
from model_setup import DTYPES, load_base_model, load_tokenizer, resolve_model_path, resolve_runtime
from run_files import free_bytes
from staging import discard, place, publish_permissions, staging_file, staging_folder


def merged_model(adapter: Path, cfg, merge_base: str, dtype_name: str):
    """The base (original or dequantised 4-bit) with the adapter merged in, as a plain transformers model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    dtype = DTYPES[dtype_name]
    if merge_base == "dequantized":
        # The same 4-bit quantisation as training (settings from run_config), on the same kind of device.
        base = load_base_model(cfg, resolve_runtime(cfg), quantized=True).dequantize(dtype).to(dtype)
    else:
        # Merging into 4-bit weights would round the sum back to 4 bits: the original weights are reloaded.
        base = AutoModelForCausalLM.from_pretrained(resolve_model_path(cfg.model_name), dtype=dtype, use_safetensors=True,
                                                    trust_remote_code=cfg.trust_remote_code)
    base.config.use_cache = True
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    return merged.eval()


def merge_adapter(adapter: Path, target: Path, dtype_name: str = "float16", base: str | None = None,
                  merge_base: str = "original", check_rows: int = 0, say=print) -> Path:
    """Write base + adapter merged into the new folder `target`.

    Written and checked in a staging folder of this process's own, then moved into place: an
    interrupted, failed or losing (two merges to one name) run leaves nothing at `target`, and a
    folder there is never one whose merge_check.json is missing because the check was cut short.
    """
    target = new_target(target, "--merge-to", want_folder=True)
    cfg = adapter_settings(adapter, base)
    with written_aside(target, "--merge-to", staging_folder) as staging:
        merged = merged_model(adapter, cfg, merge_base, dtype_name)
        check_free_space(target, model_bytes(merged), "--merge-to")
        merged.save_pretrained(staging, safe_serialization=True)
        load_tokenizer(cfg).save_pretrained(staging)
        if check_rows:
            report = compare_with_adapter(adapter, merged, cfg, check_rows)
            report.update(merge_base=merge_base, dtype=dtype_name)
            (staging / "merge_check.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
            say(format_check(report))
        publish_permissions(staging)
        place(staging, target)
    return target


def new_target(target: Path, flag: str, want_folder: bool) -> Path:
    """The target with links resolved (a link to an empty folder: write into the folder it names);
    InferenceError when something is there already."""
    target = Path(os.path.realpath(target))
    problems = target_problems(flag, target, want_folder)
    if problems:
        raise InferenceError(problems[0])
    return target


@contextlib.contextmanager
def written_aside(target: Path, flag: str, make_staging) -> Iterator[Path]:
    """A staging folder or file for `target` (made before any work: the check that it can be written),
    always removed at the end unless the block placed it; write failures become InferenceError."""
    try:
        staging = make_staging(target, "merging" if flag == "--merge-to" else "writing")
    except OSError as exc:
        raise InferenceError(f"{flag} {str(target)!r}: cannot write in {str(target.parent)!r} "
                             f"({exc.strerror or exc}); choose a place you can write to") from None
    try:
        yield staging
    except FileExistsError:
        raise InferenceError(f"{flag} {str(target)!r} appeared while this ran (another run, or you): it was left as "
                             "it is and this result was dropped; run again with a new name") from None
    except (OSError, SafetensorError) as exc:
        full = "No space left" in str(exc) or getattr(exc, "errno", None) == errno.ENOSPC
        hint = "free some space or choose another disk" if full else "check the disk and the permissions"
        raise InferenceError(f"{flag} {str(target)!r}: writing failed ({getattr(exc, 'strerror', None) or exc}); "
                             f"nothing was left there: {hint}") from None
    finally:
        discard(staging)  # gone already when placed


def model_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.state_dict().values())


def check_free_space(target: Path, need: int, flag: str) -> None:
    """Refuse before writing when the disk cannot hold it (with 5% to spare)."""
    free = free_bytes(target.parent)
    if need * 1.05 > free:
        raise InferenceError(f"{flag} {str(target)!r} needs about {need / 2**30:.2f} GiB and {str(target.parent)!r} "
                             f"has {free / 2**30:.2f} GiB free: free some space or choose another disk")


# ---------------------------------------------------------------------------- how far from the adapter model

def check_inputs(cfg, tokenizer, n_rows: int) -> tuple[list[list[int]], str]:
    """Token ids of up to n_rows held-out rows (the run's own split), or of the report prompts if the data is gone."""
    import data_preparation as dp

    try:
        name = cfg.eval_dataset or cfg.dataset_name
        if not Path(name).exists() and (Path(__file__).parent / name).exists():
            name = str(Path(__file__).parent / name)  # a bundled file named relative to the project
        rows = dp.clean_dataset(dp.load_raw_dataset(name, cfg.dataset_split))[0]
        if not cfg.eval_dataset:
            rows = dp.split_train_eval(rows, cfg.eval_fraction, cfg.seed)[1]
        if rows is None:
            raise dp.DataError("the run had no held-out split")
        texts = rows["text"][:n_rows]
        ids = [dp.tokenize_text(t, tokenizer, cfg.max_seq_length, cfg.train_on_answers_only)["input_ids"] for t in texts]
        return ids, f"{len(ids)} held-out rows of {name}"
    except dp.DataError as exc:
        from chat_format import prompt_ids

        ids = [prompt_ids(tokenizer, conversation(p, cfg.system_prompt)) for p in cfg.report_prompts[:n_rows]]
        return ids, f"{len(ids)} report prompts (held-out rows unavailable: {str(exc).splitlines()[0]})"


def logits_of(model, rows: list[list[int]]) -> list[torch.Tensor]:
    with torch.inference_mode():
        return [model(input_ids=torch.tensor([r], device=model.device)).logits[0].float().cpu() for r in rows]


def compare_with_adapter(adapter: Path, merged, cfg, n_rows: int) -> dict:
    """|logit difference| between `merged` and the adapter model (4-bit base + adapter, as trained)."""
    tokenizer = load_tokenizer(cfg)
    rows, source = check_inputs(cfg, tokenizer, n_rows)
    reference_model = load_for_inference(adapter, cfg.model_name, dequantize="no", compile_="no", say=lambda _: None)[0]
    reference = logits_of(reference_model, rows)
    del reference_model
    device = resolve_runtime(cfg).device
    merged.to(device)
    got = logits_of(merged, rows)
    diffs = torch.cat([(a - b).abs().flatten() for a, b in zip(got, reference)])
    agree = torch.cat([a.argmax(-1) == b.argmax(-1) for a, b in zip(got, reference)]).float().mean()
    return {"rows": source, "positions": int(sum(len(r) for r in rows)), "max_abs_logit_diff": diffs.max().item(),
            "mean_abs_logit_diff": diffs.mean().item(), "top1_agreement": agree.item()}


def format_check(report: dict) -> str:
    return (f"merge ({report['merge_base']} weights, {report['dtype']}) vs the adapter model on {report['rows']}: "
            f"max |logit diff| {report['max_abs_logit_diff']:.3g}, mean {report['mean_abs_logit_diff']:.3g}, "
            f"same top token at {100 * report['top1_agreement']:.1f}% of {report['positions']} positions")


# ---------------------------------------------------------------------------- the command line's merge and export

def export_or_merge(args, adapter: Path, say=print) -> int:
    if args.merge_to:
        path = merge_adapter(adapter, Path(args.merge_to), args.merge_dtype, args.base or None, args.merge_base,
                             args.check_rows, say)
        print(f"merged model written to {path} (load it with AutoModelForCausalLM.from_pretrained)")
        return 0
    path = export_gguf(adapter, Path(args.export_gguf), args.gguf_type, args.merge_base, args.merge_dtype,
                       args.base or None, say)
    print(f"GGUF written to {path} ({path.stat().st_size / 2**20:,.1f} MiB, {args.gguf_type}, "
          f"{args.merge_base} weights + adapter): `llama-cli -m {path}` or an Ollama Modelfile `FROM {path}`")
    return 0


def export_gguf(adapter: Path, path: Path, gguf_type: str, merge_base: str = "original", dtype_name: str = "float16",
                base: str | None = None, say=print) -> Path:
    """The merged model as one GGUF file at the new `path`: written and read back aside, then put in place."""
    from gguf_export import check_gguf, gguf_bytes, write_gguf

    try:
        importlib.import_module("gguf")  # before any work: a missing package is found in a second, not after the merge
    except ImportError as exc:
        raise InferenceError(f"--export-gguf needs the gguf package ({exc}): pip install -r requirements.txt") from None
    path = new_target(path, "--export-gguf", want_folder=False)
    cfg = adapter_settings(adapter, base)
    with written_aside(path, "--export-gguf", staging_file) as staging:
        merged = merged_model(adapter, cfg, merge_base, dtype_name)
        check_free_space(path, gguf_bytes(merged, gguf_type), "--export-gguf")
        write_gguf(merged, load_tokenizer(cfg), staging, gguf_type, name=f"{cfg.model_name} + {adapter.name}", say=say)
        say(check_gguf(staging, merged, gguf_type, shown_as=path))
        place(staging, path)
    return path
