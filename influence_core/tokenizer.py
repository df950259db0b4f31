"""Tokenization: a `tokenizers.Tokenizer` plus the model's special ids and chat template.

Loaders build a `Tokenizer` (from tokenizer.json, or from GGUF metadata); the generation loop only
uses `encode`, `IncrementalDecoder` and `apply_chat_template`.

A chat template is code that comes with a model file, so it renders in jinja2's immutable sandbox
(as in transformers) and within limits: at most `MAX_TEMPLATE_CHARS` characters in the prompt and
in any string or list built on the way, `MAX_TEMPLATE_STEPS` loop iterations, calls and operators,
and `MAX_TEMPLATE_SECONDS`. A template that exceeds one fails with one line saying which.
"""

from __future__ import annotations

import contextvars
import functools
import json
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from .errors import InfluenceError, ModelFormatError


class Tokenizer:
    def __init__(
        self,
        backend: Any,
        *,
        bos_token_id: int | None = None,
        eos_token_ids: Sequence[int] = (),
        pad_token_id: int | None = None,
        chat_template: str | None = None,
    ) -> None:
        self.backend = backend  # a tokenizers.Tokenizer
        self.bos_token_id = bos_token_id
        self.eos_token_ids = tuple(eos_token_ids)
        self.pad_token_id = pad_token_id
        self.chat_template = chat_template

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_text(self, token_id: int | None) -> str:
        return "" if token_id is None else (self.backend.id_to_token(token_id) or "")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    @property
    def renders_tools(self) -> bool:
        """Whether the chat template reads ``tools`` (as transformers passes them)."""
        if not self.chat_template:
            return False
        import jinja2.meta

        return "tools" in jinja2.meta.find_undeclared_variables(
            _compile_template(self.chat_template).environment.parse(self.chat_template))

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tools: list[dict[str, Any]] | None = None) -> str:
        if not self.chat_template:
            raise InfluenceError("this model has no chat template; pass --raw to send the prompt as is")
        eos = self.eos_token_ids[0] if self.eos_token_ids else None
        token = _budget.set(_Budget())
        try:
            pieces = _compile_template(self.chat_template).generate(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                tools=tools,
                bos_token=self.token_text(self.bos_token_id),
                eos_token=self.token_text(eos),
            )
            return "".join(_limited_output(pieces))
        except Exception as error:  # jinja2 raises many types; all mean the template failed
            raise InfluenceError(f"the model's chat template failed: {error}") from None
        finally:
            _budget.reset(token)

    def encode_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[int]:
        # The template writes the special tokens itself, as transformers' apply_chat_template assumes.
        return self.encode(self.apply_chat_template(messages, tools=tools), add_special_tokens=False)

    @classmethod
    def from_dir(cls, directory: Path, *, bos_token_id: int | None, eos_token_ids: Sequence[int],
                 pad_token_id: int | None) -> Tokenizer:
        """Read tokenizer.json and tokenizer_config.json from a Hugging Face model directory."""
        from tokenizers import Tokenizer as HFTokenizer

        path = directory / "tokenizer.json"
        if not path.exists():
            raise ModelFormatError(f"{directory} has no tokenizer.json (a fast tokenizer is required)")
        try:
            backend = HFTokenizer.from_file(str(path))
        except Exception as error:
            raise ModelFormatError(f"{path} could not be read: {error}") from None
        settings = _read_tokenizer_config(directory)
        config_path = directory / "tokenizer_config.json"
        chat_template = _chat_template(settings.get("chat_template"), config_path)
        template_file = directory / "chat_template.jinja"
        if chat_template is None and template_file.exists():
            try:
                chat_template = template_file.read_text(encoding="utf-8")
            except UnicodeDecodeError as error:
                raise ModelFormatError(f"{template_file} is not UTF-8 text: {error}") from None
        eos_ids = list(eos_token_ids)
        eos_text = _token_content(settings.get("eos_token"), "eos_token", config_path)
        if eos_text is not None and backend.token_to_id(eos_text) is not None:
            eos_id = backend.token_to_id(eos_text)
            if eos_id not in eos_ids:
                eos_ids.append(eos_id)
        bos_text = _token_content(settings.get("bos_token"), "bos_token", config_path)
        if bos_token_id is None and bos_text is not None:
            bos_token_id = backend.token_to_id(bos_text)
        return cls(backend, bos_token_id=bos_token_id, eos_token_ids=eos_ids, pad_token_id=pad_token_id,
                   chat_template=chat_template)


class IncrementalDecoder:
    """Turns a growing list of token ids into text pieces without splitting a UTF-8 character.

    Byte-level BPE can emit half a character per token; decoding a sliding window and holding back
    text that ends in U+FFFD (an incomplete byte sequence) keeps every emitted piece whole. The
    window starts one token early so SentencePiece's leading-space handling sees the same context.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.token_ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def push(self, token_id: int) -> str:
        self.token_ids.append(token_id)
        decode = self.tokenizer.decode
        prefix_text = decode(self.token_ids[self._prefix_offset:self._read_offset])
        new_text = decode(self.token_ids[self._prefix_offset:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self.token_ids)
            return new_text[len(prefix_text):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end decodes as U+FFFD)."""
        decode = self.tokenizer.decode
        prefix_text = decode(self.token_ids[self._prefix_offset:self._read_offset])
        new_text = decode(self.token_ids[self._prefix_offset:])
        self._prefix_offset = self._read_offset = len(self.token_ids)
        return new_text[len(prefix_text):]


def _read_tokenizer_config(directory: Path) -> dict[str, Any]:
    path = directory / "tokenizer_config.json"
    if not path.exists():
        return {}
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelFormatError(f"{path} is not valid JSON: {error}") from None
    except RecursionError:
        raise ModelFormatError(f"{path} nests its JSON too deeply to read") from None
    if not isinstance(settings, dict):
        raise ModelFormatError(f"{path} does not hold a JSON object")
    return settings


def _chat_template(value: Any, path: Path) -> str | None:
    """chat_template is one template, or named ones of which "default" is taken."""
    if isinstance(value, list):
        if not all(isinstance(entry, dict) and isinstance(entry.get("template"), str) for entry in value):
            raise ModelFormatError(f"{path}: chat_template should list objects with a \"template\" string")
        value = next((entry["template"] for entry in value if entry.get("name") == "default"), None)
    if value is not None and not isinstance(value, str):
        raise ModelFormatError(f"{path}: chat_template should be a string, not {type(value).__name__}")
    return value


def _token_content(token: Any, name: str, path: Path) -> str | None:
    """A special token as tokenizer_config.json writes it: its text, or an object with "content"."""
    text = token.get("content") if isinstance(token, dict) else token
    if text is not None and not isinstance(text, str):
        raise ModelFormatError(f"{path}: {name} should be the token's text, not {token!r}")
    return text


MAX_TEMPLATE_CHARS = 8_000_000  # some 2M tokens of prompt: more than any context holds
MAX_TEMPLATE_STEPS = 200_000  # a conversation of some 10k messages still fits
MAX_TEMPLATE_SECONDS = 0.5  # real templates render in well under a millisecond
_INT_BITS = 1_000_000  # integers built by templates (``**``, ``*``)


class TemplateLimitError(Exception):
    """A chat template went past a rendering limit."""


class _Budget:
    """What one rendering has used so far."""

    def __init__(self) -> None:
        self.steps = 0
        self.deadline = time.perf_counter() + MAX_TEMPLATE_SECONDS

    def step(self) -> None:
        self.steps += 1
        if self.steps % 64:  # checked every 64 steps, which keeps real templates as fast as without limits
            return
        if self.steps > MAX_TEMPLATE_STEPS:
            raise TemplateLimitError(f"it took more than {MAX_TEMPLATE_STEPS} steps (loop iterations and calls)")
        if time.perf_counter() > self.deadline:
            raise TemplateLimitError(f"it ran for more than {MAX_TEMPLATE_SECONDS} s")


_budget: contextvars.ContextVar[_Budget] = contextvars.ContextVar("chat_template_budget")


def _limited_output(pieces: Iterable[str]) -> Iterator[str]:
    total = 0
    for piece in pieces:
        total += len(piece)
        if total > MAX_TEMPLATE_CHARS:
            raise TemplateLimitError(f"its output grew past the limit of {MAX_TEMPLATE_CHARS} characters")
        yield piece


def _sized(value: Any) -> Any:
    """``value``, refused if it is a string, list or integer past the limits."""
    if isinstance(value, (str, bytes, list, tuple, dict, set)) and len(value) > MAX_TEMPLATE_CHARS:
        raise TemplateLimitError(f"it built a {type(value).__name__} of length {len(value)}, past the limit of "
                                 f"{MAX_TEMPLATE_CHARS}")
    if isinstance(value, int) and value.bit_length() > _INT_BITS:
        raise TemplateLimitError(f"it built an integer of more than {_INT_BITS} bits")
    return value


def _refuse_past(size: int, what: str) -> None:
    if size > MAX_TEMPLATE_CHARS:
        raise TemplateLimitError(f"{what} would build a result of length {size}, past the limit of "
                                 f"{MAX_TEMPLATE_CHARS}")


def _largest_number(text: Any) -> int:
    return max((int(digits) for digits in re.findall(r"\d+", text)), default=0) if isinstance(text, str) else 0


def _check_binop(operator: str, left: Any, right: Any) -> None:
    """Refuse, before it runs, an operator whose result would be past the limits."""
    if operator == "*":
        sequence, count = (left, right) if isinstance(right, int) else (right, left)
        if isinstance(sequence, (str, list, tuple)) and isinstance(count, int):
            _refuse_past(len(sequence) * count, f"{type(sequence).__name__} * {count}")
        if isinstance(left, int) and isinstance(right, int):
            if left.bit_length() + right.bit_length() > _INT_BITS:
                raise TemplateLimitError(f"it built an integer of more than {_INT_BITS} bits")
    elif operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1:
        if right * left.bit_length() > _INT_BITS:
            raise TemplateLimitError(f"it built an integer of more than {_INT_BITS} bits")
    elif operator == "%" and isinstance(left, str):
        starred = [value for value in (right if isinstance(right, tuple) else (right,)) if isinstance(value, int)]
        _refuse_past(max(_largest_number(left), max(starred, default=0) if "*" in left else 0),
                     "a % format with that width")


def _check_expansion(name: str, value: Any, args: tuple, kwargs: dict) -> None:
    """Refuse, before they run, the string methods and filters whose result can grow far beyond
    their inputs: the estimate is the size of what they would build."""
    if not isinstance(value, str):
        return
    arguments = [*args, *kwargs.values()]
    widths = [argument for argument in arguments if isinstance(argument, int)]
    texts = [argument for argument in arguments if isinstance(argument, str)]
    if name in ("center", "ljust", "rjust", "zfill", "truncate"):
        _refuse_past(max(widths, default=0), f"{name}()")
    elif name == "expandtabs":
        _refuse_past(value.count("\t") * max(widths, default=8) + len(value), "expandtabs()")
    elif name in ("indent", "wordwrap"):
        _refuse_past((value.count("\n") + 1) * (max(widths, default=0) + sum(map(len, texts))) + len(value),
                     f"{name}()")
    elif name == "replace" and len(texts) >= 2 and len(texts[1]) > len(texts[0]):
        _refuse_past(len(value) + value.count(texts[0]) * (len(texts[1]) - len(texts[0])), "replace()")
    elif name in ("format", "format_map"):
        nested_width = re.search(r":[^{}]*\{", value)  # '{:>{w}}': the width is an argument
        _refuse_past(max(_largest_number(value), max(widths, default=0) if nested_width else 0),
                     "a format with that width")
    elif name == "translate":
        table = args[0] if args and isinstance(args[0], dict) else {}
        _refuse_past(len(value) * max((len(v) for v in table.values() if isinstance(v, str)), default=1),
                     "translate()")


def _check_join(separator: Any, items: Any) -> list:
    """The items of a join, as a list, refused if the joined string would be past the limit."""
    items = list(items)
    if isinstance(separator, str):
        _refuse_past(len(separator) * len(items) + sum(len(item) for item in items if isinstance(item, str)),
                     "join()")
    return items


def _counted(iterable: Iterable[Any]) -> Iterator[Any]:
    """A loop's items, each one a step of the budget."""
    budget = _budget.get()
    for item in iterable:
        budget.step()
        yield item


def _limited_filter(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    """A jinja2 filter that counts as a step, is checked before it runs, and whose result is sized."""
    passes_context = getattr(function, "jinja_pass_arg", None) is not None

    @functools.wraps(function)  # keeps jinja_pass_arg, so jinja2 passes the same first argument
    def limited(*args: Any, **kwargs: Any) -> Any:
        _budget.get().step()
        value, rest = (args[1], args[2:]) if passes_context else (args[0], args[1:])
        if name == "join":
            separator = rest[0] if rest else kwargs.get("d", "")
            items = _check_join(separator, value)
            args = (args[0], items, *rest) if passes_context else (items, *rest)
        _check_expansion(name, value, rest, kwargs)
        return _sized(function(*args, **kwargs))

    return limited


@lru_cache(maxsize=8)
def _compile_template(source: str) -> Any:
    # The same sandbox and helpers transformers gives templates, so templates written for it render alike.
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import loopcontrols
    from jinja2.runtime import LoopContext
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from jinja2.visitor import NodeTransformer

    counted, sized = "(counted)", "(sized)"  # filter names no template can write

    class Limits(NodeTransformer):
        """Route every loop's items and every ``~`` concatenation through the budget."""

        def visit_For(self, node: nodes.For) -> nodes.Node:
            self.generic_visit(node)
            node.iter = nodes.Filter(node.iter, counted, [], [], None, None, lineno=node.lineno)
            return node

        def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
            self.generic_visit(node)
            return nodes.Filter(node, sized, [], [], None, None, lineno=node.lineno)

    class LimitedEnvironment(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**", "+", "%"})

        def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
            return Limits().visit(super()._parse(source, name, filename))

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            _budget.get().step()
            if operator != "+":  # a sum is at most twice its sized operands, so it is sized after
                _check_binop(operator, left, right)
            result = self.binop_table[operator](left, right)
            if type(result) is str and len(result) <= MAX_TEMPLATE_CHARS:  # the common case, quickly
                return result
            return _sized(result)

        def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 (jinja2's)
            _budget.get().step()
            # The sandbox hands out str.format wrapped (to sandbox its fields): look through the wrapper.
            receiver = getattr(getattr(__obj, "__wrapped__", __obj), "__self__", None)
            if isinstance(receiver, str):
                if __obj.__name__ == "join" and args:
                    args = (_check_join(receiver, args[0]), *args[1:])
                _check_expansion(__obj.__name__, receiver, args, kwargs)
            if isinstance(__obj, LoopContext) and args:  # a recursive loop's next level
                args = (_counted(args[0]), *args[1:])
            return _sized(super().call(__context, __obj, *args, **kwargs))

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: Any = None, sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = LimitedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.filters = {name: _limited_filter(name, function) for name, function in env.filters.items()}
    env.filters[counted] = _counted
    env.filters[sized] = _sized
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)
