"""Write a checkpoint once in 4 bits (NF4), layer by layer, for FSDP runs of models bigger than one GPU.

    python quantize.py --model_name NousResearch/Llama-2-70b-hf --out llama-2-70b-nf4    # one GPU, minutes
    accelerate launch --config_file launch/fsdp_qlora.yaml main.py --model_name llama-2-70b-nf4

Why: transformers quantises a checkpoint while loading it, onto the device it loads to. Under FSDP
every process would then hold the whole 4-bit model on its GPU before sharding it (~36 GiB for
Llama-2-70B: more than a 24 GiB card); on the CPU the same quantisation takes hours. A checkpoint
already in 4 bits loads into CPU memory instead, and each GPU receives only its shard
(model_setup.placement).

Here one tensor at a time goes to the GPU, is quantised with bitsandbytes exactly as loading would
(the same function, blocksize and settings: tests/test_parallel.py checks the reloaded model's logits
bit for bit) and comes back; the GPU never holds more than one weight matrix. The packed 4-bit values
are stored as words of the compute dtype (bnb_4bit_quant_storage), as FSDP needs. The folder written
is what transformers' save_pretrained writes for a bitsandbytes 4-bit model: from_pretrained reads it
back with no extra argument.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import torch

from staging import discard, place, publish_permissions, staging_folder

SHARD_BYTES = 2 * 2**30  # output file size: small enough to write and read in a few seconds each
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                "generation_config.json", "chat_template.jinja")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class QuantizeArgs:
    model_name: str = field(metadata={"help": "Local folder (or hub id) of the model in 16/32-bit safetensors."})
    out: str = field(metadata={"help": "Folder to write the 4-bit checkpoint to (must not exist)."})
    compute_dtype: str = field(default="bfloat16", metadata={
        "help": "The dtype training computes in, which also stores the packed 4-bit values: bfloat16 (float16 on GPUs "
                "without it; float32 on a CPU)."})
    quant_type: str = field(default="nf4", metadata={"help": "nf4 or fp4, as bnb_4bit_quant_type."})
    use_nested_quant: bool = field(default=False, metadata={
        "help": "Quantise the quantisation statistics too: they are not sharded by FSDP, so every GPU holds them all "
                "(70B: ~4 GiB plain, ~1 GiB nested)."})
    device: str = field(default="cuda", metadata={"help": "Where to quantise (cpu works, but takes hours for 70B)."})


class QuantizeError(ValueError):
    """The conversion cannot be done as asked; the message says why and what to do."""


def bnb_config(compute_dtype: torch.dtype, quant_type: str, nested: bool):
    """The quantization_config the checkpoint carries: what main.py would pass under FSDP."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_compute_dtype=compute_dtype,
                              bnb_4bit_use_double_quant=nested, bnb_4bit_quant_storage=compute_dtype)


def quantized_weight_names(model_config) -> set[str]:
    """The weights transformers' bitsandbytes integration turns into 4-bit ones: every linear layer's,
    except the output layer's. Read from the model's skeleton on the meta device (no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model_config)
    head = skeleton.get_output_embeddings()
    return {f"{name}.weight" for name, module in skeleton.named_modules()
            if type(module) is torch.nn.Linear and module is not head}


def quantize_weight(name: str, weight: torch.Tensor, config, device: str) -> dict[str, torch.Tensor]:
    """One weight matrix in 4 bits: the packed values under `name` and the statistics under `name.*`,
    the keys bitsandbytes' Linear4bit writes to a state dict."""
    import bitsandbytes as bnb

    dtype = config.bnb_4bit_compute_dtype  # the dtype from_pretrained(dtype=...) loads it in before quantising
    packed, state = bnb.functional.quantize_4bit(
        weight.to(device=device, dtype=dtype).contiguous(), blocksize=64, quant_type=config.bnb_4bit_quant_type,
        compress_statistics=config.bnb_4bit_use_double_quant, quant_storage=config.bnb_4bit_quant_storage)
    tensors = {name: packed.cpu()}
    tensors.update({f"{name}.{key}": value.cpu() for key, value in state.as_dict(packed=True).items()})
    return tensors


def checkpoint_tensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a safetensors checkpoint, one at a time (never the whole model in memory)."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise QuantizeError(f"{folder} holds no *.safetensors files; convert from a safetensors checkpoint")
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)


def write_checkpoint(out: Path, model_config, tensors: Iterable[tuple[str, torch.Tensor]], config,
                     device: str, shard_bytes: int = SHARD_BYTES) -> Path:
    """Write `tensors` (name, 16/32-bit tensor) as a 4-bit checkpoint in `out`: linear weights quantised
    on `device`, everything else in the compute dtype; config.json with the quantization_config."""
    from safetensors.torch import save_file

    quantize = quantized_weight_names(model_config)
    out.mkdir(parents=True, exist_ok=True)
    shard, shard_size, weight_map, total = {}, 0, {}, 0

    def flush():
        nonlocal shard, shard_size
        if shard:
            name = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
            shard, shard_size = {}, 0

    for name, tensor in tensors:
        if name in quantize:
            converted = quantize_weight(name, tensor, config, device)
        else:
            converted = {name: tensor.to(config.bnb_4bit_compute_dtype) if tensor.is_floating_point() else tensor}
        for key, value in converted.items():
            shard[key] = value.contiguous()
            size = value.numel() * value.element_size()
            shard_size, total = shard_size + size, total + size
        if shard_size >= shard_bytes:
            flush()
    flush()
    missing = quantize - set(weight_map)
    if missing:
        raise QuantizeError(f"the checkpoint lacks {len(missing)} linear weights of its own config, e.g. {sorted(missing)[0]}")
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}, indent=2))
    model_config.quantization_config = config.to_dict()
    model_config.dtype = config.bnb_4bit_compute_dtype
    model_config.save_pretrained(out)
    return out


def convert(args: QuantizeArgs) -> Path:
    from transformers import AutoConfig

    out = Path(args.out)
    if out.exists():
        raise QuantizeError(f"--out {out} already exists; pick a new folder (nothing was changed)")
    if args.compute_dtype not in DTYPES:
        raise QuantizeError(f"--compute_dtype {args.compute_dtype!r}: use one of {', '.join(DTYPES)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise QuantizeError("--device cuda but no CUDA GPU is visible; use a GPU machine (or --device cpu: hours for 70B)")
    source = resolve_source(args.model_name)
    model_config = AutoConfig.from_pretrained(source)
    if getattr(model_config, "quantization_config", None) is not None:
        raise QuantizeError(f"{args.model_name} is already quantised ({model_config.quantization_config.get('quant_method')})")
    config = bnb_config(DTYPES[args.compute_dtype], args.quant_type, args.use_nested_quant)
    try:
        staging = staging_folder(out, "writing")  # an interrupted run leaves no half checkpoint at --out
    except OSError as exc:
        raise QuantizeError(f"--out {out}: cannot write in {out.parent} ({exc.strerror or exc})") from None
    try:
        write_checkpoint(staging, model_config, checkpoint_tensors(source), config, args.device)
        for name in COPIED_FILES:
            if (source / name).is_file():
                shutil.copy(source / name, staging / name)
        publish_permissions(staging)
        place(staging, out)
    except FileExistsError:
        raise QuantizeError(f"--out {out} appeared while this ran; it was left as it is (run again with a new folder)") from None
    except OSError as exc:
        raise QuantizeError(f"--out {out}: writing failed ({exc.strerror or exc}); nothing was left there") from None
    finally:
        discard(staging)
    return out


def resolve_source(model_name: str) -> Path:
    """A local folder as it is (tiny-llama: its cached folder); a hub id downloaded (its safetensors,
    config and tokenizer only). One that cannot be found is a QuantizeError saying what to do."""
    from model_setup import load_error, resolve_model_path

    local = Path(resolve_model_path(model_name)).expanduser()
    if local.is_dir():
        return local
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model_name, allow_patterns=["*.safetensors", "*.json", "tokenizer.model", "*.jinja"]))
    except (OSError, ValueError) as exc:  # not found, offline, or not a valid hub id
        raise QuantizeError(str(load_error(model_name, "files", exc)).replace("--model_name", "--model_name of quantize.py")) from None


def main(argv: list[str] | None = None) -> int:
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(QuantizeArgs).parse_args_into_dataclasses(args=argv)
    try:
        out = convert(args)
    except QuantizeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted (nothing was written to --out)", file=sys.stderr)
        return 130
    print(f"4-bit checkpoint written to {out}; train it with: accelerate launch --config_file launch/fsdp_qlora.yaml "
          f"main.py --model_name {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
