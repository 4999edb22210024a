"""Chat with a fine-tune in the terminal: multi-turn, streamed, in the format training used.

    python inference.py --adapter results/Llama-2-7b-chat-finetune --chat
    printf 'Who painted the Mona Lisa?\\nWhere is it now?\\n' | python inference.py --adapter DIR --chat

Commands: /reset forgets the conversation, /system TEXT sets the system prompt (/system alone clears
it), /exit ends (so do Ctrl-D and Ctrl-C). With standard input not a terminal, each line is one user
turn, answers go to stdout one after another, and notes to stderr: a script can drive it.

The whole conversation is rebuilt by chat_format.prompt_ids at every turn, so the model sees
exactly the multi-turn rows it was trained on. When it would no longer fit the model's context
(prompt + max_new_tokens), the oldest turns are dropped, and the chat says how many.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from chat_format import ConversationError
from inference import (Answer, DecodingPlan, GenerationSettings, InferenceError, context_window, conversation, fit_problem,
                       generate_batch)

HELP = "commands: /reset (forget the conversation), /system TEXT (set the system prompt), /exit"


@dataclass
class ChatSession:
    """The conversation so far, and how it becomes a prompt that fits the window."""

    tokenizer: object
    window: int
    settings: GenerationSettings
    history: list[dict] = field(default_factory=list)  # user and assistant messages, oldest first

    @property
    def system(self) -> str:
        return self.settings.system_prompt

    def prompt(self, question: str) -> tuple[list[int], int]:
        """(prompt ids, turns dropped): the conversation plus `question`, trimmed from the oldest turn.

        Raises InferenceError when the question alone (with the system prompt) does not fit.
        """
        from chat_format import prompt_ids

        for dropped in range(len(self.history) // 2 + 1):
            try:
                ids = prompt_ids(self.tokenizer, conversation(question, self.system, self.history[2 * dropped:]))
            except ConversationError as exc:  # text that is not text, or a control token in the message
                raise InferenceError(f"this message cannot be answered: {exc}") from None
            if fit_problem(len(ids), self.settings.max_new_tokens, self.window) is None:
                self.history = self.history[2 * dropped:]
                return ids, dropped
        because = " (the system prompt takes part of it: /system alone clears it)" if self.system else ""
        raise InferenceError(f"this message cannot be answered: "
                             f"{fit_problem(len(ids), self.settings.max_new_tokens, self.window)}{because}")

    def set_system(self, text: str) -> str:
        """Set (or, empty, clear) the system prompt, unless it leaves no room for a message and its answer."""
        from chat_format import prompt_ids

        if not text:
            self.settings.system_prompt = ""
            return "(system prompt cleared)"
        try:
            ids = prompt_ids(self.tokenizer, conversation("?", text))
        except ConversationError as exc:
            return f"(system prompt not set: {exc})"
        problem = fit_problem(len(ids), self.settings.max_new_tokens, self.window)
        if problem:
            return (f"(system prompt not set: it is {len(ids):,} tokens with a one-word message; {problem}; "
                    "the previous one is kept)")
        self.settings.system_prompt = text
        shown = repr(text) if len(text) <= 120 else f"{text[:117]!r}... ({len(text):,} characters)"
        return f"(system prompt set: {shown})"

    def remember(self, question: str, reply: Answer) -> None:
        self.history += [{"role": "user", "content": question}, {"role": "assistant", "content": reply.text}]

    def command(self, line: str) -> str | None:
        """The reply to a /command, "exit" to end, or None when the line is not a command."""
        name, _, text = line.partition(" ")
        if name == "/exit":
            return "exit"
        if name == "/reset":
            self.history = []
            return "(conversation cleared)"
        if name == "/system":
            return self.set_system(text.strip())
        if name.startswith("/") and name[1:].isalpha():
            return f"(unknown command {name}; {HELP})"
        return None


def make_streamer(tokenizer, stream):
    """A transformers TextStreamer that writes the answer's words to `stream` as they are generated."""
    from transformers import TextStreamer

    class StreamTo(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            stream.write(text + ("\n" if stream_end else ""))
            stream.flush()

    return StreamTo(tokenizer, skip_prompt=True, skip_special_tokens=True)


def user_lines(stdin, interactive: bool):
    """Each user turn; a terminal gets a 'you>' prompt, a pipe is read line by line."""
    while True:
        if interactive:
            try:
                yield input("you> ")
            except EOFError:
                return
        else:
            line = stdin.readline()
            if not line:
                return
            yield line.rstrip("\n")


def run_chat(model, tokenizer, settings: GenerationSettings, plan: DecodingPlan | None = None, stdin=None,
             stdout=None, stderr=None) -> int:
    """The chat loop; returns the exit status: 0 at /exit or end of input, 130 at Ctrl-C, and 2 when
    standard input is not a terminal and a message could not be answered (a script should know)."""
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    interactive = stdin.isatty()
    session = ChatSession(tokenizer, context_window(model), settings)
    note = lambda text: print(text, file=stderr, flush=True)  # noqa: E731
    if interactive:
        note(f"chat: {HELP}; Ctrl-D or Ctrl-C to leave")
    refused = 0
    try:
        for line in user_lines(stdin, interactive):
            if not line.strip():
                continue
            reply = session.command(line.strip())
            if reply == "exit":
                break
            if reply is not None:
                note(reply)
                continue
            refused += not turn(session, model, line.strip(), plan, stdout, note)
    except KeyboardInterrupt:
        note("\n(chat ended)")
        return 130
    if refused and not interactive:
        note(f"({refused} message(s) could not be answered)")
        return 2
    return 0


def turn(session: ChatSession, model, question: str, plan: DecodingPlan | None, stdout, note) -> bool:
    """Answer one user message, streaming it, and keep it in the conversation; False if it was refused."""
    try:
        ids, dropped = session.prompt(question)
    except InferenceError as exc:
        note(f"({exc})")
        return False
    if dropped:
        note(f"(the conversation no longer fit the {session.window:,}-token context: dropped the oldest {dropped} turn(s))")
    try:
        reply = generate_batch(model, session.tokenizer, [ids], session.settings, plan,
                               streamer=make_streamer(session.tokenizer, stdout))[0]
    except KeyboardInterrupt:
        stdout.write("\n")  # end the half-streamed answer's line
        stdout.flush()
        raise
    if reply.stop_reason == "length":
        note(f"(answer cut at max_new_tokens={session.settings.max_new_tokens})")
    session.remember(question, reply)
    return True
