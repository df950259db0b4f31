"""`influence chat`: a conversation at the terminal, turn by turn.

Each turn sends the whole conversation; the model's KV cache still holds everything before the new
turn, so only that is prefilled. Lines are edited with readline (arrows, Ctrl-R, history kept in
the store across sessions). A line of three double quotes starts and ends a multi-line message.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import ContextLengthError, InfluenceError

COMMANDS = {
    "/help": "this list",
    "/reset": "forget the conversation",
    "/save FILE": "write the conversation to FILE (JSON)",
    "/load FILE": "continue the conversation saved in FILE",
    "/exit": "quit (or Ctrl-D)",
}
MULTILINE = '"""'
HISTORY_LINES = 1000


def run_chat(model: Any, options: dict[str, Any], system: str | None,
             after_reply: Callable[[Any], None] | None = None) -> None:
    """The read-reply loop, until /exit or the end of input."""
    opening = [{"role": "system", "content": system}] if system else []
    messages = list(opening)
    interactive = sys.stdin.isatty()
    if interactive:
        _enable_line_editing()
    print(f"Chatting with {model.source.path.name} ({model.backend}, {model.device}, {model.dtype}). "
          f"/help lists commands; {MULTILINE} starts and ends a multi-line message; /exit or Ctrl-D quits.",
          file=sys.stderr)
    while True:
        text = _read_message("> " if interactive else "", "... " if interactive else "")
        if text is None or text.strip() == "/exit":
            break
        command, _, argument = text.strip().partition(" ")
        if command.startswith("/") and "\n" not in text:
            messages = _run_command(command, argument.strip(), messages, opening)
            continue
        if not text.strip():
            continue
        messages.append({"role": "user", "content": text})
        try:
            stream = model.stream(messages, **options)
            for piece in stream:
                sys.stdout.write(piece)
                sys.stdout.flush()
        except ContextLengthError as error:
            messages.pop()
            print(f"\nerror: {error}; /reset starts a new conversation", file=sys.stderr)
            continue
        except KeyboardInterrupt:
            messages.pop()
            print("\n(reply interrupted)", file=sys.stderr)
            continue
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": stream.result.text})
        if after_reply:
            after_reply(stream.result)


def _read_message(prompt: str, continuation: str) -> str | None:
    """One message: a line, or the lines between two lines of three double quotes; None at the end."""
    try:
        line = utf8_line(input(prompt))
        if line.strip() != MULTILINE:
            return line
        lines = []
        while (line := utf8_line(input(continuation))).strip() != MULTILINE:
            lines.append(line)
        return "\n".join(lines)
    except EOFError:
        return None


def utf8_line(line: str) -> str:
    """A line ``input()`` read: stdin decodes bytes that are not UTF-8 as lone surrogates
    (surrogateescape), which are refused here by name rather than reaching the tokenizer."""
    try:
        line.encode("utf-8")
    except UnicodeEncodeError as error:
        byte = ord(line[error.start]) - 0xDC00
        raise InfluenceError(f"stdin is not UTF-8 text: byte 0x{byte:02x} at offset {error.start} of the line "
                             f"{line[:error.start]!r}...") from None
    return line


def _run_command(command: str, argument: str, messages: list[dict], opening: list[dict]) -> list[dict]:
    """Carry out a /command; returns the conversation it leaves."""
    if command == "/reset":
        print("(conversation forgotten)", file=sys.stderr)
        return list(opening)
    if command == "/help":
        for name, what in COMMANDS.items():
            print(f"  {name:<12} {what}", file=sys.stderr)
        return messages
    if command in ("/save", "/load") and not argument:
        print(f"error: {command} needs a FILE", file=sys.stderr)
        return messages
    try:
        if command == "/save":
            save_conversation(messages, Path(argument).expanduser())
            print(f"(saved {len(messages)} messages to {argument})", file=sys.stderr)
            return messages
        if command == "/load":
            loaded = load_conversation(Path(argument).expanduser())
            print(f"(loaded {len(loaded)} messages from {argument})", file=sys.stderr)
            return loaded
    except InfluenceError as error:
        print(f"error: {error}", file=sys.stderr)
        return messages
    print(f"error: unknown command {command} (commands: {', '.join(c.split()[0] for c in COMMANDS)})",
          file=sys.stderr)
    return messages


def save_conversation(messages: list[dict], path: Path) -> None:
    """Write the conversation as JSON to a new file (an existing one is left alone)."""
    try:
        with path.open("x", encoding="utf-8") as file:
            json.dump({"messages": messages}, file, indent=2, ensure_ascii=False)
            file.write("\n")
    except FileExistsError:
        raise InfluenceError(f"{path} exists; choose a new file name") from None
    except OSError as error:
        raise InfluenceError(f"cannot write {path}: {error.strerror}") from None


def load_conversation(path: Path) -> list[dict]:
    """A conversation `save_conversation` wrote (or any {"messages": [{"role", "content"}, ...]})."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise InfluenceError(f"cannot read {path}: {error.strerror}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InfluenceError(f"{path} is not a saved conversation (not JSON: {error})") from None
    messages = data.get("messages") if isinstance(data, dict) else None
    if not isinstance(messages, list) or not all(
            isinstance(m, dict) and set(m) == {"role", "content"} and m["role"] in ("system", "user", "assistant")
            and isinstance(m["content"], str) for m in messages):
        raise InfluenceError(f"{path} is not a saved conversation: it needs \"messages\", a list of "
                             "{\"role\": system|user|assistant, \"content\": text}")
    return messages


def _enable_line_editing() -> None:
    """readline gives input() line editing; its history lives in the store, kept across sessions."""
    try:
        import readline
    except ImportError:  # a Python built without it: plain input still works
        return
    import atexit

    from .artifacts import home

    history = home() / "chat_history"
    try:
        readline.read_history_file(history)
    except FileNotFoundError:
        pass  # the first chat
    except OSError as error:
        print(f"influence: chat history not read ({error.strerror})", file=sys.stderr)
    readline.set_history_length(HISTORY_LINES)

    def save() -> None:
        try:
            history.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(history)
        except OSError as error:
            print(f"influence: chat history not saved ({error.strerror})", file=sys.stderr)

    atexit.register(save)
