"""Resume is exact: in every epoch, with every sampling strategy; a finished run trains nothing more;
settings that change the weights' shapes are refused."""

import json
import shutil
from pathlib import Path

import pytest
import torch

import main
from conftest import PROJECT_DIR, QUICK, SHORT, tree


def losses(metrics_path):
    return {p["step"]: p["loss"] for p in json.loads(metrics_path.read_text())["train_loss_per_step"]}


def test_the_length_grouped_order_depends_on_seed_and_epoch_only(make_config):
    """What a resumed run replays: epoch 2's order, drawn after other random numbers were consumed."""
    from test_model_and_training import rows, setup
    from training import build_trainer

    cfg = make_config("--max_steps", "1")
    runtime, tokenizer, model = setup(cfg)
    data = rows(tokenizer, [f"[INST] Question {i}? [/INST] {'word ' * (i % 7 + 1)}</s>" for i in range(40)])

    def order_in_epoch(epoch, noise):
        sampler = build_trainer(model, tokenizer, data, None, cfg, runtime)._get_train_sampler()
        torch.rand(noise)  # dropout masks etc. drawn before this epoch
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        return list(sampler)

    assert order_in_epoch(2, 10) == order_in_epoch(2, 1000)
    assert order_in_epoch(1, 10) != order_in_epoch(2, 10)  # still a new order every epoch
    lengths = [len(data[i]["input_ids"]) for i in order_in_epoch(2, 10)]
    assert lengths[0] == max(lengths)  # still grouped by length: the longest batch first


@pytest.mark.parametrize("group_by_length", ["True", "False"])
def test_a_run_resumed_after_its_first_epoch_matches_an_uninterrupted_one(tmp_path, tiny_model_dir, group_by_length):
    """30 rows, 4 rows x 2 passes per step: 4 steps per epoch. Stop at step 6 (in the second epoch),
    resume, and land on the same losses for steps 7-10, across the next epoch boundary too.

    Tolerance 1e-4: on the CPU the math is deterministic, so only float32 reduction order could
    differ; another data order, optimizer, scheduler or RNG state moves losses by 1e-2 or more.
    """
    rows = (PROJECT_DIR / "data" / "sample.jsonl").read_text(encoding="utf-8").splitlines()[:30]
    (tmp_path / "rows.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    common = QUICK + ["--dataset_name", tmp_path / "rows.jsonl", "--eval_fraction", "0", "--max_steps", "10",
                      "--save_steps", "6", "--logging_steps", "1", "--per_device_train_batch_size", "4",
                      "--gradient_accumulation_steps", "2", "--group_by_length", group_by_length]
    out = tmp_path / "run"
    main.run(common + ["--output_dir", out])
    expected = losses(out / "metrics.json")
    assert json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())["epoch"] == 1.5
    # Leave the run as if it had died between step 6 and step 10.
    shutil.rmtree(out / "checkpoint-10")
    (out / "metrics.json").unlink()
    main.run(common + ["--output_dir", out, "--resume", "latest"])
    got = losses(out / "metrics.json")
    assert set(got) == set(range(1, 11))
    for step in range(7, 11):
        assert got[step] == pytest.approx(expected[step], abs=1e-4), step


def test_resuming_a_finished_run_trains_nothing_and_finishes_what_is_missing(run_copy, capsys):
    """Interrupted during the final evaluation: the checkpoint is at max_steps, the adapter and report missing."""
    from safetensors.torch import load_file

    state = json.loads((run_copy / "checkpoint-4" / "trainer_state.json").read_text())
    first = json.loads((run_copy / "metrics.json").read_text())
    for name in ("metrics.json", "report.md"):
        (run_copy / name).unlink()
    shutil.rmtree(run_copy / "tiny-llama-finetune")
    main.run(SHORT + ["--output_dir", str(run_copy), "--resume", "latest"])
    assert "nothing is trained again and no weight changes" in capsys.readouterr().out
    assert sorted(p.name for p in run_copy.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    saved = load_file(str(run_copy / "tiny-llama-finetune" / "adapter_model.safetensors"))
    trained = load_file(str(run_copy / "checkpoint-4" / "adapter_model.safetensors"))
    assert saved.keys() == trained.keys() and all(torch.equal(saved[k], trained[k]) for k in saved)
    metrics = json.loads((run_copy / "metrics.json").read_text())
    assert metrics["train"]["global_step"] == 4 and metrics["train"]["train_tokens"] == state["num_input_tokens_seen"]
    assert metrics["train_loss_per_step"] == first["train_loss_per_step"]
    assert metrics["eval_loss_per_step"] == first["eval_loss_per_step"]  # no duplicate evaluation
    assert metrics["eval_loss_after"] == first["eval_loss_after"]
    assert metrics["tokens_per_second"] > 0 and metrics["wall_time_s"] == pytest.approx(first["wall_time_s"], rel=0.2)


def test_resuming_a_complete_run_changes_nothing(run_copy, capsys):
    before = {k: v for k, v in tree(run_copy).items() if not k.startswith("runs/")}
    main.run(SHORT + ["--output_dir", str(run_copy), "--resume", "latest"])
    assert "nothing was missing" in capsys.readouterr().out
    assert {k: v for k, v in tree(run_copy).items() if not k.startswith("runs/")} == before


@pytest.mark.parametrize("change, message", [
    (["--lora_r", "8"], "lora_r=32 in the checkpoint, 8 now"),
    (["--lora_target_modules", "q_proj", "k_proj"], "lora_target_modules=['q_proj', 'v_proj'] in the checkpoint"),
])
def test_resuming_with_other_weight_shapes_is_refused(run_copy, capsys, change, message):
    before = tree(run_copy)
    assert main.main(SHORT + ["--output_dir", run_copy, "--resume", "latest", *change]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert tree(run_copy) == before


def test_resuming_an_older_checkpoint_would_overwrite_newer_ones(run_copy, capsys):
    assert main.main(SHORT + ["--output_dir", run_copy, "--resume", run_copy / "checkpoint-2"]) == 2
    assert "checkpoint-4 in" in capsys.readouterr().err


def test_resuming_on_another_base_model_is_refused(run_copy, tiny_model_dir, tmp_path, capsys):
    """A checkpoint's LoRA weights belong to the base they were trained on: another base of the very same
    shapes (a copy of the tiny model under another name) would load them silently, so resume refuses it."""
    other_base = Path(shutil.copytree(tiny_model_dir, tmp_path / "another-base"))
    before = tree(run_copy)
    assert main.main(SHORT + ["--output_dir", run_copy, "--resume", "latest", "--model_name", other_base]) == 2
    err = capsys.readouterr().err
    assert "model_name='tiny-llama' in the checkpoint" in err and str(other_base) in err and "Traceback" not in err
    assert tree(run_copy) == before
