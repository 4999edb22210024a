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
                     SimpleNamespace(adapter=str(adapter), batch_size=batch_size), say=notes.append)
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
