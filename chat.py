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
            ids = prompt_ids(self.tokenizer, conversation(question, self.system, self.history[2 * dropped:]))
            if fit_problem(len(ids), self.settings.max_new_tokens, self.window) is None:
                self.history = self.history[2 * dropped:]
                return ids, dropped
        raise InferenceError(f"this message cannot be answered: {fit_problem(len(ids), self.settings.max_new_tokens, self.window)}")

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
            self.settings.system_prompt = text.strip()
            return f"(system prompt set: {text.strip()!r})" if text.strip() else "(system prompt cleared)"
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
    """The chat loop; returns the exit status (0 at /exit or end of input, 130 at Ctrl-C)."""
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    interactive = stdin.isatty()
    session = ChatSession(tokenizer, context_window(model), settings)
    note = lambda text: print(text, file=stderr, flush=True)  # noqa: E731
    if interactive:
        note(f"chat: {HELP}; Ctrl-D or Ctrl-C to leave")
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
            turn(session, model, line.strip(), plan, stdout, note)
    except KeyboardInterrupt:
        note("\n(chat ended)")
        return 130
    return 0


def turn(session: ChatSession, model, question: str, plan: DecodingPlan | None, stdout, note) -> None:
    """Answer one user message, streaming it, and keep it in the conversation."""
    try:
        ids, dropped = session.prompt(question)
    except InferenceError as exc:
        note(f"({exc})")
        return
    if dropped:
        note(f"(the conversation no longer fit the {session.window:,}-token context: dropped the oldest {dropped} turn(s))")
    reply = generate_batch(model, session.tokenizer, [ids], session.settings, plan,
                           streamer=make_streamer(session.tokenizer, stdout))[0]
    if reply.stop_reason == "length":
        note(f"(answer cut at max_new_tokens={session.settings.max_new_tokens})")
    session.remember(question, reply)
