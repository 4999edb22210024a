"""Load, check and tokenize a dataset in the Llama-2 chat format of mlabonne/guanaco-llama2-1k.

Each row has one `text` column: `<s>[INST] {question} [/INST] {answer} </s>`, multi-turn rows being
such pairs back to back, optionally with a `<<SYS>>` block in the first [INST].

    dataset = load_raw_dataset("mlabonne/guanaco-llama2-1k")    # or a local .jsonl/.json/.csv/.parquet/folder
    dataset, report = clean_dataset(dataset)                    # checks the format, drops empty rows
    tokenized = tokenize_dataset(dataset, tokenizer, max_length=256, answers_only=True)

`format_prompt` is the one definition of the prompt format: inference.py uses it, so the prompt at
inference is token for token the prefix that training saw.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

INST_OPEN, INST_CLOSE = "[INST]", "[/INST]"
LOCAL_SUFFIXES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
TEXT_SUFFIXES = {".json", ".jsonl", ".csv"}
MAX_REPORTED_ROWS = 5


class DataError(ValueError):
    """The dataset cannot be used as given; the message says what was wrong and what to do."""


@dataclass
class CleanReport:
    rows_in: int
    rows_kept: int
    empty_dropped: int
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------- prompt format

def format_prompt(question: str, system_prompt: str = "") -> str:
    """The Llama-2 chat prompt up to the answer, without BOS (the tokenizer adds it)."""
    if system_prompt:
        return f"{INST_OPEN} <<SYS>>\n{system_prompt}\n<</SYS>>\n\n{question.strip()} {INST_CLOSE}"
    return f"{INST_OPEN} {question.strip()} {INST_CLOSE}"


def format_example(question: str, answer: str, system_prompt: str = "", eos: str = "</s>") -> str:
    """A whole training row as guanaco-llama2 writes it (without the leading <s>)."""
    return f"{format_prompt(question, system_prompt)} {answer.strip()} {eos}"


# ---------------------------------------------------------------------------- loading

def _looks_like_path(name: str) -> bool:
    return Path(name).suffix.lower() in LOCAL_SUFFIXES or name.startswith((".", "/", "~")) or os.path.exists(name)


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _check_utf8(path: Path) -> None:
    try:
        path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path} is not valid UTF-8 (bad byte at offset {exc.start}); re-save it as UTF-8, "
            "e.g. `iconv -f latin1 -t utf-8 in.jsonl > out.jsonl`"
        ) from None


def _read_json_rows(path: Path) -> list[dict]:
    """JSON Lines, or one JSON array of objects; errors name the line."""
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    else:
        rows = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}, line {lineno}: not valid JSON ({exc.msg}); each line must be an object like {{\"text\": \"...\"}}") from None
    if not all(isinstance(row, dict) for row in rows):
        raise DataError(f"{path}: every row must be a JSON object with a 'text' field")
    return rows


def load_local_dataset(path: Path):
    from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

    if path.is_dir():
        if not any((path / marker).exists() for marker in ("dataset_info.json", "state.json", "dataset_dict.json")):
            raise DataError(f"{path} is a folder but not a saved dataset (no dataset_info.json); point at a data file instead")
        loaded = load_from_disk(str(path))  # Arrow files: nothing is unpickled
        if isinstance(loaded, DatasetDict):
            if "train" not in loaded:
                raise DataError(f"{path} holds splits {list(loaded)}, none called 'train'")
            loaded = loaded["train"]
        return loaded
    suffix = path.suffix.lower()
    if suffix not in LOCAL_SUFFIXES:
        raise DataError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(sorted(LOCAL_SUFFIXES))} or a saved dataset folder")
    if suffix in TEXT_SUFFIXES:
        _check_utf8(path)
    if LOCAL_SUFFIXES[suffix] == "json":
        rows = _read_json_rows(path)
        return Dataset.from_list(rows) if rows else Dataset.from_dict({"text": []})
    return load_dataset(LOCAL_SUFFIXES[suffix], data_files=str(path), split="train")


def load_hub_dataset(name: str, split: str):
    from datasets import load_dataset

    local_hint = f"or point at a local copy: --dataset_name data/sample.jsonl (any .jsonl/.json/.csv/.parquet with a 'text' column)"
    if _hub_offline():
        raise DataError(f"dataset {name!r} is not a local file and HF_HUB_OFFLINE is set, so the hub is not tried; unset HF_HUB_OFFLINE, {local_hint}")
    try:
        return load_dataset(name, split=split)
    except Exception as exc:  # datasets raises many types for "no network"; keep the cause visible
        raise DataError(f"could not load dataset {name!r} from the Hugging Face Hub ({type(exc).__name__}: {exc}); check your network and the name, {local_hint}") from exc


def load_raw_dataset(name_or_path: str, split: str = "train"):
    """A hub dataset by name, or a local file / saved-dataset folder."""
    if _looks_like_path(name_or_path):
        path = Path(name_or_path).expanduser()
        if not path.exists():
            raise DataError(f"dataset file {str(path)!r} does not exist (working directory: {os.getcwd()}); check the path in dataset_name")
        return load_local_dataset(path)
    return load_hub_dataset(name_or_path, split)


# ---------------------------------------------------------------------------- checking

def _format_problem(text: str) -> str | None:
    """Why a row is not in the Llama-2 chat format, or None if it is."""
    opens, closes = text.count(INST_OPEN), text.count(INST_CLOSE)
    if opens == 0 or closes == 0:
        return "no [INST] ... [/INST] pair"
    if opens != closes:
        return f"{opens} [INST] but {closes} [/INST]"
    if text.find(INST_OPEN) > text.find(INST_CLOSE):
        return "[/INST] comes before [INST]"
    if not text.rsplit(INST_CLOSE, 1)[1].replace("</s>", "").strip():
        return "no answer after the last [/INST]"
    return None


def normalize_row(text: str) -> str:
    """Drop the leading <s> (the tokenizer adds BOS) and the space before each </s>.

    guanaco writes "answer </s>": tokenized, that space becomes a lone '▁' token the model must
    learn to emit before it may stop. Without it, </s> follows the answer's last word directly.
    """
    text = text[3:].lstrip() if text.startswith("<s>") else text
    return re.sub(r"\s+</s>", "</s>", text)


def clean_dataset(dataset):
    """Check the `text` column and the chat format; drop empty rows; strip the leading <s>.

    The leading literal <s> is removed because the tokenizer adds BOS itself: keeping both gives
    every row two BOS tokens, which the model then expects at inference.
    """
    if "text" not in dataset.column_names:
        raise DataError(f"the dataset has no 'text' column (columns: {dataset.column_names}); rename the column holding the chat text to 'text'")
    texts = dataset["text"]
    kept, bad, empty = [], [], 0
    for index, text in enumerate(texts):
        if text is None or not str(text).strip():
            empty += 1
            continue
        text = str(text).strip()
        problem = _format_problem(text)
        if problem:
            bad.append((index, problem, text))
            continue
        kept.append(normalize_row(text))
    if bad:
        shown = "\n".join(f"  row {i}: {why}: {t[:80]!r}" for i, why, t in bad[:MAX_REPORTED_ROWS])
        more = f"\n  ... and {len(bad) - MAX_REPORTED_ROWS} more" if len(bad) > MAX_REPORTED_ROWS else ""
        raise DataError(
            f"{len(bad)} of {len(texts)} rows are not in the Llama-2 chat format "
            f"'<s>[INST] question [/INST] answer </s>':\n{shown}{more}"
        )
    if not kept:
        raise DataError(f"all {len(texts)} rows are empty; the dataset has nothing to train on")
    from datasets import Dataset

    report = CleanReport(rows_in=len(texts), rows_kept=len(kept), empty_dropped=empty)
    if empty:
        report.notes.append(f"dropped {empty} empty row(s)")
    return Dataset.from_dict({"text": kept}), report


# ---------------------------------------------------------------------------- tokenizing

def answer_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of every answer: from after each [/INST] to the end of its </s> (or the next turn)."""
    spans = []
    for match in re.finditer(re.escape(INST_CLOSE), text):
        start = match.end()
        next_turn = text.find(INST_OPEN, start)
        end = len(text) if next_turn == -1 else next_turn
        eos_at = text.find("</s>", start, end)
        if eos_at != -1:
            end = eos_at + len("</s>")
        spans.append((start, end))
    return spans


def tokenize_text(text: str, tokenizer, max_length: int, answers_only: bool) -> dict:
    """input_ids and labels for one cleaned row (labels -100 where no loss is taken).

    Exactly one BOS at the start; the row ends with EOS (added if the text lacks </s>), and that
    EOS carries a label so the model learns to stop.
    """
    encoded = tokenizer(text, return_offsets_mapping=True, add_special_tokens=True)
    ids, offsets = list(encoded["input_ids"]), list(encoded["offset_mapping"])
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is not None:
        if len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
            ids, offsets = ids[1:], offsets[1:]
        elif not ids or ids[0] != bos:
            ids, offsets = [bos] + ids, [(0, 0)] + offsets
    if ids[-1] != eos:
        ids.append(eos)
        offsets.append((len(text), len(text) + 1))  # counts as part of the last answer
    if answers_only:
        spans = answer_spans(text) or [(0, len(text) + 1)]
        spans[-1] = (spans[-1][0], max(spans[-1][1], len(text) + 1))
        labels = [tok if any(s <= start < e for s, e in spans) and end > start else -100
                  for tok, (start, end) in zip(ids, offsets)]
    else:
        labels = list(ids)
        if bos is not None and labels[0] == bos:
            labels[0] = -100  # nothing predicts the first token
    return {"input_ids": ids[:max_length], "labels": labels[:max_length]}


def tokenize_dataset(dataset, tokenizer, max_length: int, answers_only: bool):
    """Tokenized rows with labels; rows whose answer is cut off entirely by max_length are dropped."""
    from datasets import Dataset

    rows = [tokenize_text(text, tokenizer, max_length, answers_only) for text in dataset["text"]]
    usable = [row for row in rows if any(label != -100 for label in row["labels"])]
    if not usable:
        longest_prompt = min(sum(1 for label in row["labels"] if label == -100) for row in rows)
        raise DataError(
            f"max_seq_length={max_length} leaves no answer token in any row (the shortest prompt alone is "
            f"{longest_prompt} tokens); raise max_seq_length, e.g. --max_seq_length 256"
        )
    tokenized = Dataset.from_dict({
        "input_ids": [row["input_ids"] for row in usable],
        "labels": [row["labels"] for row in usable],
    })
    return tokenized, len(rows) - len(usable)


def split_train_eval(dataset, eval_fraction: float, seed: int):
    """(train, eval or None): a fixed, seeded held-out share of the rows."""
    if eval_fraction <= 0:
        return dataset, None
    n_eval = max(1, round(len(dataset) * eval_fraction))
    if n_eval >= len(dataset):
        raise DataError(f"eval_fraction={eval_fraction} leaves no training rows out of {len(dataset)}; lower it")
    parts = dataset.train_test_split(test_size=n_eval, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


def prepare_datasets(cfg, tokenizer, printer=print):
    """(train_rows, eval_rows or None) tokenized from the configured source(s), with a report printed."""
    dataset, report = clean_dataset(load_raw_dataset(cfg.dataset_name, cfg.dataset_split))
    for note in report.notes:
        printer(f"data: {note}")
    if cfg.eval_dataset:
        train, held_out = dataset, clean_dataset(load_raw_dataset(cfg.eval_dataset, cfg.dataset_split))[0]
    else:
        train, held_out = split_train_eval(dataset, cfg.eval_fraction, cfg.seed)
    answers_only = cfg.train_on_answers_only
    train_rows, dropped = tokenize_dataset(train, tokenizer, cfg.max_seq_length, answers_only)
    if dropped:
        printer(f"data: dropped {dropped} row(s) whose answer starts beyond max_seq_length={cfg.max_seq_length}")
    eval_rows = tokenize_dataset(held_out, tokenizer, cfg.max_seq_length, answers_only)[0] if held_out is not None else None
    printer(f"data: {len(train_rows)} training rows" + (f", {len(eval_rows)} held-out rows" if eval_rows is not None else ""))
    return train_rows, eval_rows
