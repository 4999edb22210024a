"""Load, check and tokenize a chat dataset in any of the formats users bring.

Formats, detected from the columns (or forced with `dataset_format`), README "Your own data":
- `text`: the Llama-2 chat format of mlabonne/guanaco-llama2-1k, `<s>[INST] {question} [/INST]
  {answer} </s>`, multi-turn rows being such pairs back to back, optionally with a `<<SYS>>` block;
- `messages`: a list of `{role, content}` (system, user, assistant), as TRL and OpenAI write it;
- `sharegpt`: `conversations`, a list of `{from: human|gpt|system, value}`;
- `alpaca`: `instruction`, optional `input`, `output`;
- `prompt_completion`: `prompt` and `completion`, as text or as lists of messages.

    dataset = load_raw_dataset("mlabonne/guanaco-llama2-1k")    # or a local .jsonl/.json/.csv/.parquet/folder
    dataset, report = clean_dataset(dataset, tokenizer=tokenizer)   # detects the format, checks every row
    tokenized, truncated = tokenize_dataset(dataset, tokenizer, max_length=256, answers_only=True)

Every row becomes a conversation that chat_format.py writes in the model's chat format, the one
definition of the format shared with inference. Llama-2 `text` rows on a Llama-2-format tokenizer
keep their own text, token for token as before.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from chat_format import (ChatFormatError, ChatStyle, ConversationError, TrainingText, answer_spans, chat_style,
                         check_training_conversation, encode_training_text, llama2_messages, llama2_problem,
                         normalize_row, training_texts)
from chat_format import format_prompt  # noqa: F401  (tests import it from here)

LOCAL_SUFFIXES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
TEXT_SUFFIXES = {".json", ".jsonl", ".csv"}
MAX_REPORTED_ROWS = 5
MAX_LISTED_DROPS = 20
SOURCE_ROW = "source_row"  # the row's index in the file, carried along so that reports name it

# format: (required columns, optional columns, how a person calls it). config.DATASET_FORMATS lists the names.
FORMATS = {
    "text": (("text",), (), "Llama-2 'text'"),
    "messages": (("messages",), (), "conversational 'messages'"),
    "sharegpt": (("conversations",), (), "ShareGPT 'conversations'"),
    "alpaca": (("instruction", "output"), ("input",), "Alpaca 'instruction'/'input'/'output'"),
    "prompt_completion": (("prompt", "completion"), (), "'prompt'/'completion'"),
}
ACCEPTED = ("'text' (Llama-2 chat text), 'messages' (a list of {role, content}), 'conversations' (ShareGPT: a list "
            "of {from, value}), 'instruction' + 'output' with an optional 'input' (Alpaca), 'prompt' + 'completion'")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


class DataError(ValueError):
    """The dataset cannot be used as given; the message says what was wrong and what to do."""


@dataclass
class CleanReport:
    rows_in: int
    rows_kept: int
    empty_dropped: int
    notes: list[str] = field(default_factory=list)
    format: str = "text"
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (row, why) dropped by --on_bad_rows skip


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


def _kind(value) -> str:
    return {str: "text", list: "a list", dict: "an object", bool: "true/false", type(None): "null"}.get(
        type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__)


def _type_conflict(path: Path, rows: list[dict]) -> str | None:
    """A column whose rows hold different kinds of value (Arrow cannot store it), described by row."""
    for column in rows[0]:
        rows_by_kind: dict[str, list[int]] = {}
        for index, row in enumerate(rows):
            if row[column] is not None:
                rows_by_kind.setdefault(_kind(row[column]), []).append(index)
        if len(rows_by_kind) > 1:
            kinds = "; ".join(f"{kind} in row(s) {', '.join(map(str, found[:5]))}" + (" ..." if len(found) > 5 else "")
                              for kind, found in rows_by_kind.items())
            return f"{path}: column {column!r} holds {kinds}; every row's {column!r} must be the same kind of value"
    return None


def _read_json_rows(path: Path):
    """A Dataset from JSON Lines, or from one JSON array of objects; errors name the line or the row."""
    from datasets import Dataset

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
                raise DataError(f"{path}, line {lineno}: not valid JSON ({exc.msg}); each line must be one JSON object (one row)") from None
    if not all(isinstance(row, dict) for row in rows):
        raise DataError(f"{path}: every row must be a JSON object, e.g. {{\"messages\": [...]}} or {{\"text\": \"...\"}}")
    if not rows:
        raise DataError(f"{path} holds no rows (the file is empty); put one JSON object per line in it")
    # Every column any row has (Dataset.from_list would keep only the first row's), None where absent.
    columns = list(dict.fromkeys(key for row in rows for key in row))
    rows = [{column: row.get(column) for column in columns} for row in rows]
    conflict = _type_conflict(path, rows)
    if conflict:
        raise DataError(conflict)
    import pyarrow

    try:
        return Dataset.from_list(rows)
    except pyarrow.ArrowException as exc:  # e.g. messages whose fields differ in kind between rows
        raise DataError(f"{path}: the rows' values do not have one consistent type ({exc}); make each column hold "
                        "the same kind of value in every row") from None


def _load_local(path: Path):
    from datasets import DatasetDict, load_dataset, load_from_disk

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
    if path.stat().st_size == 0:
        raise DataError(f"{path} is empty (0 bytes); it has no rows to train on")
    if suffix in TEXT_SUFFIXES:
        _check_utf8(path)
    if LOCAL_SUFFIXES[suffix] == "json":
        return _read_json_rows(path)
    return load_dataset(LOCAL_SUFFIXES[suffix], data_files=str(path), split="train")


def load_local_dataset(path: Path):
    """A local file or saved-dataset folder; an unreadable one fails with the reason, not a traceback."""
    try:
        return _load_local(path)
    except PermissionError as exc:
        raise DataError(f"cannot read {exc.filename or path}: permission denied; make it readable "
                        f"(e.g. `chmod a+r {exc.filename or path}`) or copy it somewhere you can read") from None
    except (IsADirectoryError, NotADirectoryError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None


def load_hub_dataset(name: str, split: str, field_name: str = "dataset_name"):
    from datasets import load_dataset

    local_hint = f"or point at a local copy: --{field_name} data/sample.jsonl (any .jsonl/.json/.csv/.parquet, README 'Your own data')"
    if _hub_offline():
        raise DataError(f"dataset {name!r} ({field_name}) is not a local file and HF_HUB_OFFLINE is set, so the hub is not tried; unset HF_HUB_OFFLINE, {local_hint}")
    try:
        return load_dataset(name, split=split)
    except Exception as exc:  # datasets raises many types for "no network"; keep the cause visible
        raise DataError(f"could not load dataset {name!r} ({field_name}) from the Hugging Face Hub ({type(exc).__name__}: {exc}); check your network and the name, {local_hint}") from exc


def load_raw_dataset(name_or_path: str, split: str = "train", field_name: str = "dataset_name"):
    """A hub dataset by name, or a local file / saved-dataset folder; errors name `field_name`."""
    if _looks_like_path(name_or_path):
        path = Path(name_or_path).expanduser()
        if not path.exists():
            raise DataError(f"dataset file {str(path)!r} does not exist (working directory: {os.getcwd()}); check the path in {field_name}")
        return load_local_dataset(path)
    return load_hub_dataset(name_or_path, split, field_name)


# ---------------------------------------------------------------------------- formats

def detect_format(columns: list[str], requested: str = "auto") -> tuple[str, list[str]]:
    """(format, ignored columns): the format `requested`, or the one format the columns match."""
    if requested != "auto":
        missing = [column for column in FORMATS[requested][0] if column not in columns]
        if missing:
            raise DataError(f"dataset_format={requested!r} needs the column(s) {missing}, but the dataset's columns are "
                            f"{columns}; rename them, or use another --dataset_format (accepted: {ACCEPTED})")
        chosen = requested
    else:
        matches = [name for name, (required, _, _) in FORMATS.items() if all(c in columns for c in required)]
        if len(matches) != 1:
            which = "no known format" if not matches else f"several formats at once ({', '.join(matches)})"
            raise DataError(f"the dataset's columns {columns} match {which}. Accepted: {ACCEPTED}. Rename the columns, "
                            f"or pick one with --dataset_format ({', '.join(FORMATS)})")
        chosen = matches[0]
    required, optional, _ = FORMATS[chosen]
    return chosen, [column for column in columns if column not in required + optional]


def _blank(value) -> bool:
    return value is None or (isinstance(value, (str, list)) and not (value.strip() if isinstance(value, str) else value))


def _text_field(row: dict, column: str) -> str:
    value = row.get(column)
    if value is not None and not isinstance(value, str):
        raise ConversationError(f"{column!r} holds {_kind(value)}, not text")
    return value or ""


def _message_list(value, column: str) -> list:
    """A list of messages; a CSV cell holding the list as JSON text is read as JSON."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ConversationError(f"{column!r} is text that is not a JSON list of messages") from None
    if not isinstance(value, list) or not all(isinstance(message, dict) for message in value):
        raise ConversationError(f"{column!r} holds {_kind(value)}, not a list of message objects")
    return value


def _messages_of(value, column: str, role_key: str = "role", content_key: str = "content", roles=None) -> list[dict]:
    messages = []
    for index, message in enumerate(_message_list(value, column)):
        role = message.get(role_key)
        if roles is not None:
            if role not in roles:
                raise ConversationError(f"message {index}: {role_key!r} is {role!r}; use one of {', '.join(roles)}")
            role = roles[role]
        messages.append({"role": role, "content": message.get(content_key)})
    return messages


def row_conversation(row: dict, dataset_format: str) -> list[dict]:
    """The messages of one row of a conversational format; ConversationError says what is wrong."""
    if dataset_format == "messages":
        messages = _messages_of(row["messages"], "messages")
    elif dataset_format == "sharegpt":
        messages = _messages_of(row["conversations"], "conversations", "from", "value", SHAREGPT_ROLES)
    elif dataset_format == "alpaca":
        instruction, extra = _text_field(row, "instruction"), _text_field(row, "input")
        question = f"{instruction}\n{extra}" if extra.strip() else instruction
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": _text_field(row, "output")}]
    elif isinstance(row["prompt"], str) or isinstance(row["completion"], str):
        messages = [{"role": "user", "content": _text_field(row, "prompt")},
                    {"role": "assistant", "content": _text_field(row, "completion")}]
    else:  # TRL's conversational prompt-completion: both are lists of messages
        messages = _messages_of(row["prompt"], "prompt") + _messages_of(row["completion"], "completion")
    check_training_conversation(messages)
    return messages


def _is_empty(row: dict, dataset_format: str) -> bool:
    required, optional, _ = FORMATS[dataset_format]
    return all(_blank(row.get(column)) for column in required + optional)


# ---------------------------------------------------------------------------- checking

def training_rows(row: dict, tokenizer, style: ChatStyle) -> list[TrainingText]:
    """A cleaned row rendered in the model's chat format (Llama-2 text rows of a Llama-2 tokenizer as they are)."""
    if "text" in row:
        if style.is_llama2:
            return [TrainingText(row["text"], answer_spans(row["text"]))]
        return training_texts(tokenizer, llama2_messages(row["text"]), style)
    return training_texts(tokenizer, row["messages"], style)


def _row_problem(row: dict, dataset_format: str, tokenizer, style: ChatStyle | None) -> tuple[object, str | None]:
    """(the cleaned value, None) for a usable row, or (None, why) for a bad one."""
    try:
        if dataset_format == "text":
            text = _text_field(row, "text").strip()
            problem = llama2_problem(text)
            if problem:
                raise ConversationError(problem)
            value = normalize_row(text)
            cleaned = {"text": value}
        else:
            value = row_conversation(row, dataset_format)
            cleaned = {"messages": value}
        if tokenizer is not None:  # rendered and tokenized once here, so that every bad row is known now
            for rendered in training_rows(cleaned, tokenizer, style):
                encode_training_text(tokenizer, rendered, None, True, style)
        return value, None
    except ConversationError as exc:
        return None, str(exc)


def _bad_rows_message(bad: list[tuple[int, str]], rows_in: int, dataset_format: str, rows: list[dict]) -> str:
    def shown(index: int) -> str:
        value = rows[index].get("text") if dataset_format == "text" else {k: v for k, v in rows[index].items() if v is not None}
        return f"{str(value)[:80]!r}"

    listed = "\n".join(f"  row {i}: {why}: {shown(i)}" for i, why in bad[:MAX_REPORTED_ROWS])
    more = f"\n  ... and {len(bad) - MAX_REPORTED_ROWS} more (rows {', '.join(str(i) for i, _ in bad[MAX_REPORTED_ROWS:])})" \
        if len(bad) > MAX_REPORTED_ROWS else ""
    what = ("not in the Llama-2 chat format '<s>[INST] question [/INST] answer </s>'" if dataset_format == "text"
            else f"not usable {FORMATS[dataset_format][2]} conversations")
    return f"{len(bad)} of {rows_in} rows are {what}:\n{listed}{more}\nFix them, or drop them with --on_bad_rows skip."


def format_dropped(what: str, dropped: list[tuple[int, str]], rows_in: int) -> str:
    """How many rows were dropped, why, and their indices, one line per row (the first few), then the rest."""
    lines = [f"dropped {len(dropped)} of {rows_in:,} rows {what}:"]
    lines += [f"  row {i}: {why}" for i, why in dropped[:MAX_LISTED_DROPS]]
    if len(dropped) > MAX_LISTED_DROPS:
        lines.append(f"  ... and {len(dropped) - MAX_LISTED_DROPS} more: rows "
                     + ", ".join(str(i) for i, _ in dropped[MAX_LISTED_DROPS:]))
    return "\n".join(lines)


def clean_dataset(dataset, dataset_format: str = "auto", on_bad_rows: str = "error", tokenizer=None, source: str = "the dataset"):
    """Detect the format, check every row, drop empty rows; returns (cleaned rows, report).

    Text rows lose their leading literal <s> (the tokenizer adds BOS itself: keeping both gives
    every row two BOS tokens, which the model then expects at inference). Other formats become
    `messages`. With a tokenizer, each row is also written in its chat format, so that a row the
    format cannot hold is reported here with the others. Bad rows raise DataError, listed by
    index (on_bad_rows='error'), or are dropped and listed in the report ('skip').
    """
    from datasets import Dataset

    chosen, ignored = detect_format(list(dataset.column_names), dataset_format)
    required, optional, label = FORMATS[chosen]
    rows = dataset.select_columns([c for c in required + optional if c in dataset.column_names]).to_list()
    if not rows:
        raise DataError(f"{source} is empty: it has no rows to train on")
    style = chat_style(tokenizer) if tokenizer is not None else None
    kept, sources, bad, empty = [], [], [], 0
    for index, row in enumerate(rows):
        if _is_empty(row, chosen):
            empty += 1
            continue
        value, problem = _row_problem(row, chosen, tokenizer, style)
        if problem:
            bad.append((index, problem))
            continue
        kept.append(value)
        sources.append(index)
    if bad and on_bad_rows != "skip":
        raise DataError(_bad_rows_message(bad, len(rows), chosen, rows))
    if not kept:
        raise DataError(f"all {len(rows)} rows are empty ({source}); it has nothing to train on" if not bad else
                        f"no row of {source} is left to train on: {len(bad)} were dropped as bad (--on_bad_rows skip) "
                        f"and {empty} were empty; the first bad one, row {bad[0][0]}: {bad[0][1]}")
    how = "forced by dataset_format" if dataset_format != "auto" else "detected from the columns"
    report = CleanReport(rows_in=len(rows), rows_kept=len(kept), empty_dropped=empty, format=chosen, skipped=bad)
    report.notes.append(f"{len(rows):,} rows in {label} format ({how}"
                        + (f"; ignored columns: {', '.join(ignored)})" if ignored else ")"))
    if empty:
        report.notes.append(f"dropped {empty} empty row(s)")
    if bad:
        report.notes.append(format_dropped("that cannot be trained on as they are (--on_bad_rows skip)", bad, len(rows)))
    column = "text" if chosen == "text" else "messages"
    return Dataset.from_dict({column: kept, SOURCE_ROW: sources}), report


# ---------------------------------------------------------------------------- tokenizing

def tokenize_text(text: str, tokenizer, max_length: int, answers_only: bool) -> dict:
    """input_ids and labels for one cleaned Llama-2 text row (labels -100 where no loss is taken).

    Exactly one BOS at the start; the row ends with EOS (added if the text lacks </s>), and that
    EOS carries a label so the model learns to stop (chat_format.encode_training_text).
    """
    return encode_training_text(tokenizer, TrainingText(text, answer_spans(text)), max_length, answers_only)


def _first_label(labels: list[int]) -> int:
    return next((i for i, label in enumerate(labels) if label != -100), len(labels))


def _suggest_max_length(prompt_lengths: list[int]) -> int:
    """A max_seq_length that keeps at least the start of every answer: the longest prompt + 1, rounded up to 64."""
    return -(-(max(prompt_lengths) + 1) // 64) * 64


def tokenize_dataset(dataset, tokenizer, max_length: int, answers_only: bool):
    """(tokenized rows, truncated): truncated lists (row, why) for each row whose answer max_length cut away.

    Rows come from clean_dataset (text or messages); each renders to one training row, or more
    where a chat template writes an earlier turn differently from the last (chat_format).
    """
    from datasets import Dataset

    style = chat_style(tokenizer)
    sources = dataset[SOURCE_ROW] if SOURCE_ROW in dataset.column_names else range(len(dataset))
    usable, truncated, prompt_lengths = [], [], []
    for source, row in zip(sources, dataset.select_columns([c for c in ("text", "messages") if c in dataset.column_names])):
        try:
            rendered = training_rows(row, tokenizer, style)
        except ConversationError as exc:
            raise DataError(f"row {source}: {exc}") from None
        for encoded in (encode_training_text(tokenizer, r, None, answers_only, style) for r in rendered):
            first = _first_label(encoded["labels"])
            prompt_lengths.append(first)
            if first < max_length:
                usable.append({key: values[:max_length] for key, values in encoded.items()})
            else:
                truncated.append((source, f"its answer starts at token {first}"))
    if not usable:
        raise DataError(
            f"max_seq_length={max_length} leaves no answer token in any row (the shortest prompt alone is "
            f"{min(prompt_lengths)} tokens, the longest {max(prompt_lengths)}); raise it: "
            f"--max_seq_length {_suggest_max_length(prompt_lengths)} keeps the start of every answer"
        )
    tokenized = Dataset.from_dict({
        "input_ids": [row["input_ids"] for row in usable],
        "labels": [row["labels"] for row in usable],
    })
    return tokenized, truncated


def split_train_eval(dataset, eval_fraction: float, seed: int):
    """(train, eval or None): a fixed, seeded held-out share of the rows."""
    if eval_fraction <= 0:
        return dataset, None
    n_eval = max(1, round(len(dataset) * eval_fraction))
    if n_eval >= len(dataset):
        raise DataError(f"eval_fraction={eval_fraction} leaves no training rows out of {len(dataset)}; lower it")
    parts = dataset.train_test_split(test_size=n_eval, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


def load_clean(name: str, field_name: str, cfg, tokenizer, printer=print):
    """The rows of one configured source (dataset_name or eval_dataset), checked, with its report printed."""
    dataset, report = clean_dataset(load_raw_dataset(name, cfg.dataset_split, field_name), cfg.dataset_format,
                                    cfg.on_bad_rows, tokenizer, source=f"{field_name} {name!r}")
    prefix = "data" if field_name == "dataset_name" else "held-out data"
    for note in report.notes:
        printer(f"{prefix}: {note}")
    return dataset


def prepare_datasets(cfg, tokenizer, printer=print):
    """(train_rows, eval_rows or None) tokenized from the configured source(s), with a report printed."""
    try:
        style = chat_style(tokenizer)
    except ChatFormatError as exc:
        raise DataError(f"the tokenizer of {cfg.model_name!r}: {exc}") from None
    printer(f"chat format: {style.reason}; pad token {tokenizer.pad_token} (never an end token, so every end keeps its label)")
    dataset = load_clean(cfg.dataset_name, "dataset_name", cfg, tokenizer, printer)
    if cfg.eval_dataset:
        train, held_out = dataset, load_clean(cfg.eval_dataset, "eval_dataset", cfg, tokenizer, printer)
    else:
        train, held_out = split_train_eval(dataset, cfg.eval_fraction, cfg.seed)
    answers_only = cfg.train_on_answers_only
    train_rows, truncated = tokenize_dataset(train, tokenizer, cfg.max_seq_length, answers_only)
    eval_rows = None
    if held_out is not None:
        eval_rows, eval_truncated = tokenize_dataset(held_out, tokenizer, cfg.max_seq_length, answers_only)
        truncated = sorted(truncated + eval_truncated)
    if truncated:
        printer("data: " + format_dropped(f"whose answer starts beyond max_seq_length={cfg.max_seq_length}",
                                          truncated, len(train) + (len(held_out) if held_out is not None else 0)))
    printer(f"data: {len(train_rows)} training rows" + (f", {len(eval_rows)} held-out rows" if eval_rows is not None else ""))
    return train_rows, eval_rows
