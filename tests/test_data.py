"""data_preparation.py: loading, format checks, BOS/EOS handling and the loss mask, token by token."""

import json

import pytest

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

def test_unrecognised_columns_name_the_columns_and_the_formats(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "answer": "a"}])
    with pytest.raises(dp.DataError) as err:
        dp.clean_dataset(dp.load_raw_dataset(str(path)))
    assert "columns ['prompt', 'answer'] match no known format" in str(err.value)
    for accepted in ("'text'", "'messages'", "'conversations'", "'instruction' + 'output'", "'prompt' + 'completion'",
                     "--dataset_format"):
        assert accepted in str(err.value)


def test_rows_not_in_chat_format_are_reported_by_index(tmp_path):
    rows = [{"text": ROW}, {"text": "just some text"}, {"text": ROW}, {"text": "[/INST] backwards [INST]"}]
    with pytest.raises(dp.DataError) as err:
        dp.clean_dataset(dp.load_raw_dataset(str(write_jsonl(tmp_path / "d.jsonl", rows))))
    assert "2 of 4 rows" in str(err.value) and "row 1:" in str(err.value) and "row 3:" in str(err.value)
    assert "row 0:" not in str(err.value)


def test_empty_rows_are_dropped_and_counted(tmp_path):
    rows = [{"text": ROW}, {"text": ""}, {"text": "   "}, {"text": MULTI}]
    data, report = dp.clean_dataset(dp.load_raw_dataset(str(write_jsonl(tmp_path / "d.jsonl", rows))))
    assert len(data) == 2 and report.empty_dropped == 2 and "dropped 2 empty row(s)" in report.notes


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


# ---------------------------------------------------------------- formats (README "Your own data")

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a fruit."},
                {"role": "assistant", "content": "An apple."}]
FORMAT_ROWS = {
    "messages": ({"messages": CONVERSATION}, CONVERSATION),
    "sharegpt": ({"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Name a fruit."},
                                    {"from": "gpt", "value": "An apple."}]}, CONVERSATION),
    "alpaca": ({"instruction": "Name a fruit.", "input": "", "output": "An apple."}, CONVERSATION[1:]),
    "alpaca_input": ({"instruction": "Translate to French.", "input": "An apple.", "output": "Une pomme."},
                     [{"role": "user", "content": "Translate to French.\nAn apple."},
                      {"role": "assistant", "content": "Une pomme."}]),
    "prompt_completion": ({"prompt": "Name a fruit.", "completion": "An apple."}, CONVERSATION[1:]),
    "prompt_completion_messages": ({"prompt": CONVERSATION[:2], "completion": CONVERSATION[2:]}, CONVERSATION),
}
FORMAT_LINES = {"messages": "conversational 'messages'", "sharegpt": "ShareGPT 'conversations'",
                "alpaca": "Alpaca 'instruction'/'input'/'output'", "prompt_completion": "'prompt'/'completion'"}


@pytest.mark.parametrize("kind", FORMAT_ROWS)
@pytest.mark.parametrize("suffix", ["jsonl", "parquet"])
def test_every_format_becomes_the_same_conversation(tmp_path, kind, suffix):
    from datasets import Dataset

    row, expected = FORMAT_ROWS[kind]
    path = tmp_path / f"d.{suffix}"
    if suffix == "jsonl":
        write_jsonl(path, [row, row])
    else:
        Dataset.from_list([row, row]).to_parquet(str(path))
    data, report = dp.clean_dataset(dp.load_raw_dataset(str(path)))
    assert list(data["messages"]) == [expected, expected]
    assert report.notes[0] == f"2 rows in {FORMAT_LINES[kind.split('_input')[0].replace('_messages', '')]} format (detected from the columns)"


def test_conversations_load_from_csv_with_json_cells(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("id,messages\n7," + json.dumps(json.dumps(CONVERSATION)).replace('\\"', '""') + "\n", encoding="utf-8")
    data, report = dp.clean_dataset(dp.load_raw_dataset(str(path)))
    assert list(data["messages"]) == [CONVERSATION] and "ignored columns: id" in report.notes[0]


def test_text_rows_and_conversations_in_one_file_are_mixed(tmp_path):
    """Rows with different keys: all columns are seen (not only the first row's), and the mix is refused."""
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": ROW}, {"messages": CONVERSATION}])
    with pytest.raises(dp.DataError, match=r"columns \['text', 'messages'\] match several formats at once \(text, messages\)"):
        dp.clean_dataset(dp.load_raw_dataset(str(path)))


def test_dataset_format_forces_one_format_and_says_so(tmp_path):
    rows = [{"instruction": "Name a fruit.", "input": "", "output": "An apple.", "text": "### Instruction: ..."}]
    path = write_jsonl(tmp_path / "alpaca.jsonl", rows)
    with pytest.raises(dp.DataError, match=r"match several formats at once \(text, alpaca\)"):
        dp.clean_dataset(dp.load_raw_dataset(str(path)))
    data, report = dp.clean_dataset(dp.load_raw_dataset(str(path)), dataset_format="alpaca")
    assert list(data["messages"]) == [CONVERSATION[1:]]
    assert report.notes[0] == "1 rows in Alpaca 'instruction'/'input'/'output' format (forced by dataset_format; ignored columns: text)"
    with pytest.raises(dp.DataError, match=r"dataset_format='messages' needs the column\(s\) \['messages'\]"):
        dp.clean_dataset(dp.load_raw_dataset(str(path)), dataset_format="messages")


@pytest.mark.parametrize("row, why", [
    ({"messages": [{"role": "user", "content": "Hi"}]}, "message 0 (the last) is a user message with no answer"),
    ({"messages": [{"role": "assistant", "content": "Hi"}]}, "message 0: expected a user message"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " "}]}, "message 1 is an empty answer"),
    ({"messages": "not json"}, "'messages' is text that is not a JSON list of messages"),
    ({"conversations": [{"from": "bing", "value": "Hi"}]}, "message 0: 'from' is 'bing'; use one of system, human, user, gpt"),
    ({"instruction": "Hi", "output": ["a", "b"]}, "'output' holds a list, not text"),
])
def test_bad_conversations_are_listed_by_row(tmp_path, row, why):
    with pytest.raises(dp.DataError) as err:
        dp.clean_dataset(dp.load_raw_dataset(str(write_jsonl(tmp_path / "d.jsonl", [row, row]))))
    assert "2 of 2 rows are not usable" in str(err.value) and f"row 1: {why}" in str(err.value)
    assert "--on_bad_rows skip" in str(err.value)


# ---------------------------------------------------------------- answers that would silently change the target

@pytest.mark.parametrize("text, why", [
    ("<s>[INST] Say it [/INST] Use </s> to end a strikethrough. </s>", "a literal </s> inside answer 1 would end it there"),
    ("<s>[INST] Hi [/INST] Hello </s><s>[INST] Quote me [/INST] He said [INST] stop [/INST] and left. </s>",
     "an [INST] inside answer 2"),
    ("<s>[INST] Hi [/INST] Hello [INST] more [/INST] there </s>", "an [INST] inside answer 1"),
    ("<s>[INST] Strike [/INST] Write <s>old</s> new. </s>", "a literal"),
])
def test_markers_inside_an_answer_are_reported_by_row(tmp_path, text, why):
    rows = [{"text": ROW}, {"text": text}, {"text": MULTI}]
    with pytest.raises(dp.DataError) as err:
        dp.clean_dataset(dp.load_raw_dataset(str(write_jsonl(tmp_path / "d.jsonl", rows))))
    assert "1 of 3 rows are not in the Llama-2 chat format" in str(err.value) and f"row 1: {why}" in str(err.value)


def test_skip_drops_bad_rows_and_lists_them(tmp_path, tokenizer):
    from config import parse_config

    rows = [{"text": ROW}, {"text": "<s>[INST] Say it [/INST] Use </s> here. </s>"}, {"text": MULTI},
            {"text": "no chat format at all"}, {"text": ""}, {"text": SYSTEM}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = parse_config(["--preset", "tiny", "--dataset_name", str(path), "--on_bad_rows", "skip", "--eval_fraction", "0"])
    lines = []
    train, _ = dp.prepare_datasets(cfg, tokenizer, printer=lines.append)
    report = "\n".join(lines)
    assert len(train) == 3
    assert "dropped 2 of 6 rows that cannot be trained on as they are (--on_bad_rows skip):" in report
    assert "  row 1: a literal </s> inside answer 1" in report and "  row 3: no [INST] ... [/INST] pair" in report
    assert "dropped 1 empty row(s)" in report


def test_truncated_answers_are_counted_with_their_rows(tmp_path, tokenizer):
    from config import parse_config

    long_question = "<s>[INST] " + "Tell me more about this. " * 40 + "[/INST] Sure. </s>"
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": ROW}, {"text": long_question}, {"text": SYSTEM}])
    cfg = parse_config(["--preset", "tiny", "--dataset_name", str(path), "--max_seq_length", "64", "--eval_fraction", "0"])
    lines = []
    train, _ = dp.prepare_datasets(cfg, tokenizer, printer=lines.append)
    assert len(train) == 2
    assert any(line.startswith("data: dropped 1 of 3 rows whose answer starts beyond max_seq_length=64:\n  row 1: its "
                               "answer starts at token") for line in lines)


# ---------------------------------------------------------------- files that cannot be read as they are

def test_unreadable_file_says_permission_denied(tmp_path, monkeypatch):
    from pathlib import Path

    path = write_jsonl(tmp_path / "secret.jsonl", [{"text": ROW}])
    real_read_bytes = Path.read_bytes

    def denied(self):  # the suite runs as root, where chmod 000 would not stop the read
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real_read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(dp.DataError, match=rf"cannot read {path}: permission denied; make it readable"):
        dp.load_raw_dataset(str(path))


def test_text_column_holding_lists_in_some_rows(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": ROW}, {"text": ["a", "b"]}, {"text": MULTI}])
    with pytest.raises(dp.DataError, match=r"column 'text' holds text in row\(s\) 0, 2; a list in row\(s\) 1; every row's "
                                           r"'text' must be the same kind of value"):
        dp.load_raw_dataset(str(path))


def test_text_column_holding_lists_in_every_row(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": ["a"]}, {"text": ["b"]}])
    with pytest.raises(dp.DataError, match=r"2 of 2 rows .*\n  row 0: 'text' holds a list, not text"):
        dp.clean_dataset(dp.load_raw_dataset(str(path)))


@pytest.mark.parametrize("content", ["", "\n\n"])
def test_empty_file_says_the_file_is_empty(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(dp.DataError, match=r"empty.jsonl (is empty \(0 bytes\)|holds no rows \(the file is empty\))"):
        dp.load_raw_dataset(str(path))


def test_missing_eval_dataset_names_eval_dataset(tmp_path, tokenizer):
    from config import parse_config

    train = write_jsonl(tmp_path / "train.jsonl", [{"text": ROW}, {"text": MULTI}])
    cfg = parse_config(["--preset", "tiny", "--dataset_name", str(train), "--eval_dataset", str(tmp_path / "nope.jsonl")])
    with pytest.raises(dp.DataError, match=r"nope.jsonl' does not exist .*; check the path in eval_dataset$"):
        dp.prepare_datasets(cfg, tokenizer, printer=lambda line: None)


def test_max_length_suggestion_fits(tokenizer):
    """Every prompt is longer than the default 256 tokens: the hint must name a value that fits, not 256."""
    from datasets import Dataset

    long_rows = [cleaned(f"<s>[INST] {'Tell me more about this, please. ' * n} [/INST] Sure. </s>") for n in (50, 60)]
    data = Dataset.from_dict({"text": long_rows})
    with pytest.raises(dp.DataError) as err:
        dp.tokenize_dataset(data, tokenizer, 256, True)
    assert "max_seq_length=256 leaves no answer token in any row" in str(err.value)
    suggested = int(str(err.value).split("--max_seq_length ")[1].split()[0])
    assert suggested > 256
    rows, _ = dp.tokenize_dataset(data, tokenizer, suggested, True)
    assert len(rows) == 2 and all(any(label != -100 for label in row["labels"]) for row in rows)


def test_readme_format_examples_train(tmp_path, tokenizer):
    """Each two-row example of README "Your own data" loads, is detected as its format, and tokenizes."""
    import re

    readme = (PROJECT_DIR / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Your own data", 1)[1].split("\n## ", 1)[0]
    examples = re.findall(r"\(`--dataset_format (\w+)`\).*?```json\n(.*?)```", section, flags=re.S)
    assert sorted(name for name, _ in examples) == ["alpaca", "messages", "prompt_completion", "sharegpt", "text"]
    examples.append(("prompt_completion", section.split("TRL's conversational form")[1].split("```json\n")[1].split("```")[0]))
    for name, block in examples:
        path = tmp_path / f"{name}.jsonl"
        path.write_text(block, encoding="utf-8")
        data, report = dp.clean_dataset(dp.load_raw_dataset(str(path)), tokenizer=tokenizer)
        assert report.format == name and len(data) == 2, name
        rows, truncated = dp.tokenize_dataset(data, tokenizer, 256, True)
        assert len(rows) == 2 and not truncated


def test_skip_with_every_row_bad_says_what_was_wrong(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "no format"}, {"text": "[INST] a [/INST] b </s> c"}])
    with pytest.raises(dp.DataError, match=r"no row of the dataset is left to train on: 2 were dropped as bad "
                                           r"\(--on_bad_rows skip\) and 0 were empty; the first bad one, row 0: no \[INST\]"):
        dp.clean_dataset(dp.load_raw_dataset(str(path)), on_bad_rows="skip")
