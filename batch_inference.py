"""Answer a file of prompts in batches: resumable, with a progress bar, bad lines reported by number.

    python inference.py --adapter DIR --input prompts.jsonl --output answers.jsonl
    python inference.py --adapter DIR --input data/sample.jsonl --output answers.jsonl   # training data

Input, either
- JSON lines, each `{"prompt": "...", "system": "..." (optional), "max_new_tokens": N (optional)}`;
  any other fields are copied to the output; or
- training data (a `text` column in the Llama-2 chat format, any file data_preparation loads): each
  row's last question is answered after its earlier turns, and the row's own answer is kept beside
  the model's as `reference`.

Output: one JSON line per input line, with the input's fields plus `line` (its number in the input),
`answer`, `tokens` (generated, the stop token included) and `stop_reason` ("stop": the model ended
its answer; "length": max_new_tokens did). Each batch's lines are appended as soon as it finishes,
so an interrupted run (Ctrl-C, a kill, a full disk) resumes when the same command runs again: lines
already answered are kept, unless their input line was edited or removed since (then it is answered
again). `OUTPUT.run.json` records the adapter (its weights' size and time too), the base and the
settings; resuming with other ones is refused. A second run on the same output while one is running
is refused (a lock on the hidden `.OUTPUT.lock` beside it). At the end the file is rewritten in input
order. Input fields named like the output's own (`answer`, `tokens`, ...) make the line bad: they
would be replaced.

A bad line (not JSON, no prompt, longer than the model's context, ...) is reported by its number
and skipped; every other line is answered. The exit status is then 2; fix the lines and run the same
command again to answer just those.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from inference import (Answer, DecodingPlan, GenerationSettings, InferenceError, answer_many, context_window, conversation,
                       prompt_of)
from staging import discard, staging_file

OUTPUT_FIELDS = ("line", "answer", "tokens", "stop_reason")
SHOWN_PROBLEMS = 20


@dataclass
class Row:
    line: int  # 1-based line (JSON lines) or row number (other training-data files)
    record: dict  # the fields copied to the output
    messages: list[dict] | None = None
    max_new_tokens: int = 0
    problem: str | None = None


# ---------------------------------------------------------------------------- reading the input

def prompt_line(line: int, text: str, settings: GenerationSettings) -> Row:
    """One line of a JSON-lines prompts file, or a Row naming its problem."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        return Row(line, {}, problem=f"not valid JSON ({exc.msg})")
    return prompt_row(line, record, settings)


def prompt_row(line: int, record, settings: GenerationSettings) -> Row:
    """One prompt record: {"prompt", "system"?, "max_new_tokens"?, ...}, or a Row naming its problem."""
    if not isinstance(record, dict):
        return Row(line, {}, problem='not a JSON object like {"prompt": "..."}')
    taken = [name for name in OUTPUT_FIELDS if name in record]
    if taken:  # copied through, the output's own field would replace it: a user's reference answer lost
        return Row(line, record, problem=f"its field(s) {', '.join(map(repr, taken))} would be replaced by the output's "
                                         "own; rename them (e.g. 'reference')")
    prompt, system = record.get("prompt"), record.get("system", settings.system_prompt)
    limit = record.get("max_new_tokens", settings.max_new_tokens)
    if not isinstance(prompt, str) or not prompt.strip():
        return Row(line, record, problem="no 'prompt' text")
    if not isinstance(system, str):
        return Row(line, record, problem="'system' must be text")
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        return Row(line, record, problem=f"max_new_tokens={limit!r} must be a whole number >= 1")
    return Row(line, record, conversation(prompt, system), limit)


def training_conversation(row: dict, dataset_format: str) -> list[dict]:
    """The messages of one row of training data, in any format data_preparation accepts.

    Raises ConversationError (with data_preparation's words) for a row training would refuse too.
    """
    from chat_format import ConversationError, llama2_messages, llama2_problem
    from data_preparation import row_conversation

    if dataset_format != "text":
        return row_conversation(row, dataset_format)
    text = row.get("text")
    if not isinstance(text, str) or not text.strip():
        raise ConversationError("empty 'text'")
    problem = llama2_problem(text.strip())
    if problem:
        raise ConversationError(f"not in the Llama-2 chat format: {problem}")
    return llama2_messages(text)


def training_row(line: int, row: dict, dataset_format: str, settings: GenerationSettings) -> Row:
    """A training-data row: answer its last question after its earlier turns; keep its answer as reference."""
    from chat_format import ConversationError

    try:
        messages = training_conversation(row, dataset_format)
    except ConversationError as exc:
        return Row(line, dict(row), problem=str(exc))
    except (KeyError, TypeError, AttributeError) as exc:  # a line of a JSON-lines file lacking its format's fields
        return Row(line, dict(row), problem=f"not a row of the file's format ({dataset_format}): {type(exc).__name__} {exc}")
    *asked, last = messages
    record = {"prompt": asked[-1]["content"], "reference": last["content"]}
    if asked[0]["role"] == "system":
        record["system"] = asked[0]["content"]
    earlier = [m for m in asked[:-1] if m["role"] != "system"]
    if earlier:
        record["history"] = earlier
    return Row(line, record, asked, settings.max_new_tokens)


def read_rows(path: Path, settings: GenerationSettings) -> list[Row]:
    """Every row of the input, good or bad; raises InferenceError only when the file cannot be read at all."""
    if not path.is_file() and not path.is_dir():
        raise InferenceError(f"--input {str(path)!r} does not exist")
    if path.suffix.lower() == ".jsonl":
        try:  # "\n" only: str.splitlines also splits at U+2028 and U+0085, which JSON strings may hold
            lines = [text.removesuffix("\r") for text in path.read_text(encoding="utf-8").split("\n")]
        except (OSError, UnicodeDecodeError) as exc:
            raise InferenceError(f"cannot read --input {path}: {exc}") from None
        return json_lines_rows(path, [(n, t) for n, t in enumerate(lines, start=1) if t.strip()], settings)
    from data_preparation import DataError, detect_format, load_raw_dataset

    dataset = load_raw_dataset(str(path))
    columns = dataset.column_names
    if "prompt" in columns and "completion" not in columns:
        return [prompt_row(n, record, settings) for n, record in enumerate(dataset.to_list(), start=1)]
    try:
        dataset_format = detect_format(columns)[0]
    except DataError:
        raise InferenceError(f"{path}: its columns {columns} are neither prompts (a 'prompt' column) nor training data "
                             '(see README, "Your own data"); give JSON lines like {"prompt": "..."}') from None
    return [training_row(n, row, dataset_format, settings) for n, row in enumerate(dataset.to_list(), start=1)]


def json_lines_rows(path: Path, lines: list[tuple[int, str]], settings: GenerationSettings) -> list[Row]:
    """A JSON-lines file, line by line: a line that is not JSON is one bad row, never the whole file's loss.

    It is a prompts file when any line has a 'prompt' without a 'completion' (or no line is an object);
    else training data, in the one format the keys of all its lines match together.
    """
    from data_preparation import DataError, detect_format

    records = {n: json.loads(text) for n, text in lines if is_json(text)}
    objects = [r for r in records.values() if isinstance(r, dict)]
    if not objects or any("prompt" in r and "completion" not in r for r in objects):
        return [prompt_line(n, text, settings) for n, text in lines]
    columns = sorted(set().union(*objects))
    try:
        dataset_format = detect_format(columns)[0]
    except DataError:
        raise InferenceError(f"{path}: its keys {columns} are neither prompts (a 'prompt' key) nor training data "
                             '(see README, "Your own data"); give JSON lines like {"prompt": "..."}') from None
    return [training_row(n, records[n], dataset_format, settings) if isinstance(records.get(n), dict)
            else prompt_line(n, text, settings)  # names the problem: not JSON, or not an object
            for n, text in lines]


def is_json(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except json.JSONDecodeError:
        return False


# ---------------------------------------------------------------------------- the output and resuming

def run_record(args, input_path: Path, settings: GenerationSettings) -> dict:
    """What makes two runs' answers comparable: the adapter (its weights too: retrained in place is another
    adapter), the base as loaded, the input file and the generation settings."""
    weights = Path(args.adapter) / "adapter_model.safetensors"
    stat = weights.stat()
    return {"adapter": str(Path(args.adapter).resolve()), "adapter_weights": [stat.st_size, stat.st_mtime_ns],
            "base": args.base or "", "no_4bit": bool(args.no_4bit), "input": str(input_path.resolve()),
            "settings": dataclasses.asdict(settings)}


def answered_lines(output: Path, expected_run: dict) -> dict[int, dict]:
    """The lines an earlier run of the same job already answered ({} for a new output).

    Raises InferenceError when the output belongs to something else, or to other settings.
    """
    state = output.with_name(output.name + ".run.json")
    if not output.exists():
        return {}
    if not state.is_file():
        raise InferenceError(f"{output} already exists and was not written by a batch run (no {state.name}); "
                             "choose another --output (nothing was changed)")
    try:
        previous = json.loads(state.read_text(encoding="utf-8"))
        assert isinstance(previous, dict)
    except (ValueError, UnicodeDecodeError, AssertionError):
        raise InferenceError(f"{state} is damaged (not the JSON a batch run writes), so {output} cannot be resumed "
                             "safely; choose another --output, or delete both files to start over") from None
    done = {}
    for text in output.read_text(encoding="utf-8").split("\n"):
        record = json.loads(text) if is_json(text) else None  # a last line cut by a kill is not JSON
        if isinstance(record, dict) and "answer" in record and isinstance(record.get("line"), int):
            done[record["line"]] = record
    changed = [key for key in expected_run if previous.get(key) != expected_run[key]]
    if changed and done:  # an output with no answer yet takes the new settings
        detail = ", ".join(f"{k}: {previous.get(k)!r} then, {expected_run[k]!r} now" for k in changed)
        raise InferenceError(f"{output} holds answers of another run ({detail}); to resume it use the same "
                             "adapter, input and settings, or choose another --output")
    return done


def still_valid(done: dict[int, dict], rows: list[Row]) -> tuple[dict[int, dict], int]:
    """(answers whose input line is unchanged, how many were dropped): a line edited or deleted since the
    earlier run is answered again, so the output is always that of one run on the input as it is now."""
    current = {row.line: row.record for row in rows if row.problem is None}
    kept = {line: record for line, record in done.items()
            if current.get(line) == {k: v for k, v in record.items() if k not in OUTPUT_FIELDS}}
    return kept, len(done) - len(kept)


@contextlib.contextmanager
def output_held(output: Path):
    """One batch run per output at a time (an exclusive lock on a hidden file beside it); the lock file's
    creation is also the check that --output can be written, made before any answer."""
    if output.is_dir() or (output.exists() and not output.is_file()):
        raise InferenceError(f"--output {str(output)!r} is not a regular file; give the path of a .jsonl file")
    lock_path = output.with_name(f".{output.name}.lock")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        handle = open(lock_path, "a+", encoding="utf-8")
    except OSError as exc:
        raise InferenceError(f"cannot write --output {str(output)!r} ({exc.strerror or exc}); choose a place you can "
                             "write to") from None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            raise InferenceError(f"another batch run ({handle.read().strip() or 'pid unknown'}) is writing {output}; "
                                 "wait for it to finish, or choose another --output") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
        handle.flush()
        yield
    finally:
        handle.close()  # releases the lock


def write_lines(path: Path, records: list[dict]) -> None:
    """Replace the file with these records, atomically (through a staging file of this process's own)."""
    staging = staging_file(path, "writing")
    try:
        staging.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        os.replace(staging, path)
    finally:
        discard(staging)


def output_record(row: Row, result: Answer) -> dict:
    return {**row.record, "line": row.line, "answer": result.text, "tokens": result.tokens, "stop_reason": result.stop_reason}


# ---------------------------------------------------------------------------- the run

def default_batch_size(requested: int, is_cuda: bool) -> tuple[int, str]:
    if requested:
        return requested, f"batch size {requested} (as asked)"
    size = 32 if is_cuda else 8
    return size, f"batch size {size} (auto: {'GPU' if is_cuda else 'CPU'}; --batch_size to change)"


def check_rows(rows: list[Row], tokenizer, window: int) -> None:
    """Mark rows whose prompt cannot be built or does not fit the context (the prompt tokenised once more)."""
    for row in rows:
        if row.problem is None:
            try:
                prompt_of(tokenizer, row.messages, row.max_new_tokens, window)
            except InferenceError as exc:
                row.problem = str(exc)


def report_problems(rows: list[Row], say) -> list[Row]:
    bad = [row for row in rows if row.problem]
    for row in bad[:SHOWN_PROBLEMS]:
        say(f"line {row.line}: {row.problem}")
    if len(bad) > SHOWN_PROBLEMS:
        say(f"... and {len(bad) - SHOWN_PROBLEMS} more bad lines")
    return bad


def run_batch(model, tokenizer, settings: GenerationSettings, plan: DecodingPlan | None, input_path: Path, output: Path,
              args, say=print) -> int:
    """Answer every good row not answered yet; returns the exit status (2 if any row was bad)."""
    with output_held(output):
        return answer_file(model, tokenizer, settings, plan, input_path, output, args, say)


def answer_file(model, tokenizer, settings: GenerationSettings, plan: DecodingPlan | None, input_path: Path,
                output: Path, args, say) -> int:
    from tqdm import tqdm

    rows = read_rows(input_path, settings)
    check_rows(rows, tokenizer, context_window(model))
    expected_run = run_record(args, input_path, settings)
    done, changed = still_valid(answered_lines(output, expected_run), rows)
    if changed:
        say(f"batch: {changed} earlier answer(s) no longer match their input line (edited or removed since): "
            "they are dropped and changed lines answered again")
    bad = report_problems(rows, say)
    todo = [row for row in rows if row.problem is None and row.line not in done]
    size, why = default_batch_size(args.batch_size, model.device.type == "cuda")
    say(f"batch: {len(rows)} lines in {input_path}: {len(done)} already answered in {output}, {len(todo)} to answer, "
        f"{len(bad)} bad; {why}")
    if not todo and not done:  # nothing to write: leave no output behind that a corrected rerun would meet
        say("nothing was answered; no output written")
        return 2 if bad else 0
    output.with_name(output.name + ".run.json").write_text(json.dumps(expected_run, indent=2), encoding="utf-8")
    write_lines(output, [done[line] for line in sorted(done)])  # drops a line half-written by a killed run
    start, tokens = time.perf_counter(), 0
    try:
        with open(output, "a", encoding="utf-8") as sink, tqdm(total=len(todo), unit="row", file=sys.stderr) as bar:
            def keep(indices: list[int], results: list[Answer]) -> None:
                nonlocal tokens
                for i, result in zip(indices, results):
                    done[todo[i].line] = output_record(todo[i], result)
                    sink.write(json.dumps(done[todo[i].line], ensure_ascii=False) + "\n")
                    tokens += result.tokens
                sink.flush()
                bar.update(len(indices))

            answer_many(model, tokenizer, [row.messages for row in todo], settings, plan, size,
                        [row.max_new_tokens for row in todo], progress=keep)
    except KeyboardInterrupt:
        say(f"\ninterrupted: {len(done)} of {len(rows) - len(bad)} lines are answered in {output}; "
            "run the same command again to answer the rest")
        return 130
    write_lines(output, [done[line] for line in sorted(done)])
    seconds = time.perf_counter() - start
    say(f"answered {len(todo)} lines in {seconds:.1f} s ({tokens / max(seconds, 1e-9):,.0f} new tokens/s); "
        f"{len(done)} answers in {output}")
    if bad:
        say(f"{len(bad)} bad line(s) were skipped (listed above): fix them and run the same command to answer them")
        return 2
    return 0
