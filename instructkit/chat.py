"""Terminal chat with a model, rendered with its own chat template, streaming tokens as they come.

Commands: ``/reset`` (forget the conversation), ``/system TEXT`` (set the system message; ``/system``
alone shows it, ``/system -`` removes it), ``/help``, ``/exit``. :func:`chat_loop` takes any iterable
of input lines and any writable stream, so it runs the same from a terminal, a pipe or a test.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TextIO

from instructkit.data.encode import encode_prompt
from instructkit.generate import SamplingConfig, StreamDecoder, add_end_of_turn_stops, generate

HELP = ("commands: /reset forgets the conversation; /system TEXT sets the system message (/system shows "
        "it, /system - removes it); /exit quits")


class ChatSession:
    """A conversation: the system message, the history, and how to ask the model for the next reply."""

    def __init__(self, model, tokenizer, system: str | None = None, sampling: SamplingConfig | None = None):
        template = tokenizer.chat_template
        if isinstance(template, dict):  # some tokenizers carry several named templates
            template = template.get("default")
        if not template:
            from instructkit.models import ModelError

            raise ModelError("this tokenizer has no chat template, so a conversation cannot be rendered. Fix: "
                             "pass --template NAME (chatml, llama3, zephyr, alpaca, plain)")
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.system = system
        self.history: list[dict] = []
        self.sampling = sampling or SamplingConfig(max_new_tokens=256)
        self.context = getattr(model.config, "max_position_embeddings", None)
        add_end_of_turn_stops(model, tokenizer)

    def messages(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.history

    def _prompt(self, out: TextIO) -> list[int]:
        ids = encode_prompt(self.tokenizer, self.messages(), template=self.template)
        dropped = 0
        # Keep room for a full reply: drop the oldest exchanges (never the system message or the
        # new question) until the prompt fits the model's context.
        while self.context and len(ids) + self.sampling.max_new_tokens > self.context and len(self.history) > 1:
            self.history = self.history[2:] if len(self.history) > 2 else self.history[-1:]
            dropped += 1
            ids = encode_prompt(self.tokenizer, self.messages(), template=self.template)
        if dropped:
            out.write(f"(dropped the {dropped} oldest exchange(s) to fit the {self.context}-token context)\n")
        return ids

    def reply(self, text: str, out: TextIO) -> str:
        """Add a user turn, stream the model's answer to ``out``, add it to the history, return it."""
        self.history.append({"role": "user", "content": text})
        prompt = self._prompt(out)
        sampling = self.sampling
        if self.context:
            room = self.context - len(prompt)
            if room < 1:
                self.history.pop()
                raise ValueError(f"this message alone is {len(prompt)} tokens, more than the model's context of "
                                 f"{self.context}")
            if room < sampling.max_new_tokens:
                from dataclasses import replace

                sampling = replace(sampling, max_new_tokens=room)
        decoder = StreamDecoder(self.tokenizer, sampling.stop)

        def show(_: int, tok: int) -> None:
            delta = decoder.push(tok)
            if delta:
                out.write(delta)
                out.flush()

        try:
            [gen] = generate(self.model, self.tokenizer, [prompt], sampling, on_token=show)
        except KeyboardInterrupt:
            self.history.pop()  # an interrupted turn is forgotten, question and partial answer alike
            out.write("\n(interrupted; that exchange was not kept)\n")
            return ""
        out.write(decoder.finish())
        if gen.finish_reason == "length":
            out.write(f" [cut at {len(gen.token_ids)} tokens]")
        out.write("\n")
        out.flush()
        self.history.append({"role": "assistant", "content": gen.text})
        return gen.text


def chat_loop(session: ChatSession, lines: Iterable[str], out: TextIO = sys.stdout,
              prefix: str = "assistant> ") -> int:
    """Run the conversation over ``lines`` until ``/exit`` or the end of input; returns turns answered."""
    turns = 0
    for raw in lines:
        line = raw.rstrip("\n")
        if not line.strip():
            continue
        cmd, _, arg = line.strip().partition(" ")
        if cmd in ("/exit", "/quit"):
            break
        if cmd == "/reset":
            session.history = []
            out.write("(conversation cleared)\n")
        elif cmd == "/system":
            arg = arg.strip()
            if not arg:
                out.write(f"(system: {session.system!r})\n")
            else:
                session.system = None if arg == "-" else arg
                out.write(f"(system message {'removed' if session.system is None else 'set'})\n")
        elif cmd.startswith("/") and cmd[1:].isalpha():
            out.write(f"(unknown command {cmd}; {HELP})\n")
        else:
            out.write(prefix)
            out.flush()
            try:
                session.reply(line, out)
            except ValueError as e:
                out.write(f"\n({e})\n")
                continue
            turns += 1
        out.flush()
    return turns


def terminal_lines(prompt: str = "you> ") -> Iterator[str]:
    """Lines typed at the terminal (with line editing), ending on EOF or Ctrl-C at the prompt."""
    try:
        import readline  # noqa: F401 - importing it gives input() history and editing
    except ImportError:
        pass
    while True:
        try:
            yield input(prompt)
        except (EOFError, KeyboardInterrupt):
            print()
            return


def run_chat(model_dir: str, adapter: str | None = None, system: str | None = None, max_new_tokens: int = 256,
             temperature: float = 0.7, top_p: float = 0.9, seed: int | None = None,
             template: str | None = None, lines: Iterable[str] | None = None, out: TextIO = sys.stdout) -> int:
    """Load a model and chat: from the terminal when stdin is one, else line by line from stdin."""
    from instructkit.models import load_for_inference

    model, tokenizer = load_for_inference(model_dir, adapter, template)
    session = ChatSession(model, tokenizer, system,
                          SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                         seed=seed))
    if lines is None:
        interactive = sys.stdin.isatty()
        lines = terminal_lines() if interactive else sys.stdin
        if interactive:
            print(f"chatting with {adapter or model_dir}. {HELP}", file=sys.stderr)
    return chat_loop(session, lines, out)
