"""Every speed-up keeps the result: the layouts performance.py chooses train the same model.

On the CPU in float32 the only difference between layouts is the order of float additions, so
per-step losses agree to 1e-4. Frozen weights kept in bf16 instead of float32 change rounding
(bf16 has an 8-bit mantissa, 0.4% per value); per-step losses then agree to 2%.
"""

import pytest
import torch

from test_model_and_training import rows, setup
from training import build_trainer


def step_losses(cfg):
    runtime, tokenizer, model = setup(cfg)
    trainer = build_trainer(model, tokenizer, rows(tokenizer), None, cfg, runtime)
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


COMMON = ["--max_steps", "5", "--logging_steps", "1", "--lora_dropout", "0", "--no_group_by_length"]


def test_one_pass_of_four_rows_equals_four_passes_of_one(make_config):
    one_by_four = step_losses(make_config(*COMMON, "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "4"))
    four_by_one = step_losses(make_config(*COMMON, "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1",
                                          "--gradient_checkpointing", "False"))
    assert len(one_by_four) == len(four_by_one) == 5
    assert four_by_one == pytest.approx(one_by_four, abs=1e-4)


def test_frozen_weights_in_bf16_match_float32_ones(make_config):
    bf16 = ["--bnb_4bit_compute_dtype", "bfloat16", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2"]
    fp32_frozen = step_losses(make_config(*COMMON, *bf16, "--fp32_frozen_weights", "True"))
    bf16_frozen = step_losses(make_config(*COMMON, *bf16, "--fp32_frozen_weights", "False"))
    assert bf16_frozen == pytest.approx(fp32_frozen, rel=2e-2)
    assert bf16_frozen != fp32_frozen  # the option really changed the numerics it claims to change


def test_frozen_weights_follow_the_compute_dtype(make_config):
    _, _, model = setup(make_config("--bnb_4bit_compute_dtype", "bfloat16", "--fp32_frozen_weights", "False"))
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad and p.dtype.is_floating_point}
    trainable = {p.dtype for p in model.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and trainable == {torch.float32}


def test_dequantised_frozen_weights_compute_the_same_function(make_config):
    """dequantize_frozen swaps the 4-bit kernels for the very weights they dequantise: same logits, same loss."""
    import bitsandbytes as bnb

    from test_model_and_training import batch_of

    _, tokenizer, quantised = setup(make_config("--max_steps", "1"))
    _, _, dequantised = setup(make_config("--max_steps", "1", "--dequantize_frozen"))
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in dequantised.modules())
    batch = batch_of(tokenizer, rows(tokenizer))
    quantised.eval(), dequantised.eval()
    with torch.no_grad():
        assert torch.allclose(quantised(**batch).logits, dequantised(**batch).logits, atol=1e-5)
    losses_q = step_losses(make_config(*COMMON))
    losses_d = step_losses(make_config(*COMMON, "--dequantize_frozen"))
    assert losses_d == pytest.approx(losses_q, abs=1e-4)


def test_padding_to_a_multiple_gives_the_loss_of_unpadded_rows(make_config):
    """Bucketed padding (pad_to_multiple_of) only adds masked tokens: the same losses as batches padded
    to their longest row. Rows of different lengths, 4 per pass, so every batch really is padded."""
    layout = ["--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1"]
    plain = step_losses(make_config(*COMMON, *layout, "--pad_to_multiple_of", "1"))
    bucketed = step_losses(make_config(*COMMON, *layout, "--pad_to_multiple_of", "64"))
    assert bucketed == pytest.approx(plain, abs=1e-4)


def test_padding_free_batches_give_the_loss_of_padded_ones(make_config):
    """Padding-free: the 4 rows of a pass become one sequence, kept apart by their position ids
    (transformers builds a block-diagonal mask from them). Same losses as padded batches: a mask that
    let rows attend to each other would move them by far more than 1e-4."""
    layout = ["--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1"]
    padded = step_losses(make_config(*COMMON, *layout))
    padding_free = step_losses(make_config(*COMMON, *layout, "--padding_free"))
    assert padding_free == pytest.approx(padded, abs=1e-4)


def test_dequantised_layers_accept_float32_hidden_states_after_training(make_config):
    """Issue 8: dequantize_frozen with fp32_frozen_weights crashed in generation after training
    ("expected m1 and m2 to have the same dtype"): the float32 norms hand float32 hidden states to a
    bf16 weight outside autocast. The dequantised layer keeps bitsandbytes' contract (compute in the
    weight's dtype, return the input's), so generation runs and matches the 4-bit model's tokens."""
    from inference import GenerationSettings, answer

    args = ["--bnb_4bit_compute_dtype", "bfloat16", "--fp32_frozen_weights", "True", "--max_steps", "1"]
    _, tokenizer, dequantised = setup(make_config(*args, "--dequantize_frozen", "True"))
    _, _, quantised = setup(make_config(*args, "--dequantize_frozen", "False"))
    settings = GenerationSettings(max_new_tokens=8)
    reply = answer(dequantised, tokenizer, "Who wrote Hamlet?", settings)
    assert reply.token_ids == answer(quantised, tokenizer, "Who wrote Hamlet?", settings).token_ids
