"""How a conversation becomes tokens: one definition, shared by training and inference.

A conversation is a list of messages `{"role": "system" | "user" | "assistant", "content": str}`:
an optional system message first, then user and assistant turns in alternation.

    ids = prompt_ids(tokenizer, messages)     # ends with a user turn: the tokens the answer follows
    stops = stop_token_ids(tokenizer)         # generation ends at any of these
    rows = training_texts(tokenizer, messages)          # ends with an answer: text + answer spans
    encoded = encode_training_text(tokenizer, rows[0], max_length=256, answers_only=True)

Which format a tokenizer speaks is decided once, by `chat_style`:
- a tokenizer with no chat template (the tiny model, the Llama-2 tokenizer) or with Llama-2's
  template is written in the Llama-2 format of mlabonne/guanaco-llama2-1k
  (`<s>[INST] <<SYS>>...<</SYS>> question [/INST] answer</s><s>[INST] ...`), exactly as the seed's
  rows, token for token;
- any other tokenizer (Llama-3.x, Qwen3, Gemma-3, Mistral, ...) is written by its own chat template.

For a template, where each answer lies is not guessed from the text: the conversation is rendered
again with that answer replaced by a marker, and the text before and after the marker gives the
answer's exact place. Its span runs to the end-of-turn token (`<|eot_id|>`, `<|im_end|>`,
`<end_of_turn>`), which carries a label so that the model learns to stop. The inference prompt is
rendered the same way, with the marker as the answer to come, so it is by construction the text
that training put before that answer. Where a template writes an earlier turn differently from how
it writes the last one (Qwen3 drops the empty `<think>` block from past answers), that turn is
trained in a row of its own that ends with it, so every answer is learnt after exactly the prompt
that inference gives.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ROLES = ("system", "user", "assistant")
INST_OPEN, INST_CLOSE = "[INST]", "[/INST]"
LLAMA2_BOS, LLAMA2_EOS = "<s>", "</s>"
# Stands in for an answer when a template is rendered to find where that answer goes; plain
# letters, so that no template trims, escapes or splits it.
ANSWER_MARKER = "ANSWERMARKERq7Zx"


class ConversationError(ValueError):
    """A conversation cannot be written in the model's chat format; the message says where."""


class ChatFormatError(ValueError):
    """The tokenizer's chat format cannot be used for training; the message says why."""


@dataclass(frozen=True)
class ChatStyle:
    kind: str  # "llama2" (the seed's [INST] format) or "template" (the tokenizer's chat template)
    end_of_turn: str  # the token text that ends every answer and carries a label
    end_of_turn_id: int
    control_tokens: tuple[str, ...]  # texts the tokenizer reads as control tokens, never as words
    bos_id: int | None  # the BOS every row starts with exactly once (None: the format has none)
    reason: str  # one line a person reads: which format, and why

    @property
    def is_llama2(self) -> bool:
        return self.kind == "llama2"


@dataclass
class TrainingText:
    """A rendered conversation and the character spans that carry the loss (answers + end of turn)."""

    text: str
    spans: list[tuple[int, int]]


# ---------------------------------------------------------------------------- conversations

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
    for index, message in enumerate(messages):
        try:
            message["content"].encode("utf-8")
        except UnicodeEncodeError as exc:  # a lone surrogate: from undecodable bytes, or escaped in JSON
            raise ConversationError(f"message {index} ({message['role']}) holds {message['content'][exc.start]!r} at "
                                    f"character {exc.start}, which is not text (bytes that are not UTF-8?); "
                                    "remove it") from None
    if must_end_with_user and turns[-1]["role"] != "user":
        raise ConversationError("the conversation must end with a user message to be answered")


def check_training_conversation(messages: list[dict]) -> None:
    """A conversation to train on: the usual order, ending with an answer, no empty answer."""
    check_conversation(messages, must_end_with_user=False)
    if messages[-1]["role"] != "assistant":
        raise ConversationError(f"message {len(messages) - 1} (the last) is a user message with no answer after it")
    for index, message in enumerate(messages):
        if message["role"] == "assistant" and not message["content"].strip():
            raise ConversationError(f"message {index} is an empty answer")


# ---------------------------------------------------------------------------- the Llama-2 format

def format_prompt(question: str, system_prompt: str = "") -> str:
    """The Llama-2 chat prompt up to the answer, without BOS (the tokenizer adds it)."""
    if system_prompt:
        return f"{INST_OPEN} <<SYS>>\n{system_prompt}\n<</SYS>>\n\n{question.strip()} {INST_CLOSE}"
    return f"{INST_OPEN} {question.strip()} {INST_CLOSE}"


def llama2_text(messages: list[dict]) -> str:
    """The conversation in the guanaco Llama-2 format, without the leading BOS (the tokenizer adds it).

    Each finished answer ends with `</s>` directly (normalize_row drops the space guanaco writes
    before it), and each later turn starts with a literal `<s>`, as in the rows.
    """
    has_system = bool(messages) and messages[0]["role"] == "system"
    system = messages[0]["content"] if has_system else ""
    turns = messages[1:] if has_system else messages
    parts = []
    for start in range(0, len(turns), 2):
        prompt = format_prompt(turns[start]["content"], system if start == 0 else "")
        answer = turns[start + 1]["content"].strip() if start + 1 < len(turns) else None
        parts.append(prompt if answer is None else f"{prompt} {answer}{LLAMA2_EOS}")
    return LLAMA2_BOS.join(parts)


def normalize_row(text: str) -> str:
    """Drop the leading <s> (the tokenizer adds BOS) and the space before each </s>.

    guanaco writes "answer </s>": tokenized, that space becomes a lone '▁' token the model must
    learn to emit before it may stop. Without it, </s> follows the answer's last word directly.
    """
    text = text[len(LLAMA2_BOS):].lstrip() if text.startswith(LLAMA2_BOS) else text
    return re.sub(r"\s+</s>", LLAMA2_EOS, text)


def llama2_problem(text: str) -> str | None:
    """Why a row is not in the Llama-2 chat format (or would train on a silently changed target), or None.

    A `</s>` or `<s>` inside an answer would be tokenized as end or start of sequence there; an
    `[INST] ... [/INST]` inside an answer would be read as a new turn, and its text would drop out
    of the loss. Both are only allowed where a turn ends and the next one starts.
    """
    opens, closes = text.count(INST_OPEN), text.count(INST_CLOSE)
    if opens == 0 or closes == 0:
        return "no [INST] ... [/INST] pair"
    if opens != closes:
        return f"{opens} [INST] but {closes} [/INST]"
    if text.find(INST_OPEN) > text.find(INST_CLOSE):
        return "[/INST] comes before [INST]"
    if not text.rsplit(INST_CLOSE, 1)[1].replace(LLAMA2_EOS, "").strip():
        return "no answer after the last [/INST]"
    return _marker_inside_answer(text)


def _marker_inside_answer(text: str) -> str | None:
    """The first `</s>`, `<s>` or `[INST]` that does not sit between two turns, described."""
    def answer_number(at: int) -> int:
        return max(1, text.count(INST_CLOSE, 0, at))

    for match in re.finditer(re.escape(LLAMA2_EOS), text):
        if not re.match(r"\s*(<s>)?\s*(\[INST\]|$)", text[match.end():]):
            return (f"a literal </s> inside answer {answer_number(match.start())} would end it there "
                    "(the model would learn to stop mid-answer); remove or rewrite it")
    for match in re.finditer(re.escape(LLAMA2_BOS), text):
        if match.start() > 0 and not re.search(r"</s>\s*$", text[:match.start()]):
            return (f"a literal <s> inside answer {answer_number(match.start())} would be read as a start of "
                    "sequence; remove or rewrite it")
    for match in re.finditer(re.escape(INST_OPEN), text):
        before = text[:match.start()]
        if before.strip() not in ("", LLAMA2_BOS) and not re.search(r"</s>\s*(<s>)?\s*$", before):
            return (f"an [INST] inside answer {answer_number(match.start())} (not after its </s>) would be read "
                    "as a new question, and its text would drop out of the loss; remove or rewrite it")
    return None


def answer_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of every answer: from after each [/INST] to the end of its </s> (or the next turn)."""
    spans = []
    for match in re.finditer(re.escape(INST_CLOSE), text):
        start = match.end()
        next_turn = text.find(INST_OPEN, start)
        end = len(text) if next_turn == -1 else next_turn
        eos_at = text.find(LLAMA2_EOS, start, end)
        if eos_at != -1:
            end = eos_at + len(LLAMA2_EOS)
        spans.append((start, end))
    return spans


def llama2_messages(text: str) -> list[dict]:
    """The conversation written in a Llama-2 text row that llama2_problem accepts.

    llama2_text(llama2_messages(row)) == normalize_row(row) for rows written as guanaco writes them.
    """
    text = normalize_row(text.strip())
    messages = []
    for index, turn in enumerate(re.split(r"</s>\s*(?:<s>\s*)?(?=\[INST\])", text)):
        question, answer = turn.split(INST_CLOSE, 1)
        question = question.strip()
        question = question[len(INST_OPEN):] if question.startswith(INST_OPEN) else question
        system_match = re.match(r"\s*<<SYS>>\n?(.*?)\n?<</SYS>>\s*(.*)", question, flags=re.DOTALL) if index == 0 else None
        if system_match:
            messages.append({"role": "system", "content": system_match.group(1).strip()})
            question = system_match.group(2)
        messages.append({"role": "user", "content": question.strip()})
        messages.append({"role": "assistant", "content": re.sub(r"</s>\s*$", "", answer.strip()).strip()})
    return messages


# ---------------------------------------------------------------------------- which format a tokenizer speaks

def _template_of(tokenizer) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    return template or None


def _control_tokens(tokenizer) -> tuple[str, ...]:
    special = {token.content for token in getattr(tokenizer, "added_tokens_decoder", {}).values() if token.special}
    special.update(tokenizer.all_special_tokens)
    return tuple(sorted(special, key=len, reverse=True))


def chat_style(tokenizer) -> ChatStyle:
    """The chat format this tokenizer is trained and prompted in, and why (see the module docstring).

    Raises ChatFormatError for a tokenizer that has neither a chat template nor Llama-2's `</s>`,
    and for a template that ends answers with no special token (the model could not learn to stop).
    """
    template = _template_of(tokenizer)
    control = _control_tokens(tokenizer)
    if template is None or "<<SYS>>" in template:
        if tokenizer.eos_token != LLAMA2_EOS:
            raise ChatFormatError(
                f"the tokenizer has no chat template and its end token is {tokenizer.eos_token!r}, not Llama-2's "
                "'</s>', so neither format fits; use the chat (instruct) version of the model, or give the "
                "tokenizer a chat template (tokenizer.chat_template) before fine-tuning")
        why = "the tokenizer has no chat template" if template is None else "its chat template is Llama-2's"
        return ChatStyle("llama2", LLAMA2_EOS, tokenizer.eos_token_id, control, tokenizer.bos_token_id,
                         f"Llama-2 [INST] format, answers end with </s> ({why}; the seed's format, token for token)")
    rendered = _render(tokenizer, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ANSWER_MARKER}])
    after = rendered.split(ANSWER_MARKER, 1)[1] if ANSWER_MARKER in rendered else ""
    end = next((token for token in control if after.startswith(token)), None)
    if end is None:
        raise ChatFormatError(
            f"the tokenizer's chat template writes {after[:40]!r} after an answer, not a special end-of-turn token, "
            "so the model could not learn where an answer ends; use a chat (instruct) tokenizer")
    # A BOS is kept (once) where the tokenizer itself would start a text with it.
    bos = tokenizer.bos_token_id
    adds_bos = bos is not None and tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos]
    return ChatStyle("template", end, tokenizer.convert_tokens_to_ids(end), control, bos if adds_bos else None,
                     f"the tokenizer's chat template, answers end with {end}")


def stop_token_ids(tokenizer) -> list[int]:
    """The tokens that end an answer: the end-of-turn token, and EOS where that is another token."""
    style = chat_style(tokenizer)
    stops = [style.end_of_turn_id]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in stops:
        stops.append(tokenizer.eos_token_id)
    return stops


# ---------------------------------------------------------------------------- rendering

def _render(tokenizer, messages: list[dict]) -> str:
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False)
    except TemplateError as exc:  # templates refuse what they cannot write, e.g. a system role
        raise ConversationError(f"the model's chat template refuses this conversation: {exc}") from None


def _split_at_marker(tokenizer, messages: list[dict], index: int) -> tuple[str, str]:
    """(text before, text after) answer `index` in the rendering of `messages`."""
    probe = [dict(message) for message in messages]
    probe[index] = {"role": "assistant", "content": ANSWER_MARKER}
    rendered = _render(tokenizer, probe)
    if rendered.count(ANSWER_MARKER) != 1:
        raise ConversationError(f"the model's chat template does not write message {index} exactly once")
    before, after = rendered.split(ANSWER_MARKER)
    return before, after


def _answer_span(tokenizer, messages: list[dict], index: int, text: str, style: ChatStyle) -> tuple[int, int]:
    """The characters of answer `index` and its end-of-turn token in `text`, the rendering of `messages`."""
    before, after = _split_at_marker(tokenizer, messages, index)
    if not (text.startswith(before) and text.endswith(after) and len(before) + len(after) <= len(text)):
        raise ConversationError(f"the model's chat template rewrites message {index} (a <think> block, for example), "
                                "so its tokens cannot be found; remove that markup from the answer")
    if not after.startswith(style.end_of_turn):
        raise ConversationError(f"the model's chat template does not end message {index} with {style.end_of_turn}")
    return len(before), len(text) - len(after) + len(style.end_of_turn)


def prompt_text(tokenizer, messages: list[dict], style: ChatStyle | None = None) -> str:
    """The text of a conversation ending with a user turn, up to where the answer starts (BOS as rendered)."""
    check_conversation(messages, must_end_with_user=True)
    style = style or chat_style(tokenizer)
    if style.is_llama2:
        return llama2_text(messages)
    return _split_at_marker(tokenizer, [*messages, {"role": "assistant", "content": ""}], len(messages))[0]


def _control_token_problem(messages: list[dict], style: ChatStyle) -> str | None:
    pattern = re.compile("|".join(map(re.escape, style.control_tokens))) if style.control_tokens else None
    for index, message in enumerate(messages):
        found = pattern.search(message["content"]) if pattern else None
        if found:
            return (f"message {index} ({message['role']}) contains {found.group()!r}, which the tokenizer reads as "
                    "a control token, not as text (the model would learn to stop or switch turns there); remove it")
    return None


def training_texts(tokenizer, messages: list[dict], style: ChatStyle | None = None) -> list[TrainingText]:
    """The rows that train on a conversation ending with an answer: one, plus one per turn that the
    template writes differently as a past turn than as the last one (see the module docstring)."""
    check_training_conversation(messages)
    style = style or chat_style(tokenizer)
    problem = _control_token_problem(messages, style)
    if style.is_llama2:
        text = llama2_text(messages)
        problem = problem or llama2_problem(text)
        if problem:
            raise ConversationError(problem)
        return [TrainingText(text, answer_spans(text))]
    if problem:
        raise ConversationError(problem)
    text = _render(tokenizer, messages)
    answers = [i for i, message in enumerate(messages) if message["role"] == "assistant"]
    spans, own_rows = [], []
    for index in answers:
        start, end = _answer_span(tokenizer, messages, index, text, style)
        if index == answers[-1] or text[:start] == prompt_text(tokenizer, messages[:index], style):
            spans.append((start, end))
        else:
            turn = messages[:index + 1]
            turn_text = _render(tokenizer, turn)
            own_rows.append(TrainingText(turn_text, [_answer_span(tokenizer, turn, index, turn_text, style)]))
    return [TrainingText(text, spans), *own_rows]


# ---------------------------------------------------------------------------- tokens

def _token_ids(tokenizer, text: str, style: ChatStyle) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and character offsets of a rendered text, with exactly one BOS at the start.

    The Llama-2 text has no BOS and the tokenizer adds it; a chat template writes its own, so the
    tokenizer must not add a second one.
    """
    encoded = tokenizer(text, return_offsets_mapping=True, add_special_tokens=style.is_llama2)
    ids, offsets = list(encoded["input_ids"]), [tuple(o) for o in encoded["offset_mapping"]]
    bos = style.bos_id
    if bos is not None:
        if len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
            ids, offsets = ids[1:], offsets[1:]
        elif not ids or ids[0] != bos:
            ids, offsets = [bos] + ids, [(0, 0)] + offsets
    return ids, offsets


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a conversation that ends with a user turn, up to where the answer starts.

    Exactly the tokens that training put before that answer, with one BOS (encode_training_text).
    """
    style = chat_style(tokenizer)
    text = prompt_text(tokenizer, messages, style)
    problem = _control_token_problem(messages, style)  # training refused such rows: the model never saw them
    if problem:
        raise ConversationError(problem.replace(" (the model would learn to stop or switch turns there)",
                                                " (the model would read a turn end or a new turn there)"))
    return _token_ids(tokenizer, text, style)[0]


def _straddled_boundary(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> int | None:
    """A span edge that falls inside one token (the prompt and the answer would share it), or None."""
    edges = {edge for span in spans for edge in span}
    for start, end in offsets:
        for edge in edges:
            if start < edge < end:
                return edge
    return None


def encode_training_text(tokenizer, row: TrainingText, max_length: int, answers_only: bool,
                         style: ChatStyle | None = None) -> dict:
    """input_ids and labels of one rendered row (labels -100 where no loss is taken).

    Exactly one BOS at the start. A token carries a label when it starts inside an answer span, so
    each answer and its end-of-turn token are learnt, and nothing else. In the Llama-2 format the
    row ends with EOS (added if the text lacks </s>), and that EOS counts as part of the last answer.
    """
    style = style or chat_style(tokenizer)
    text, spans = row.text, list(row.spans)
    ids, offsets = _token_ids(tokenizer, text, style)
    if style.is_llama2:
        if ids[-1] != tokenizer.eos_token_id:
            ids.append(tokenizer.eos_token_id)
            offsets.append((len(text), len(text) + 1))  # counts as part of the last answer
        spans = spans or [(0, len(text) + 1)]
        spans[-1] = (spans[-1][0], max(spans[-1][1], len(text) + 1))
    else:
        edge = _straddled_boundary(offsets, spans)
        if edge is not None:
            raise ConversationError(f"one token spans the prompt and the answer at {text[max(0, edge - 20):edge + 20]!r}, "
                                    "so the answer cannot be cut from its prompt; strip the answer's leading whitespace")
    if answers_only:
        labels = [tok if end > start and any(s <= start < e for s, e in spans) else -100
                  for tok, (start, end) in zip(ids, offsets)]
    else:
        labels = list(ids)
        if style.bos_id is not None and labels[0] == style.bos_id:
            labels[0] = -100  # nothing predicts the first token
    return {"input_ids": ids[:max_length], "labels": labels[:max_length]}
