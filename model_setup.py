"""Model, tokenizer and LoRA set-up: the 4-bit base, its tokenizer, and the trainable adapter.

    runtime = resolve_runtime(cfg)              # device + compute dtype, with the reason
    tokenizer = load_tokenizer(cfg)
    model = load_base_model(cfg, runtime)       # NF4 via bitsandbytes when cfg.use_4bit
    model = add_lora(model, cfg)                # k-bit preparation + LoRA on cfg.lora_target_modules

Nothing here runs at import time; every function takes what it needs and returns what it made.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from config import AUTO, TINY_MODEL_NAME, Config

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class SetupError(RuntimeError):
    """The model or tokenizer cannot be set up as configured; the message says what to change."""


@dataclass
class Runtime:
    device: str  # "cpu" or "cuda:N"
    compute_dtype: torch.dtype
    reason: str  # one line a person reads: why this device and dtype

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")


def resolve_runtime(cfg: Config, cuda_available: bool | None = None, bf16_supported: bool | None = None) -> Runtime:
    """Choose device and compute dtype from the config and the machine, and say why.

    The GPU is the process's local rank (torchrun / accelerate launch) or the current device, never
    a fixed 0, so the same code runs on one GPU, several, or none.
    """
    cuda_available = torch.cuda.is_available() if cuda_available is None else cuda_available
    if not cuda_available:
        from parallel import fsdp_enabled

        if fsdp_enabled():  # accelerate's FSDP runs on accelerators only; it would fail later, after loading
            raise SetupError("launched with an FSDP config (launch/fsdp_qlora.yaml) but no CUDA GPU is visible: FSDP "
                             "shards the model over GPUs. On this machine launch without it: torchrun --nproc_per_node N "
                             "main.py (DDP)")
        if not cfg.allow_cpu:
            raise SetupError(
                f"no CUDA GPU found, and model_name={cfg.model_name!r} needs an NVIDIA GPU for 4-bit training "
                "(a 7B model would take days on a CPU). To try the whole pipeline on this machine run "
                "`python main.py --preset tiny`; to force the CPU anyway add `--allow_cpu`."
            )
        dtype_name = "float32" if cfg.bnb_4bit_compute_dtype == "auto" else cfg.bnb_4bit_compute_dtype
        why = "auto on CPU: float32 is the fastest and exact there" if cfg.bnb_4bit_compute_dtype == "auto" else "as configured"
        return Runtime("cpu", DTYPES[dtype_name], f"cpu (no CUDA device), compute {dtype_name}: {why}")

    local_rank = int(os.environ.get("LOCAL_RANK", torch.cuda.current_device()))
    bf16_supported = torch.cuda.is_bf16_supported() if bf16_supported is None else bf16_supported
    requested = cfg.bnb_4bit_compute_dtype
    if requested == "auto":
        dtype_name = "bfloat16" if bf16_supported else "float16"
        why = "auto: the GPU supports bfloat16 (no fp16 overflow)" if bf16_supported else "auto: this GPU has no bfloat16"
    elif requested == "bfloat16" and not bf16_supported:
        raise SetupError("bnb_4bit_compute_dtype='bfloat16' but this GPU has no bfloat16 support; use 'auto' or 'float16'")
    else:
        dtype_name, why = requested, "as configured"
    return Runtime(f"cuda:{local_rank}", DTYPES[dtype_name], f"cuda:{local_rank}, compute {dtype_name}: {why}")


def resolve_model_path(model_name: str) -> str:
    """The tiny model's cached folder (built on first use), else the hub id or folder as given."""
    if model_name == TINY_MODEL_NAME:
        from tiny_model import ensure_tiny_model

        return str(ensure_tiny_model())
    return model_name


def load_model_config(cfg: Config):
    """The model's architecture (config.json only): enough to plan memory before loading weights."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(resolve_model_path(cfg.model_name), trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise load_error(cfg.model_name, "config", exc) from exc


def load_error(model_name: str, what: str, exc: Exception) -> SetupError:
    """What to do about a base model (or its tokenizer) that does not load, instead of a raw OSError."""
    from huggingface_hub import is_offline_mode

    cause = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    path = Path(model_name).expanduser()
    if path.is_dir():
        return SetupError(f"model_name={model_name!r} is a folder, but its {what} does not load ({cause}); it needs "
                          "config.json, the tokenizer files and *.safetensors weights, as save_pretrained writes them")
    if path.exists() or model_name.startswith((".", "/", "~")) or model_name.count("/") > 1 or "\\" in model_name:
        return SetupError(f"model folder {model_name!r} does not exist (working directory: {os.getcwd()}); check "
                          "--model_name, or give a hub id such as NousResearch/Llama-2-7b-chat-hf")
    if is_offline_mode():
        return SetupError(f"model {model_name!r} is not a local folder nor in the Hugging Face cache, and HF_HUB_OFFLINE "
                          "is set, so the hub is not tried; unset HF_HUB_OFFLINE to download it, or point --model_name "
                          f"at a local copy (or try the pipeline with --preset tiny)")
    return SetupError(f"could not load the {what} of {model_name!r} from the Hugging Face Hub ({cause}); check the name "
                      "and your network (gated models need `hf auth login`), or point --model_name at a local folder")


def build_bnb_config(cfg: Config, compute_dtype: torch.dtype, sharded: bool = False):
    """sharded (FSDP): the packed 4-bit values are stored as words of the compute dtype instead of
    bytes. FSDP flattens each layer's weights into one tensor of one dtype and casts it for mixed
    precision; uint8 storage would be cast as numbers (destroyed), compute-dtype words pass untouched."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.bnb_4bit_quant_type,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=cfg.use_nested_quant,
        bnb_4bit_quant_storage=compute_dtype if sharded else torch.uint8,
    )


def is_prequantized(model_config) -> bool:
    """A checkpoint saved already in 4 bits (e.g. by quantize.py) carries its quantization_config."""
    return getattr(model_config, "quantization_config", None) is not None


def load_tokenizer(cfg: Config):
    """The tokenizer, padding on the right, with a pad token that is neither EOS nor the end of turn.

    If pad == EOS, a collator or generate() that masks padding by id also masks every real end of
    an answer: the model never learns to stop. The chat format is checked here too, so that a
    tokenizer the pipeline cannot write conversations for fails before anything heavy loads.
    """
    from transformers import AutoTokenizer

    from chat_format import ChatFormatError, chat_style

    path = resolve_model_path(cfg.model_name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise load_error(cfg.model_name, "tokenizer", exc) from exc
    try:
        style = chat_style(tokenizer)
    except ChatFormatError as exc:
        raise SetupError(f"the tokenizer of {cfg.model_name!r}: {exc}") from None
    tokenizer.pad_token = choose_pad_token(tokenizer, {tokenizer.eos_token_id, style.end_of_turn_id, tokenizer.bos_token_id},
                                           cfg.model_name)
    tokenizer.padding_side = "right"
    return tokenizer


def choose_pad_token(tokenizer, end_ids: set, model_name: str) -> str:
    """The tokenizer's own pad token if it is not an end (or start) token; else one that never
    occurs in text and already has an embedding, so no embedding is added or resized:
    <unk> (Llama-2, Mistral), then a special token named for padding (Llama-3.1's
    <|finetune_right_pad_id|>), then an unused reserved one (<|reserved_special_token_N|>)."""
    if tokenizer.pad_token is not None and tokenizer.pad_token_id not in end_ids:
        return tokenizer.pad_token
    if tokenizer.unk_token is not None and tokenizer.unk_token_id not in end_ids:
        return tokenizer.unk_token
    special = sorted((token_id, token.content) for token_id, token in tokenizer.added_tokens_decoder.items()
                     if token.special and token_id not in end_ids)
    for hint in ("pad", "reserved", "unused"):
        found = next((content for _, content in special if hint in content.lower()), None)
        if found is not None:
            return found
    raise SetupError(
        f"the tokenizer of {model_name!r} has no pad token distinct from its end tokens, no <unk> and no unused "
        "special token to pad with; add a pad token to it (tokenizer.add_special_tokens) before fine-tuning"
    )


def disable_bnb_cpu_repack(model) -> int:
    """Guard the bitsandbytes CPU trap; returns how many 4-bit layers were guarded.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a 4-bit weight into an inference-only layout
    at the first no-grad eval forward. After that no gradient reaches the LoRA weights (training
    silently stops) and merging gives wrong weights. Switching that path off keeps training exact.
    """
    import bitsandbytes as bnb

    count = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def configure_attention(cfg: Config, runtime: Runtime) -> None:
    """Process-wide attention kernel choice; cuDNN's is off unless asked for (cfg.cudnn_attention).

    cuDNN's attention builds an execution plan for every new sequence length, about 2 s each on an
    H200: a length-grouped run, or generation, would stall again and again.
    """
    if runtime.is_cuda:
        torch.backends.cuda.enable_cudnn_sdp(bool(cfg.cudnn_attention))


def placement(runtime: Runtime, sharded: bool, prequantized: bool) -> tuple[dict | None, str]:
    """Where the weights load, and why. Under FSDP a checkpoint already in 4 bits loads into CPU memory
    and FSDP moves each process's shard, layer by layer, to its GPU: no GPU ever holds the whole
    model. Any other checkpoint is quantised on the GPU as it loads (on the CPU that takes hours for
    a 70B model), so each GPU holds the whole 4-bit model until FSDP shards it."""
    if not runtime.is_cuda:
        return None, "cpu"
    if sharded and prequantized:
        return {"": "cpu"}, "FSDP: the 4-bit checkpoint loads into CPU memory; each GPU receives only its shard"
    if sharded:
        return {"": runtime.device}, ("FSDP: each GPU quantises the whole model while loading, then keeps its shard; "
                                      "if the 4-bit model does not fit one GPU, convert it once with quantize.py")
    return {"": runtime.device}, runtime.device


def load_base_model(cfg: Config, runtime: Runtime, quantized: bool | None = None, saved_4bit: str | None = None):
    """The frozen base model: 4-bit NF4 via bitsandbytes (default), or unquantised in compute dtype.

    saved_4bit: a folder where this base was saved already quantised (inference.load_base); its
    4-bit weights load as they are, with the quantisation settings recorded in its config.json.
    """
    from transformers import AutoModelForCausalLM

    from parallel import fsdp_enabled

    quantized = cfg.use_4bit if quantized is None else quantized
    configure_attention(cfg, runtime)
    prequantized = saved_4bit is not None or is_prequantized(load_model_config(cfg))
    device_map, where = placement(runtime, fsdp_enabled(), prequantized)
    if fsdp_enabled():
        print(f"load: {where}")
    kwargs = dict(dtype=runtime.compute_dtype, device_map=device_map, trust_remote_code=cfg.trust_remote_code)
    if quantized and not prequantized:  # a 4-bit checkpoint brings its own quantization_config
        kwargs["quantization_config"] = build_bnb_config(cfg, runtime.compute_dtype, sharded=fsdp_enabled())
    path = saved_4bit or resolve_model_path(cfg.model_name)
    # use_safetensors: weights never come from pickles, which can run code when loaded.
    try:
        model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, **kwargs)
    except OSError as exc:
        raise load_error(cfg.model_name, "weights", exc) from exc
    if quantized:
        disable_bnb_cpu_repack(model)
    model.config.use_cache = False  # the KV cache is useless in training and costs memory
    return model


def resolve_lora_targets(cfg: Config, model_config) -> tuple[Config, str]:
    """(cfg with lora_target_modules filled in, why): `auto` becomes the architecture's default.

    The default is PEFT's table of attention projections per model type, the same PEFT applies
    when no targets are given (which is what the seed did: q_proj and v_proj for Llama).
    Names the user set are kept as set.
    """
    import dataclasses

    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    if cfg.lora_target_modules != [AUTO]:
        return cfg, f"LoRA on {' '.join(cfg.lora_target_modules)} (as set)"
    model_type = getattr(model_config, "model_type", None)
    text_type = getattr(getattr(model_config, "text_config", None), "model_type", None)
    targets = DEFAULTS.get(model_type) or DEFAULTS.get(text_type)
    why = f"auto: PEFT's default for model type {model_type!r}"
    if targets is None:
        targets = ["q_proj", "v_proj"]
        why = f"auto: PEFT has no default for model type {model_type!r}; the usual attention names"
    return dataclasses.replace(cfg, lora_target_modules=list(targets)), f"LoRA on {' '.join(targets)} ({why})"


def build_lora_config(cfg: Config):
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.lora_target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def check_target_modules(model, target_modules: list[str], lora_r: int) -> None:
    """Fail with the names the model does have when a LoRA target matches no layer, and refuse a rank
    above the narrowest target's min(in, out): B @ A has at most that rank, so the rest of r only adds
    parameters (and memory), never capacity."""
    linears = {name.rsplit(".", 1)[-1]: module for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    missing = [t for t in target_modules if t not in linears]
    if missing:
        raise SetupError(
            f"lora_target_modules {missing} match no linear layer of this model; "
            f"its linear layers are: {', '.join(sorted(linears))}"
        )
    name, layer = min(((t, linears[t]) for t in target_modules), key=lambda item: min(item[1].in_features, item[1].out_features))
    width = min(layer.in_features, layer.out_features)
    if lora_r > width:
        raise SetupError(f"lora_r={lora_r} is larger than the layers it adapts allow: {name} is {layer.in_features} x "
                         f"{layer.out_features}, so a LoRA update has rank at most {width}, and a larger r only adds "
                         f"parameters. Use --lora_r {width} or less")


def quiet_library_noise() -> None:
    """Silence library messages that a user cannot act on; call it before bitsandbytes is imported.

    - bitsandbytes, on CPUs with AVX512-BF16, tries at import to fetch an optional inference kernel
      from the hub and logs "Failed to load CPU gemm_4bit_forward from kernels-community" when it
      cannot (offline, or without the `kernels` package); its built-in kernel is used instead.
    - bitsandbytes' paged optimizers run unpaged on a CPU, with the same update, and warn about it.
    - transformers' deprecation notes about gradient_checkpointing names this project does not use.
    Warnings a user can act on (a missing tensorboard, a setting that is ignored) stay.
    """
    import logging
    import warnings

    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(lambda record: "gemm_4bit_forward" not in record.getMessage())
    warnings.filterwarnings("ignore", message=r"Paged optimizers are not supported on CPU", category=UserWarning)
    warnings.filterwarnings("ignore", message=r".*gradient_checkpointing.*deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*deprecated", category=FutureWarning)


def add_lora(model, cfg: Config):
    """Prepare the (4-bit) base for training and wrap it with the LoRA adapter."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    cfg = resolve_lora_targets(cfg, model.config)[0]
    check_target_modules(model, cfg.lora_target_modules, cfg.lora_r)
    if getattr(model, "is_loaded_in_4bit", False):
        # Casts norms/embeddings to fp32 for stable training and wires gradient checkpointing.
        # Non-reentrant checkpointing: the reentrant kind silently drops LoRA grads when the
        # inputs do not require grad, and does not compose with torch.compile.
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=bool(cfg.gradient_checkpointing),
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
        if not cfg.fp32_frozen_weights:
            cast_frozen_weights(model, compute_dtype_of(model))
    elif cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    # LoRA's A matrices are drawn from the global RNG: seed it here, or the adapter's start (and
    # so the whole run) depends on whatever consumed random numbers before.
    from transformers import set_seed

    set_seed(cfg.seed)
    model = get_peft_model(model, build_lora_config(cfg))
    if cfg.dequantize_frozen:
        dequantize_4bit_layers(model, compute_dtype_of(model))
    if cfg.torch_compile:
        compile_decoder_layers(model)
    return model


class DequantizedLinear(torch.nn.Linear):
    """A frozen linear layer holding the dequantised values of a 4-bit one, with its dtype contract.

    Like bitsandbytes' Linear4bit, it computes in the weight's dtype and hands back the input's
    dtype: outside autocast (generation after training with float32 norms, say) a float32 hidden
    state meets a bf16 weight, which plain nn.Linear refuses ("expected m1 and m2 to have the same dtype").
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.to(self.weight.dtype)).to(x.dtype)


def dequantize_4bit_layers(model, dtype: torch.dtype) -> int:
    """Replace every 4-bit layer by a frozen DequantizedLinear holding its dequantised weight.

    The values are exactly those the 4-bit kernel dequantises at each use, so training computes
    the same function; it trades 2 bytes per weight of memory for the per-use dequantisation.
    LoRA wrappers keep working: they call their base layer, whatever its class.
    """
    import bitsandbytes as bnb

    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, bnb.nn.Linear4bit):
                weight = bnb.functional.dequantize_4bit(child.weight.data, child.weight.quant_state).to(dtype)
                linear = DequantizedLinear(child.in_features, child.out_features, bias=child.bias is not None,
                                           device=weight.device, dtype=dtype)
                linear.weight = torch.nn.Parameter(weight, requires_grad=False)
                if child.bias is not None:
                    linear.bias = torch.nn.Parameter(child.bias.data.to(dtype), requires_grad=False)
                setattr(parent, name, linear)
                replaced += 1
    return replaced


def decoder_layers(model) -> list[torch.nn.Module]:
    """The repeated transformer blocks of a (PEFT-wrapped) causal LM."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def compile_decoder_layers(model) -> int:
    """torch.compile each decoder layer in place (one compiled graph serves them all).

    Layer by layer rather than the whole model: the mask building, the loss and PEFT's wrappers
    stay eager, the layers' elementwise work (norms, rotary, SiLU, LoRA dropout and scaling) fuses,
    and sequence lengths are compiled as dynamic so varying batch shapes do not recompile.
    """
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


def compute_dtype_of(model) -> torch.dtype:
    import bitsandbytes as bnb

    layer = next((m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)), None)
    return layer.compute_dtype if layer is not None and layer.compute_dtype is not None else torch.float32


def cast_frozen_weights(model, dtype: torch.dtype) -> None:
    """Frozen float weights (norms, embeddings, output layer) back to the compute dtype.

    Under autocast their matmuls run in that dtype anyway; kept in float32 they cost memory,
    a cast on every use, and turn the residual stream into float32.
    """
    for param in model.parameters():
        if not param.requires_grad and param.dtype == torch.float32 and dtype != torch.float32:
            param.data = param.data.to(dtype)


def keep_adapter_fp32(model) -> None:
    """Keep trainable (LoRA) weights in float32; autocast still runs their matmuls in bf16/fp16.

    TRL casts LoRA weights of a quantised model to bf16; in bf16 an Adam step of lr 2e-4 on a
    weight near 1e-2 is below half a unit in the last place, so many updates are lost.
    """
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameters; a 4-bit weight counts its real element count."""
    trainable = total = 0
    for param in model.parameters():
        n = param.numel()
        if hasattr(param, "quant_state") and param.quant_state is not None:
            n = param.quant_state.shape.numel()  # stored as packed uint8: two 4-bit values per byte
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total
