"""inference.py: prompts as training saw them, exact fast paths, batches, the 4-bit copy, settings and errors."""

import json
import subprocess
import sys

import pytest
import torch

import data_preparation as dp
from chat_format import prompt_ids, stop_token_ids
from config import ConfigError, parse_config
from conftest import PROJECT_DIR
from inference import (DecodingPlan, GenerationSettings, InferenceError, adapter_in_compute_dtype, answer, answer_many,
                       conversation, generate_batch, load_for_inference, main, plan_decoding, read_adapter_config,
                       stop_check_deferred)
from model_setup import add_lora, load_base_model, load_tokenizer, resolve_runtime
from training import save_adapter

QUESTIONS = ["What is the chemical symbol for gold?", "How many continents are there on Earth?", "Hi",
             "What is a large language model?", "Explain in a few words, please, what a prime number is."]


@pytest.fixture
def untrained_adapter(make_config):
    """An adapter saved straight after LoRA init: enough to test loading and formats quickly."""
    cfg = make_config()
    tokenizer = load_tokenizer(cfg)
    model = add_lora(load_base_model(cfg, resolve_runtime(cfg)), cfg)
    return save_adapter(model, tokenizer, cfg), model, tokenizer, cfg


@pytest.fixture(scope="module")
def trained(tiny_run):
    """The tiny run's adapter on its 4-bit base, decoded plainly: (model, tokenizer, adapter folder)."""
    adapter = tiny_run[0] / "tiny-llama-finetune"
    model, tokenizer, _, _ = load_for_inference(adapter, dequantize="no", compile_="no")
    return model, tokenizer, adapter


def plain_generate(model, tokenizer, question: str, max_new_tokens: int) -> list[int]:
    """The reference: transformers' generate on one unpadded prompt, greedy, cut after the stop token."""
    ids = prompt_ids(tokenizer, conversation(question))
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=stop_token_ids(tokenizer),
                             temperature=None, top_p=None, top_k=None)[0, len(ids):].tolist()
    stops = set(stop_token_ids(tokenizer))
    end = next((i for i, t in enumerate(out) if t in stops), len(out))
    return out[:end]


def test_prompt_is_exactly_the_training_prefix(untrained_adapter, monkeypatch):
    """What generate() is given == the prompt tokens training saw (one BOS), through chat_format."""
    _, model, tokenizer, _ = untrained_adapter
    seen = []
    real_generate = model.generate

    def spy(*args, **kwargs):
        seen.append(kwargs["input_ids"][0].tolist())
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(model, "generate", spy)
    answer(model, tokenizer, "Who wrote Hamlet?", GenerationSettings(max_new_tokens=2))
    row = dp.tokenize_text("[INST] Who wrote Hamlet? [/INST] William Shakespeare. </s>", tokenizer, 256, True)
    assert seen[0] == row["input_ids"][:len(seen[0])]
    assert seen[0].count(tokenizer.bos_token_id) == 1
    assert row["labels"][len(seen[0])] != -100  # the next token is the answer's first


def test_answers_are_plain_generate_tokens(trained):
    model, tokenizer, _ = trained
    settings = GenerationSettings(max_new_tokens=32)
    for question in QUESTIONS:
        assert answer(model, tokenizer, question, settings).token_ids == plain_generate(model, tokenizer, question, 32), question


def test_batch_equals_one_by_one(trained):
    """Left-padded batches give every row the tokens it gets alone (prompts of different lengths)."""
    model, tokenizer, _ = trained
    settings = GenerationSettings(max_new_tokens=40)
    conversations = [conversation(q) for q in QUESTIONS]
    assert len({len(prompt_ids(tokenizer, c)) for c in conversations}) > 1  # so the batch really pads
    together = answer_many(model, tokenizer, conversations, settings, batch_size=len(QUESTIONS))
    alone = [answer_many(model, tokenizer, [c], settings, batch_size=1)[0] for c in conversations]
    assert [a.token_ids for a in together] == [a.token_ids for a in alone]
    assert [a.stop_reason for a in together] == [a.stop_reason for a in alone]
    assert any(a.stop_reason == "stop" for a in together)


def test_padded_rows_get_their_own_positions_and_mask(trained, monkeypatch):
    """The batch's prefill: padding is masked out and each row's positions start at 0 on its first real token."""
    model, tokenizer, _ = trained
    calls = []
    llama = model.get_base_model().model
    handle = llama.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs), with_kwargs=True)
    try:
        answer_many(model, tokenizer, [conversation("Hi"), conversation(QUESTIONS[-1])], GenerationSettings(max_new_tokens=2),
                    batch_size=2)
    finally:
        handle.remove()
    prefill = calls[0]
    mask, positions = prefill["attention_mask"], prefill["position_ids"]
    short = len(prompt_ids(tokenizer, conversation("Hi")))
    pad = mask.shape[1] - short
    assert pad > 0 and mask[0, :pad].sum() == 0 and mask[0, pad:].all() and mask[1].all()
    assert positions[0, pad:].tolist() == list(range(short))
    assert positions[1].tolist() == list(range(mask.shape[1]))


@pytest.fixture(scope="module")
def dequantized(trained):
    model, tokenizer, _, plan = load_for_inference(trained[2], dequantize="yes", compile_="no")
    assert plan.dequantize and not any("4bit" in type(m).__name__ for m in model.modules())
    return model, tokenizer


def test_dequantized_weights_give_plain_generate_tokens(trained, dequantized):
    model, tokenizer = dequantized
    settings = GenerationSettings(max_new_tokens=32)
    for question in QUESTIONS:
        assert answer(model, tokenizer, question, settings).token_ids == plain_generate(trained[0], trained[1], question, 32)


@pytest.fixture
def deferred_checks(monkeypatch):
    """stop_check_deferred made usable on the CPU, and a count of the generate() calls that deferred.

    transformers' DeferredStopCheck waits on torch.Event, which a CPU lacks; with no streams there,
    a copy is complete when issued, so an event that does nothing is exact.
    """
    from transformers.generation import utils as generation_utils

    class DoneEvent:
        def __init__(self, *args, **kwargs):
            pass

        def record(self):
            pass

        def synchronize(self):
            pass

    monkeypatch.setattr(torch, "Event", DoneEvent)
    uses = []
    real_init = generation_utils.DeferredStopCheck.__init__
    monkeypatch.setattr(generation_utils.DeferredStopCheck, "__init__",
                        lambda self, *args, **kwargs: (uses.append(1), real_init(self, *args, **kwargs))[1])
    return uses


def test_compiled_static_cache_gives_plain_generate_tokens(trained, dequantized, deferred_checks):
    """The GPU fast path (static KV cache + torch.compile, the stop check deferred), compiled here on the CPU:
    the same greedy tokens, for rows that stop at different steps."""
    model, tokenizer = dequantized
    plan = DecodingPlan(dequantize=True, compile=True, reason="test")
    settings = GenerationSettings(max_new_tokens=32)
    conversations = [conversation(q) for q in QUESTIONS[:3]]
    reference = [plain_generate(trained[0], trained[1], q, 32) for q in QUESTIONS[:3]]
    compiled = answer_many(model, tokenizer, conversations, settings, plan, batch_size=3)
    assert [a.token_ids for a in compiled] == reference
    with stop_check_deferred(True):
        compiled_deferred = answer_many(model, tokenizer, conversations, settings, plan, batch_size=3)
    assert deferred_checks and [a.token_ids for a in compiled_deferred] == reference
    assert {a.stop_reason for a in compiled_deferred} == {a.stop_reason for a in compiled}


def test_deferred_stop_check_gives_the_same_tokens_and_stream(trained, deferred_checks):
    """Reading "all rows finished?" a step late runs one step past the end, which generate undoes:
    the tokens, the stop reasons and the streamed text are those of the plain loop."""
    from chat import make_streamer

    model, tokenizer, _ = trained
    settings = GenerationSettings(max_new_tokens=40)
    conversations = [conversation(q) for q in QUESTIONS]
    plain = answer_many(model, tokenizer, conversations, settings, batch_size=len(QUESTIONS))
    with stop_check_deferred(True):
        deferred = answer_many(model, tokenizer, conversations, settings, batch_size=len(QUESTIONS))
    assert len(deferred_checks) == 1
    assert [(a.token_ids, a.tokens, a.stop_reason) for a in deferred] == [(a.token_ids, a.tokens, a.stop_reason) for a in plain]
    assert any(a.stop_reason == "stop" for a in plain)  # rows that finish early: the step past the end is undone
    streams = []
    for enabled in (False, True):
        text = __import__("io").StringIO()
        with stop_check_deferred(enabled):
            generate_batch(model, tokenizer, [prompt_ids(tokenizer, conversations[1])], settings,
                           streamer=make_streamer(tokenizer, text))
        streams.append(text.getvalue())
    assert len(deferred_checks) == 2 and streams[0] == streams[1] and streams[0].strip()


def test_deferred_stop_check_is_only_inside_its_block(trained, deferred_checks):
    from transformers.generation import utils as generation_utils

    with stop_check_deferred(True):
        assert generation_utils.DeferredStopCheck.is_supported(torch.device("cuda"), None, False, False)
    assert not generation_utils.DeferredStopCheck.is_supported(torch.device("cuda"), None, False, False)
    with stop_check_deferred(False):
        answer_many(trained[0], trained[1], [conversation("Hi")], GenerationSettings(max_new_tokens=4))
    assert not deferred_checks


def test_deferral_is_skipped_on_a_transformers_without_it(monkeypatch):
    """Another transformers version may lack DeferredStopCheck or change it: then generate runs as it is."""
    from transformers.generation import utils as generation_utils

    monkeypatch.setattr(generation_utils.DeferredStopCheck, "is_supported", lambda *args: False)  # not a staticmethod
    with stop_check_deferred(True):
        assert generation_utils.DeferredStopCheck.is_supported(torch.device("cuda"), None, False, False) is False
    monkeypatch.delattr(generation_utils, "DeferredStopCheck")
    with stop_check_deferred(True):
        pass


def test_plan_defers_the_stop_check_on_a_gpu_only():
    for is_cuda in (True, False):
        plan = plan_decoding("no", "no", quantized=True, is_cuda=is_cuda, n_weights=10, dtype_bytes=2, free_bytes=10**12,
                             many_rows=False)
        assert plan.defer_stop_check is is_cuda and ("stop check one step late" in plan.reason) is is_cuda


def test_adapter_weights_take_the_compute_dtype(untrained_adapter):
    """LoRA weights in bf16 on a bf16 GPU, as autocast ran them in training; nothing else changes dtype."""
    _, model, _, _ = untrained_adapter
    before = {name: p.dtype for name, p in model.named_parameters()}
    adapter_in_compute_dtype(model, torch.bfloat16)
    after = {name: p.dtype for name, p in model.named_parameters()}
    lora = [name for name in after if "lora_" in name]
    assert lora and all(after[name] == torch.bfloat16 for name in lora)
    assert {name: d for name, d in after.items() if name not in lora} == {name: d for name, d in before.items() if name not in lora}


@pytest.mark.parametrize("dequantize, compile_, free_gib, many, expected", [
    ("auto", "auto", 100, True, (True, True)),     # a GPU with room, a file of prompts
    ("auto", "auto", 100, False, (True, False)),   # a chat: compiling would cost more than it saves
    ("auto", "auto", 10, True, (False, False)),    # no room for 13.5 GB of dequantised weights; 4-bit does not compile
    ("no", "auto", 100, True, (False, False)),     # the user's no wins
    ("yes", "no", 10, True, (True, False)),        # the user's yes wins, even where auto would not
])
def test_decoding_plan(dequantize, compile_, free_gib, many, expected):
    plan = plan_decoding(dequantize, compile_, quantized=True, is_cuda=True, n_weights=6_700_000_000, dtype_bytes=2,
                         free_bytes=free_gib * 2**30, many_rows=many)
    assert (plan.dequantize, plan.compile) == expected
    assert ("as asked" in plan.reason) == (dequantize != "auto")


def test_compile_needs_compilable_weights():
    with pytest.raises(InferenceError, match=r"--compile yes needs --dequantize yes"):
        plan_decoding("no", "yes", quantized=True, is_cuda=True, n_weights=1, dtype_bytes=2, free_bytes=2**40, many_rows=True)


def test_4bit_copy_skips_quantising_and_loads_the_same_weights(untrained_adapter, tmp_path):
    adapter, cache = untrained_adapter[0], tmp_path / "cache"
    notes = []
    first, tokenizer, _, _ = load_for_inference(adapter, dequantize="no", cache_root=cache, say=notes.append)
    second, _, _, _ = load_for_inference(adapter, dequantize="no", cache_root=cache, say=notes.append)
    assert "quantised to 4 bits at load" in notes[0] and "saved to" in notes[0]
    assert "4-bit copy loaded from" in notes[1]
    assert len(list(cache.iterdir())) == 1
    assert any("4bit" in type(m).__name__ for m in second.modules())
    ids = torch.tensor([prompt_ids(tokenizer, conversation("What is gold?"))])
    with torch.no_grad():
        assert torch.equal(first(input_ids=ids).logits, second(input_ids=ids).logits)


def test_other_quantisation_settings_get_another_4bit_copy(make_config, tmp_path):
    from inference import base_fingerprint

    nf4, fp4 = make_config(), make_config("--bnb_4bit_quant_type", "fp4")
    assert base_fingerprint(nf4, torch.float32) != base_fingerprint(fp4, torch.float32)
    assert base_fingerprint(nf4, torch.float32) != base_fingerprint(nf4, torch.bfloat16)
    assert base_fingerprint(nf4, torch.float32) == base_fingerprint(make_config(), torch.float32)


# ---------------------------------------------------------------------------- settings and errors

def test_generation_settings_are_checked_in_one_place():
    """main.py's config and inference.py refuse the same values with the same words."""
    with pytest.raises(ConfigError) as from_config:
        parse_config(["--top_p", "2"])
    with pytest.raises(InferenceError) as from_inference:
        GenerationSettings(top_p=2.0).check()
    line = "top_p=2.0 must be in (0, 1]"
    assert line in str(from_config.value) and line in str(from_inference.value)
    with pytest.raises(InferenceError, match=r"temperature=0 with do_sample.*drop do_sample"):
        GenerationSettings(do_sample=True, temperature=0.0).check()
    GenerationSettings(do_sample=False, temperature=0.0).check()  # greedy ignores the temperature


@pytest.mark.parametrize("flags, message", [
    (["--do_sample", "--temperature", "0", "Hi"], "temperature=0 with do_sample"),
    (["--top_p", "2", "Hi"], "top_p=2.0 must be in (0, 1]"),
    (["Hi", "--temperature", "nan", "--do_sample"], "temperature=nan must be a finite number"),
    (["--max_new_tokens", "0", "Hi"], "max_new_tokens=0 must be >= 1"),
    (["--topp", "0.5", "Hi"], "--topp is not an option; did you mean --top_p"),
    (["Hi", "--chat"], "choose one of"),
    ([], "nothing to do"),
])
def test_bad_generation_flags_exit_2_before_loading(untrained_adapter, capsys, flags, message):
    assert main(["--adapter", str(untrained_adapter[0]), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert err.count("--help") == 1  # every error points to the options once (issue 9)


def test_merge_to_an_existing_file_is_refused(untrained_adapter, tmp_path, capsys):
    target = tmp_path / "merged"
    target.write_text("keep me")
    assert main(["--adapter", str(untrained_adapter[0]), "--merge-to", str(target)]) == 2
    assert "is an existing file; give the path of a new folder" in capsys.readouterr().err
    assert target.read_text() == "keep me"


def test_prompt_longer_than_the_context_is_refused(untrained_adapter, capsys, tmp_path):
    long_prompt = "gold " * 1200  # the tiny model's context is 1,024 tokens
    code = main(["--adapter", str(untrained_adapter[0]), "--quantized_cache", str(tmp_path), long_prompt])
    err = capsys.readouterr().err
    assert code == 2 and "more than the model's context of 1,024 tokens" in err and "shorten it" in err


def test_answer_that_would_overflow_the_context_is_refused(untrained_adapter):
    _, model, tokenizer, _ = untrained_adapter
    question = "gold " * 450  # fits, but not with 200 new tokens
    n = len(prompt_ids(tokenizer, conversation(question)))
    with pytest.raises(InferenceError, match=rf"lower max_new_tokens to {1024 - n} or less"):
        answer(model, tokenizer, question, GenerationSettings(max_new_tokens=200))


def test_missing_adapter_folder(tmp_path):
    with pytest.raises(InferenceError, match=r"does not exist"):
        read_adapter_config(tmp_path / "nothing-here")


def test_incomplete_adapter_folder(untrained_adapter):
    path = untrained_adapter[0]
    (path / "adapter_model.safetensors").unlink()
    with pytest.raises(InferenceError, match=r"missing adapter_model.safetensors"):
        read_adapter_config(path)


def test_corrupt_adapter_weights(untrained_adapter):
    path = untrained_adapter[0]
    (path / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(InferenceError, match=r"could not load the adapter"):
        load_for_inference(path)


def test_corrupt_adapter_config(untrained_adapter):
    path = untrained_adapter[0]
    (path / "run_config.json").write_text("{ half a file", encoding="utf-8")
    with pytest.raises(InferenceError, match=r"corrupt"):
        read_adapter_config(path)


def test_adapter_for_a_different_base(untrained_adapter):
    with pytest.raises(InferenceError, match=r"trained on 'tiny-llama', not on 'NousResearch/Llama-2-7b-chat-hf'"):
        load_for_inference(untrained_adapter[0], base="NousResearch/Llama-2-7b-chat-hf")


def test_command_line_answers_with_the_adapters_settings(trained, tmp_path):
    """The real entry point: one answer on stdout, the trained one; the notes (what was chosen, why) on stderr."""
    adapter = trained[2]
    proc = subprocess.run([sys.executable, str(PROJECT_DIR / "inference.py"), "--adapter", str(adapter), "--quantized_cache",
                           str(tmp_path), "What is the chemical symbol for gold?"], capture_output=True, text=True,
                          timeout=300, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("The chemical symbol for gold is Au")
    max_new = json.loads((adapter / "run_config.json").read_text())["max_new_tokens"]
    assert f"at most {max_new} new tokens" in proc.stderr and "dequantise yes (auto:" in proc.stderr
    assert "compile no (auto: no GPU)" in proc.stderr


def test_command_line_reports_a_missing_adapter_cleanly(tmp_path):
    proc = subprocess.run([sys.executable, str(PROJECT_DIR / "inference.py"), "--adapter", str(tmp_path / "x"), "Hi"],
                          capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": ""}, timeout=300)
    assert proc.returncode == 2 and "error:" in proc.stderr and "does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr
