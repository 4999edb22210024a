"""How a conversation becomes tokens: one definition, shared by training and inference.

A conversation is a list of messages `{"role": "system" | "user" | "assistant", "content": str}`:
an optional system message first, then user and assistant turns in alternation.

    ids = prompt_ids(tokenizer, messages)     # ends with a user turn: the tokens the answer follows
    stops = stop_token_ids(tokenizer)         # generation ends at any of these

Today every model is written in the Llama-2 chat format of mlabonne/guanaco-llama2-1k
(`<s>[INST] <<SYS>>...<</SYS>> question [/INST] answer</s><s>[INST] ...`), exactly as
data_preparation.py normalises the training rows, so the prompt at inference is token for token the
prefix that training saw, in every turn.
"""

from __future__ import annotations

from data_preparation import format_prompt

ROLES = ("system", "user", "assistant")


class ConversationError(ValueError):
    """A conversation is not system?, (user, assistant)*, [user]; the message says where."""


def check_conversation(messages: list[dict], must_end_with_user: bool) -> None:
    """Raise ConversationError unless the roles are in the one order every format accepts."""
    turns = messages[1:] if messages and messages[0].get("role") == "system" else messages
    if not turns:
        raise ConversationError("the conversation has no user message")
    for index, message in enumerate(turns):
        expected = "user" if index % 2 == 0 else "assistant"
        if message.get("role") != expected or not isinstance(message.get("content"), str):
            raise ConversationError(f"message {index + len(messages) - len(turns)}: expected a {expected} "
                                    f"message with text content, got {message!r:.80}")
    if must_end_with_user and turns[-1]["role"] != "user":
        raise ConversationError("the conversation must end with a user message to be answered")


def llama2_text(messages: list[dict]) -> str:
    """The conversation in the guanaco Llama-2 format, without the leading BOS (the tokenizer adds it).

    Each finished answer ends with `</s>` directly (data_preparation.normalize_row drops the space
    guanaco writes before it), and each later turn starts with a literal `<s>`, as in the rows.
    """
    has_system = bool(messages) and messages[0]["role"] == "system"
    system = messages[0]["content"] if has_system else ""
    turns = messages[1:] if has_system else messages
    parts = []
    for start in range(0, len(turns), 2):
        prompt = format_prompt(turns[start]["content"], system if start == 0 else "")
        answer = turns[start + 1]["content"].strip() if start + 1 < len(turns) else None
        parts.append(prompt if answer is None else f"{prompt} {answer}</s>")
    return "<s>".join(parts)


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a conversation that ends with a user turn, up to where the answer starts.

    Exactly one BOS at the start, as in training (data_preparation.tokenize_text).
    """
    check_conversation(messages, must_end_with_user=True)
    ids = list(tokenizer(llama2_text(messages), add_special_tokens=True)["input_ids"])
    bos = tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos):
        ids = [bos] + ids
    while bos is not None and len(ids) >= 2 and ids[1] == bos:
        ids = ids[1:]
    return ids


def stop_token_ids(tokenizer) -> list[int]:
    """The tokens that end an answer: EOS for the Llama-2 format."""
    return [tokenizer.eos_token_id]
