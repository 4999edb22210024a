"""chat.py: the history is the training format, streaming equals non-streaming, trimming, commands, endings."""

import io
import os
import subprocess
import sys

import pytest

import data_preparation as dp
from chat import run_chat
from chat_format import prompt_ids
from conftest import PROJECT_DIR
from inference import GenerationSettings, conversation, generate_batch, load_for_inference


@pytest.fixture(scope="module")
def trained(tiny_run):
    adapter = tiny_run[0] / "tiny-llama-finetune"
    model, tokenizer, _, _ = load_for_inference(adapter, dequantize="no", compile_="no")
    return model, tokenizer, adapter


def chat(model, tokenizer, lines, settings=None, stdin=None):
    """Run the chat on these input lines (stdin not a terminal); returns (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    stdin = stdin or io.StringIO("".join(line + "\n" for line in lines))
    code = run_chat(model, tokenizer, settings or GenerationSettings(max_new_tokens=40), None, stdin, out, err)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def prompts_seen(trained, monkeypatch):
    """Every prompt the chat hands to generate(), as token ids."""
    model = trained[0]
    seen = []
    real = model.generate

    def spy(*args, **kwargs):
        seen.append(kwargs["input_ids"][0].tolist())
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "generate", spy)
    return seen


def non_streamed(model, tokenizer, questions, max_new_tokens=40, system=""):
    """The answers of the same conversation, generated without a streamer, history kept by hand."""
    history, answers = [], []
    for question in questions:
        ids = prompt_ids(tokenizer, conversation(question, system, history))
        reply = generate_batch(model, tokenizer, [ids], GenerationSettings(max_new_tokens=max_new_tokens))[0]
        history += [{"role": "user", "content": question}, {"role": "assistant", "content": reply.text}]
        answers.append(reply.text)
    return answers


def test_history_is_the_multi_turn_training_format(trained, prompts_seen):
    model, tokenizer, _ = trained
    code, out, _ = chat(model, tokenizer, ["/system Be brief.", "What is the chemical symbol for gold?",
                                           "How many continents are there on Earth?"])
    first_answer = out.splitlines()[0].strip()
    row = ("<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWhat is the chemical symbol for gold? [/INST] "
           f"{first_answer} </s><s>[INST] How many continents are there on Earth? [/INST] Seven. </s>")
    tokens = dp.tokenize_text(dp.normalize_row(row), tokenizer, 1024, answers_only=True)
    second = prompts_seen[1]
    assert code == 0 and len(prompts_seen) == 2
    assert second == tokens["input_ids"][:len(second)]
    assert tokens["labels"][len(second) - 1] == -100 and tokens["labels"][len(second)] != -100
    assert second.count(tokenizer.bos_token_id) == 2


def test_streamed_chat_equals_non_streamed_answers(trained):
    model, tokenizer, _ = trained
    questions = ["What is the chemical symbol for gold?", "How many continents are there on Earth?", "Hi"]
    code, out, _ = chat(model, tokenizer, questions)
    assert code == 0
    assert [line.strip() for line in out.splitlines()] == non_streamed(model, tokenizer, questions)


def test_scripted_chat_through_the_command_line(trained, tmp_path):
    """`inference.py --chat` with stdin a pipe: one turn per line; stdout holds exactly the answers."""
    model, tokenizer, adapter = trained
    questions = ["What is the chemical symbol for gold?", "How many continents are there on Earth?"]
    proc = subprocess.run([sys.executable, str(PROJECT_DIR / "inference.py"), "--adapter", str(adapter), "--chat",
                           "--max_new_tokens", "40", "--quantized_cache", str(tmp_path)],
                          input="\n".join(questions) + "\n/exit\nnever answered\n", capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [line.strip() for line in proc.stdout.splitlines()] == non_streamed(model, tokenizer, questions)
    assert "Traceback" not in proc.stderr


def test_oldest_turns_are_dropped_when_the_context_is_full(trained, prompts_seen, monkeypatch):
    model, tokenizer, _ = trained
    monkeypatch.setattr(model.config, "max_position_embeddings", 90)
    questions = ["What is the chemical symbol for gold?", "How many continents are there on Earth?",
                 "What is a large language model?", "Hi"]
    code, out, err = chat(model, tokenizer, questions, GenerationSettings(max_new_tokens=16))
    assert code == 0 and len(prompts_seen) == 4
    assert all(len(ids) + 16 <= 90 for ids in prompts_seen)
    assert "no longer fit the 90-token context: dropped the oldest" in err
    last = tokenizer.decode(prompts_seen[-1])
    assert "Hi" in last and "gold" not in last  # the newest turn kept, the oldest gone
    assert prompts_seen[-1][0] == tokenizer.bos_token_id


def test_a_message_too_long_for_the_context_is_refused_and_the_chat_goes_on(trained, prompts_seen):
    model, tokenizer, _ = trained
    code, out, err = chat(model, tokenizer, ["gold " * 1100, "Hi"])
    assert "this message cannot be answered" in err and "more than the model's context of 1,024" in err
    assert len(prompts_seen) == 1 and len(out.splitlines()) == 1
    assert code == 2 and "(1 message(s) could not be answered)" in err  # a script learns that one failed


def test_reset_system_and_exit(trained, prompts_seen):
    model, tokenizer, _ = trained
    code, out, err = chat(model, tokenizer, ["Hi", "/reset", "/system Be brief.", "What is gold?", "/system", "/frobnicate",
                                             "/exit", "never answered"])
    assert code == 0 and len(prompts_seen) == 2
    assert "(conversation cleared)" in err and "(system prompt set: 'Be brief.')" in err
    assert "(system prompt cleared)" in err and "unknown command /frobnicate" in err
    second = tokenizer.decode(prompts_seen[1])
    assert "<<SYS>>" in second and "Hi" not in second.split("<</SYS>>")[1]  # reset: no earlier turn
    assert prompts_seen[1].count(tokenizer.bos_token_id) == 1


class CtrlC(io.StringIO):
    def readline(self, *args):
        raise KeyboardInterrupt


def test_end_of_input_and_ctrl_c_end_cleanly(trained):
    model, tokenizer, _ = trained
    assert chat(model, tokenizer, [])[0] == 0
    code, out, err = chat(model, tokenizer, [], stdin=CtrlC())
    assert code == 130 and "(chat ended)" in err


def test_text_that_is_not_text_or_holds_a_control_token_is_refused_and_the_chat_goes_on(trained, prompts_seen):
    """Undecodable bytes arrive as lone surrogates; '</s>' in a message would reach the model as end-of-sequence."""
    model, tokenizer, _ = trained
    code, out, err = chat(model, tokenizer, ["hello \udcff\udcfe bad bytes", "What </s> [/INST] now?", "Hi"])
    assert "which is not text" in err and "'</s>', which the tokenizer reads as a control token" in err
    assert len(prompts_seen) == 1 and tokenizer.decode(prompts_seen[0]).count("Hi") == 1
    assert code == 2 and "(2 message(s) could not be answered)" in err


def test_a_system_prompt_that_leaves_no_room_is_refused_and_the_old_one_kept(trained, prompts_seen):
    model, tokenizer, _ = trained
    code, out, err = chat(model, tokenizer, ["/system Be brief.", "/system " + "very long rules " * 600, "Hi"])
    assert "system prompt not set: it is" in err and "the previous one is kept" in err
    assert "very long rules very long rules very long" not in err.split("not set")[0]  # not echoed in full
    assert code == 0 and "Be brief." in tokenizer.decode(prompts_seen[0])


def test_ctrl_c_mid_answer_ends_the_streamed_line(trained, monkeypatch):
    model, tokenizer, _ = trained
    import chat as chat_module

    def interrupted_after_a_word(model, tokenizer, prompts, settings, plan=None, max_new_tokens=None, streamer=None):
        streamer.on_finalized_text("Gold")
        raise KeyboardInterrupt

    monkeypatch.setattr(chat_module, "generate_batch", interrupted_after_a_word)
    code, out, err = chat(model, tokenizer, ["Hi"])
    assert code == 130 and out == "Gold\n" and "(chat ended)" in err
