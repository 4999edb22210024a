"""data_preparation.py: loading, format checks, BOS/EOS handling and the loss mask, token by token."""

import json

import pytest
import torch

import data_preparation as dp
from conftest import PROJECT_DIR

ROW = "<s>[INST] What is the capital of France? [/INST] The capital of France is Paris. </s>"
MULTI = "<s>[INST] Hi there [/INST] Hello! </s><s>[INST] What is two plus two? [/INST] It is four. </s>"
SYSTEM = "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nName a fruit. [/INST] An apple. </s>"


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from config import parse_config
    from model_setup import load_tokenizer

    return load_tokenizer(parse_config(["--preset", "tiny"]))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------- loading

def test_bundled_dataset_is_valid_guanaco_format():
    data, report = dp.clean_dataset(dp.load_raw_dataset(str(PROJECT_DIR / "data" / "sample.jsonl")))
    assert 50 <= report.rows_kept <= 200 and report.empty_dropped == 0
    assert any(t.count("[INST]") > 1 for t in data["text"]) and any("<<SYS>>" in t for t in data["text"])


@pytest.mark.parametrize("suffix", ["jsonl", "json", "csv", "parquet", "folder"])
def test_local_formats_load(tmp_path, suffix):
    from datasets import Dataset

    rows = [{"text": ROW}, {"text": MULTI}]
    path = tmp_path / f"data.{suffix}"
    if suffix == "jsonl":
        write_jsonl(path, rows)
    elif suffix == "json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif suffix == "csv":
        Dataset.from_list(rows).to_csv(str(path))
    elif suffix == "parquet":
        Dataset.from_list(rows).to_parquet(str(path))
    else:
        Dataset.from_list(rows).save_to_disk(str(path))
    assert dp.load_raw_dataset(str(path))["text"] == [ROW, MULTI]


def test_missing_file_says_which_path(tmp_path):
    with pytest.raises(dp.DataError, match=r"does not exist"):
        dp.load_raw_dataset(str(tmp_path / "nope.jsonl"))


def test_hub_offline_fails_at_once_and_suggests_a_local_file(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(dp.DataError, match=r"HF_HUB_OFFLINE.*--dataset_name data/sample.jsonl"):
        dp.load_raw_dataset("mlabonne/guanaco-llama2-1k")


def test_unreachable_hub_says_so(monkeypatch):
    import datasets

    def no_network(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'mlabonne/guanaco-llama2-1k' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(datasets, "load_dataset", no_network)
    with pytest.raises(dp.DataError, match=r"could not load dataset .* Hugging Face Hub.*local copy"):
        dp.load_raw_dataset("mlabonne/guanaco-llama2-1k")


def test_not_utf8(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps({"text": "x"}).encode()[:-2] + "caf\xe9\"}\n".encode("latin-1"))
    with pytest.raises(dp.DataError, match=r"not valid UTF-8"):
        dp.load_raw_dataset(str(path))


def test_bad_json_line_is_named(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps({"text": ROW}) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(dp.DataError, match=r"line 2: not valid JSON"):
        dp.load_raw_dataset(str(path))


# ---------------------------------------------------------------- checking

def test_missing_text_column(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "answer": "a"}])
    with pytest.raises(dp.DataError, match=r"no 'text' column \(columns: \['prompt', 'answer'\]\)"):
        dp.clean_dataset(dp.load_raw_dataset(str(path)))


def test_rows_not_in_chat_format_are_reported_by_index(tmp_path):
    rows = [{"text": ROW}, {"text": "just some text"}, {"text": ROW}, {"text": "[/INST] backwards [INST]"}]
    with pytest.raises(dp.DataError) as err:
        dp.clean_dataset(dp.load_raw_dataset(str(write_jsonl(tmp_path / "d.jsonl", rows))))
    assert "2 of 4 rows" in str(err.value) and "row 1:" in str(err.value) and "row 3:" in str(err.value)
    assert "row 0:" not in str(err.value)


def test_empty_rows_are_dropped_and_counted(tmp_path):
    rows = [{"text": ROW}, {"text": ""}, {"text": "   "}, {"text": MULTI}]
    data, report = dp.clean_dataset(dp.load_raw_dataset(str(write_jsonl(tmp_path / "d.jsonl", rows))))
    assert len(data) == 2 and report.empty_dropped == 2 and "dropped 2 empty" in report.notes[0]


def test_all_rows_empty(tmp_path):
    with pytest.raises(dp.DataError, match=r"all 2 rows are empty"):
        dp.clean_dataset(dp.load_raw_dataset(str(write_jsonl(tmp_path / "d.jsonl", [{"text": ""}, {"text": " "}]))))


# ---------------------------------------------------------------- tokens: BOS, EOS, pad, prompt prefix

def cleaned(text):
    from datasets import Dataset

    return dp.clean_dataset(Dataset.from_dict({"text": [text]}))[0]["text"][0]


def test_exactly_one_bos_and_a_final_eos(tokenizer):
    row = dp.tokenize_text(cleaned(ROW), tokenizer, 256, answers_only=True)
    ids = row["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids[1] != tokenizer.bos_token_id
    assert ids.count(tokenizer.bos_token_id) == 1
    assert ids[-1] == tokenizer.eos_token_id and row["labels"][-1] == tokenizer.eos_token_id


def test_missing_eos_is_added_and_trained(tokenizer):
    row = dp.tokenize_text("[INST] Hi [/INST] Hello", tokenizer, 256, answers_only=True)
    assert row["input_ids"][-1] == tokenizer.eos_token_id and row["labels"][-1] == tokenizer.eos_token_id


def test_pad_is_not_eos(tokenizer):
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.padding_side == "right"


def test_eos_label_survives_collation(tokenizer):
    """Batching pads the shorter row; the real </s> of each row must keep its label."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    rows = [dp.tokenize_text(cleaned(t), tokenizer, 256, True) for t in (ROW, SYSTEM)]
    batch = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)(rows)
    for i, row in enumerate(rows):
        last = len(row["input_ids"]) - 1
        assert batch["input_ids"][i, last] == tokenizer.eos_token_id
        assert batch["labels"][i, last] == tokenizer.eos_token_id
        assert (batch["labels"][i, last + 1:] == -100).all() and (batch["attention_mask"][i, last + 1:] == 0).all()


def test_inference_prompt_is_a_prefix_of_the_training_tokens(tokenizer):
    question = "What is the capital of France?"
    train_ids = dp.tokenize_text(cleaned(ROW), tokenizer, 256, True)["input_ids"]
    prompt_ids = tokenizer(dp.format_prompt(question))["input_ids"]
    assert train_ids[:len(prompt_ids)] == prompt_ids
    system_ids = tokenizer(dp.format_prompt("Name a fruit.", "Be brief."))["input_ids"]
    assert dp.tokenize_text(cleaned(SYSTEM), tokenizer, 256, True)["input_ids"][:len(system_ids)] == system_ids


# ---------------------------------------------------------------- the loss mask, token by token

def labelled_text(tokenizer, text, answers_only=True):
    row = dp.tokenize_text(cleaned(text), tokenizer, 256, answers_only)
    kept = [tok for tok, label in zip(row["input_ids"], row["labels"]) if label != -100]
    masked = [tok for tok, label in zip(row["input_ids"], row["labels"]) if label == -100]
    return tokenizer.decode(kept), tokenizer.decode(masked, skip_special_tokens=False), row


def test_single_turn_mask(tokenizer):
    kept, masked, row = labelled_text(tokenizer, ROW)
    assert kept.replace(" ", "") == "ThecapitalofFranceisParis.</s>"
    assert "[INST]" in masked and "France?" in masked and "Paris" not in masked
    first_label = next(i for i, label in enumerate(row["labels"]) if label != -100)
    assert tokenizer.decode(row["input_ids"][:first_label]).strip().endswith("[/INST]")


def test_multi_turn_mask(tokenizer):
    kept, masked, row = labelled_text(tokenizer, MULTI)
    assert kept.replace(" ", "") == "Hello!</s>Itisfour.</s>"
    assert masked.count("[INST]") == 2 and "Hi there" in masked and "two plus two" in masked
    assert sum(1 for label in row["labels"] if label == tokenizer.eos_token_id) == 2


def test_system_prompt_is_masked(tokenizer):
    kept, masked, _ = labelled_text(tokenizer, SYSTEM)
    assert kept.replace(" ", "") == "Anapple.</s>"
    assert "<<SYS>>" in masked and "Be brief." in masked


def test_full_text_mode_trains_on_everything_but_the_first_token(tokenizer):
    _, _, row = labelled_text(tokenizer, ROW, answers_only=False)
    assert row["labels"][1:] == row["input_ids"][1:] and row["labels"][0] == -100


def test_max_length_too_small_for_any_prompt(tokenizer):
    from datasets import Dataset

    with pytest.raises(dp.DataError, match=r"max_seq_length=4 leaves no answer token in any row"):
        dp.tokenize_dataset(Dataset.from_dict({"text": [cleaned(ROW), cleaned(SYSTEM)]}), tokenizer, 4, True)


def test_truncation_keeps_max_length(tokenizer):
    row = dp.tokenize_text(cleaned(ROW), tokenizer, 12, True)
    assert len(row["input_ids"]) == len(row["labels"]) == 12


def test_separate_held_out_file_is_used_whole(tmp_path, tokenizer):
    from config import parse_config

    train = write_jsonl(tmp_path / "train.jsonl", [{"text": ROW}, {"text": MULTI}, {"text": SYSTEM}])
    held = write_jsonl(tmp_path / "held.jsonl", [{"text": ROW}])
    cfg = parse_config(["--preset", "tiny", "--dataset_name", str(train), "--eval_dataset", str(held)])
    lines = []
    train_rows, eval_rows = dp.prepare_datasets(cfg, tokenizer, printer=lines.append)
    assert (len(train_rows), len(eval_rows)) == (3, 1)  # eval_fraction is ignored when a file is given
    assert "3 training rows, 1 held-out rows" in lines[-1]
