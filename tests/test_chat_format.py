"""chat_format.py: a conversation's prompt is token for token the prefix that training saw."""

import pytest

import data_preparation as dp
from chat_format import ConversationError, prompt_ids, stop_token_ids
from model_setup import load_tokenizer

MULTI_TURN = ("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWho painted the Mona Lisa? [/INST] Leonardo da Vinci. </s>"
              "<s>[INST] Where is it now? [/INST] In the Louvre, in Paris. </s>")


@pytest.fixture
def tokenizer(make_config):
    return load_tokenizer(make_config())


def test_second_turn_prompt_is_the_training_prefix(tokenizer):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Who painted the Mona Lisa?"},
                {"role": "assistant", "content": "Leonardo da Vinci."},
                {"role": "user", "content": "Where is it now?"}]
    row = dp.tokenize_text(dp.normalize_row(MULTI_TURN), tokenizer, 512, answers_only=True)
    ids = prompt_ids(tokenizer, messages)
    assert ids == row["input_ids"][:len(ids)]
    # The next token is the first one of the answer, the first that carries a loss in this turn.
    assert row["labels"][len(ids) - 1] == -100 and row["labels"][len(ids)] != -100
    assert ids.count(tokenizer.bos_token_id) == 2  # one at the start, one opening the second turn, as in the row


def test_first_turn_prompt_has_one_bos(tokenizer):
    ids = prompt_ids(tokenizer, [{"role": "user", "content": "Hi"}])
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1


@pytest.mark.parametrize("messages", [
    [],
    [{"role": "assistant", "content": "Hello"}],
    [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
])
def test_malformed_conversations_are_refused(tokenizer, messages):
    with pytest.raises(ConversationError):
        prompt_ids(tokenizer, messages)


def test_llama2_stops_on_eos(tokenizer):
    assert stop_token_ids(tokenizer) == [tokenizer.eos_token_id]
