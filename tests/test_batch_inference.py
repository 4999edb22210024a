"""batch_inference.py: every good line answered (as it is alone), bad lines named, interrupted runs resume."""

import json
from types import SimpleNamespace

import pytest

import batch_inference
from batch_inference import run_batch
from inference import GenerationSettings, InferenceError, answer, generate_batch, load_for_inference

SETTINGS = GenerationSettings(max_new_tokens=24)
PROMPTS = ["What is the chemical symbol for gold?", "How many continents are there on Earth?", "Hi",
           "What is a large language model?", "Explain in a few words, please, what a prime number is.",
           "Who wrote Hamlet?", "What is the boiling point of water?"]


@pytest.fixture(scope="module")
def trained(tiny_run):
    adapter = tiny_run[0] / "tiny-llama-finetune"
    model, tokenizer, _, _ = load_for_inference(adapter, dequantize="no", compile_="no")
    return model, tokenizer, adapter


def write_input(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines), encoding="utf-8")
    return path


def batch(trained, input_path, output, batch_size=3, settings=SETTINGS):
    model, tokenizer, adapter = trained
    notes = []
    code = run_batch(model, tokenizer, settings, None, input_path, output,
                     SimpleNamespace(adapter=str(adapter), batch_size=batch_size, base="", no_4bit=False), say=notes.append)
    return code, notes


def records(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_every_good_line_is_answered_as_alone_and_bad_lines_are_named(trained, tmp_path):
    model, tokenizer, _ = trained
    lines = [{"prompt": PROMPTS[0], "id": "a"}, "{not json", {"prompt": PROMPTS[1], "max_new_tokens": 5},
             {"question": "no prompt"}, {"prompt": PROMPTS[2], "system": "Be brief."}, {"prompt": "gold " * 1100},
             {"prompt": PROMPTS[3], "max_new_tokens": 0}, {"prompt": PROMPTS[4]}]
    code, notes = batch(trained, write_input(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl")
    assert code == 2
    text = "\n".join(notes)
    assert "line 2: not valid JSON" in text and "line 4: no 'prompt' text" in text
    assert "line 6: the prompt is" in text and "more than the model's context" in text
    assert "line 7: max_new_tokens=0 must be a whole number >= 1" in text
    got = records(tmp_path / "out.jsonl")
    assert [r["line"] for r in got] == [1, 3, 5, 8]  # input order, every good line
    assert got[0]["id"] == "a" and got[2]["system"] == "Be brief."
    assert got[1]["tokens"] == 5 and got[1]["stop_reason"] == "length"
    for record in got:  # each as answered alone, with its own system prompt and limit
        settings = GenerationSettings(max_new_tokens=record.get("max_new_tokens", 24), system_prompt=record.get("system", ""))
        alone = answer(model, tokenizer, record["prompt"], settings)
        assert (record["answer"], record["tokens"], record["stop_reason"]) == (alone.text, alone.tokens, alone.stop_reason)


def test_interrupted_run_resumes_where_it_stopped(trained, tmp_path, monkeypatch):
    source = write_input(tmp_path / "in.jsonl", [{"prompt": p} for p in PROMPTS])
    assert batch(trained, source, tmp_path / "straight.jsonl")[0] == 0
    expected = records(tmp_path / "straight.jsonl")

    real_answer_many = batch_inference.answer_many

    def interrupted_after_one_batch(*args, progress, **kwargs):
        def then_stop(indices, answers):
            progress(indices, answers)
            raise KeyboardInterrupt
        return real_answer_many(*args, progress=then_stop, **kwargs)

    monkeypatch.setattr(batch_inference, "answer_many", interrupted_after_one_batch)
    output = tmp_path / "out.jsonl"
    code, notes = batch(trained, source, output)
    assert code == 130 and "3 of 7 lines are answered" in notes[-1]
    assert len(records(output)) == 3
    with open(output, "a", encoding="utf-8") as f:
        f.write('{"prompt": "Who wrote Ham')  # a line half-written when the process was killed

    monkeypatch.setattr(batch_inference, "answer_many", real_answer_many)
    generated = []
    model = trained[0]
    real_generate = model.generate
    monkeypatch.setattr(model, "generate", lambda *a, **k: generated.append(len(k["input_ids"])) or real_generate(*a, **k))
    code, notes = batch(trained, source, output)
    assert code == 0 and sum(generated) == 4  # only the 4 lines not answered before
    assert "3 already answered" in notes[0]
    assert records(output) == expected


def test_a_finished_run_does_nothing_again(trained, tmp_path):
    source = write_input(tmp_path / "in.jsonl", [{"prompt": p} for p in PROMPTS[:2]])
    batch(trained, source, tmp_path / "out.jsonl")
    before = (tmp_path / "out.jsonl").read_text()
    code, notes = batch(trained, source, tmp_path / "out.jsonl")
    assert code == 0 and "2 already answered" in notes[0] and "0 to answer" in notes[0]
    assert (tmp_path / "out.jsonl").read_text() == before


def test_resuming_with_other_settings_is_refused(trained, tmp_path):
    source = write_input(tmp_path / "in.jsonl", [{"prompt": p} for p in PROMPTS[:2]])
    batch(trained, source, tmp_path / "out.jsonl")
    before = (tmp_path / "out.jsonl").read_text()
    with pytest.raises(InferenceError, match=r"holds answers of another run \(settings: .*max_new_tokens"):
        batch(trained, source, tmp_path / "out.jsonl", settings=GenerationSettings(max_new_tokens=8))
    assert (tmp_path / "out.jsonl").read_text() == before


def test_an_output_not_written_by_a_batch_run_is_refused(trained, tmp_path):
    source = write_input(tmp_path / "in.jsonl", [{"prompt": "Hi"}])
    (tmp_path / "notes.jsonl").write_text("mine\n")
    with pytest.raises(InferenceError, match=r"was not written by a batch run"):
        batch(trained, source, tmp_path / "notes.jsonl")
    assert (tmp_path / "notes.jsonl").read_text() == "mine\n"


def test_training_data_is_answered_with_references_beside(trained, tmp_path):
    model, tokenizer, _ = trained
    rows = [{"text": "<s>[INST] What is the chemical symbol for gold? [/INST] Au. </s>"},
            {"text": "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWho painted the Mona Lisa? [/INST] Leonardo. </s>"
                     "<s>[INST] Where is it now? [/INST] In the Louvre. </s>"},
            {"text": "no chat format here"}]
    code, notes = batch(trained, write_input(tmp_path / "data.jsonl", rows), tmp_path / "out.jsonl")
    assert code == 2 and "line 3: not in the Llama-2 chat format" in "\n".join(notes)
    first, second = records(tmp_path / "out.jsonl")
    assert (first["prompt"], first["reference"]) == ("What is the chemical symbol for gold?", "Au.")
    assert (second["prompt"], second["reference"], second["system"]) == ("Where is it now?", "In the Louvre.", "Be brief.")
    assert second["history"] == [{"role": "user", "content": "Who painted the Mona Lisa?"},
                                 {"role": "assistant", "content": "Leonardo."}]
    messages = [{"role": "system", "content": "Be brief."}, *second["history"], {"role": "user", "content": "Where is it now?"}]
    from chat_format import prompt_ids

    alone = generate_batch(model, tokenizer, [prompt_ids(tokenizer, messages)], SETTINGS)[0]
    assert second["answer"] == alone.text


def test_training_data_in_a_conversational_format_is_answered_too(trained, tmp_path):
    """--input takes every training format: a 'messages' file is answered like its Llama-2 text twin."""
    messages = [{"role": "user", "content": "What is the chemical symbol for gold?"}, {"role": "assistant", "content": "Au."}]
    code, _ = batch(trained, write_input(tmp_path / "msgs.jsonl", [{"messages": messages}]), tmp_path / "out.jsonl")
    (record,) = records(tmp_path / "out.jsonl")
    code_text, _ = batch(trained, write_input(tmp_path / "text.jsonl",
                                              [{"text": "<s>[INST] What is the chemical symbol for gold? [/INST] Au. </s>"}]),
                         tmp_path / "out-text.jsonl")
    (twin,) = records(tmp_path / "out-text.jsonl")
    assert code == code_text == 0 and record["reference"] == "Au." and record["answer"] == twin["answer"]


def test_an_edited_or_removed_input_line_is_answered_again_not_paired_with_a_stale_answer(trained, tmp_path):
    prompts = write_input(tmp_path / "p.jsonl", [{"prompt": p} for p in PROMPTS[:4]])
    assert batch(trained, prompts, tmp_path / "a.jsonl")[0] == 0
    write_input(prompts, [{"prompt": p} for p in [PROMPTS[0], PROMPTS[2], PROMPTS[5]]])  # line 2 removed, 3 new
    code, notes = batch(trained, prompts, tmp_path / "a.jsonl")
    got = records(tmp_path / "a.jsonl")
    assert code == 0 and [r["prompt"] for r in got] == [PROMPTS[0], PROMPTS[2], PROMPTS[5]]
    assert any("3 earlier answer(s) no longer match their input line" in n for n in notes)
    one_shot = tmp_path / "fresh.jsonl"
    batch(trained, prompts, one_shot)
    assert [r["answer"] for r in got] == [r["answer"] for r in records(one_shot)]


def test_a_retrained_adapter_is_another_run(trained, tmp_path):
    import os
    import shutil

    model, tokenizer, adapter = trained
    copy = tmp_path / "adapter"
    shutil.copytree(adapter, copy)
    prompts = write_input(tmp_path / "p.jsonl", [{"prompt": PROMPTS[0]}])
    args = SimpleNamespace(adapter=str(copy), batch_size=2, base="", no_4bit=False)
    assert run_batch(model, tokenizer, SETTINGS, None, prompts, tmp_path / "a.jsonl", args, say=lambda _: None) == 0
    weights = copy / "adapter_model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # rewritten in place
    with pytest.raises(InferenceError, match="holds answers of another run.*adapter_weights"):
        run_batch(model, tokenizer, SETTINGS, None, prompts, tmp_path / "a.jsonl", args, say=lambda _: None)
    with pytest.raises(InferenceError, match="no_4bit"):
        run_batch(model, tokenizer, SETTINGS, None, prompts, tmp_path / "a.jsonl",
                  SimpleNamespace(adapter=str(copy), batch_size=2, base="", no_4bit=True), say=lambda _: None)


def test_a_second_run_on_the_same_output_is_refused_while_the_first_runs(trained, tmp_path, monkeypatch):
    prompts = write_input(tmp_path / "p.jsonl", [{"prompt": PROMPTS[0]}])
    output = tmp_path / "a.jsonl"
    seen = {}
    real = batch_inference.answer_file

    def second_run_meanwhile(*args, **kwargs):
        with pytest.raises(InferenceError, match=r"another batch run \(pid \d+ on .*\) is writing"):
            with batch_inference.output_held(output):
                pass
        seen["refused"] = True
        return real(*args, **kwargs)

    monkeypatch.setattr(batch_inference, "answer_file", second_run_meanwhile)
    assert batch(trained, prompts, output)[0] == 0 and seen["refused"]
    with batch_inference.output_held(output):  # released at the end
        pass


def test_outputs_that_cannot_be_written_and_a_damaged_state_file_are_clear_errors(trained, tmp_path):
    prompts = write_input(tmp_path / "p.jsonl", [{"prompt": PROMPTS[0]}])
    (tmp_path / "file").write_text("x")
    for output, said in ((tmp_path / "file" / "a.jsonl", "cannot write --output"),
                         (tmp_path, "is not a regular file")):
        with pytest.raises(InferenceError, match=said):
            batch(trained, prompts, output)
    assert batch(trained, prompts, tmp_path / "a.jsonl")[0] == 0
    (tmp_path / "a.jsonl.run.json").write_text("garbage{")
    with pytest.raises(InferenceError, match="is damaged"):
        batch(trained, prompts, tmp_path / "a.jsonl")
    assert len(records(tmp_path / "a.jsonl")) == 1  # nothing lost


def test_line_separators_inside_json_strings_do_not_split_lines(trained, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "Hi\u2028there"}, ensure_ascii=False) + "\n"
                       + json.dumps({"prompt": "Who\x85 wrote Hamlet?"}, ensure_ascii=False) + "\n", encoding="utf-8")
    code, notes = batch(trained, prompts, tmp_path / "a.jsonl")
    assert code == 0 and [r["line"] for r in records_by_newline(tmp_path / "a.jsonl")] == [1, 2]
    code, notes = batch(trained, prompts, tmp_path / "a.jsonl")
    assert any("2 already answered" in n and "0 to answer" in n for n in notes)


def records_by_newline(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line]


def test_fields_the_output_would_replace_and_runs_that_answer_nothing(trained, tmp_path):
    prompts = write_input(tmp_path / "p.jsonl", [{"prompt": PROMPTS[0], "answer": "MY REFERENCE"}])
    code, notes = batch(trained, prompts, tmp_path / "a.jsonl")
    assert code == 2 and any("'answer'" in n and "would be replaced" in n for n in notes)
    assert not (tmp_path / "a.jsonl").exists() and not (tmp_path / "a.jsonl.run.json").exists()
    write_input(prompts, [{"prompt": PROMPTS[0], "reference": "MY REFERENCE"}])  # fixed as advised: now answered
    assert batch(trained, prompts, tmp_path / "a.jsonl")[0] == 0
    assert records(tmp_path / "a.jsonl")[0]["reference"] == "MY REFERENCE"


def test_a_broken_line_costs_only_itself_in_every_json_lines_format(trained, tmp_path):
    """Training data with a line that is not JSON, and a prompts file whose first line misspells 'prompt'."""
    text = "<s>[INST] What is the chemical symbol for gold? [/INST] Au. </s>"
    data = write_input(tmp_path / "data.jsonl", [{"text": text}, '{"text": "cut sh', {"text": text}])
    code, notes = batch(trained, data, tmp_path / "out.jsonl")
    assert code == 2 and "line 2: not valid JSON" in "\n".join(notes)
    assert [(r["line"], r["reference"]) for r in records(tmp_path / "out.jsonl")] == [(1, "Au."), (3, "Au.")]
    prompts = write_input(tmp_path / "p.jsonl", [{"promt": "typo"}, {"prompt": PROMPTS[0]}, "{broken"])
    code, notes = batch(trained, prompts, tmp_path / "a.jsonl")
    assert code == 2 and "line 1: no 'prompt' text" in "\n".join(notes) and "line 3: not valid JSON" in "\n".join(notes)
    (answered,) = records(tmp_path / "a.jsonl")
    assert answered["line"] == 2 and set(answered) == {"prompt", "line", "answer", "tokens", "stop_reason"}  # no null fields
