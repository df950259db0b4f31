"""Tokenization: a `tokenizers.Tokenizer` plus the model's special ids and chat template.

Loaders build a `Tokenizer` (from tokenizer.json, or from GGUF metadata); the generation loop only
uses `encode`, `IncrementalDecoder` and `apply_chat_template`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
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
        try:
            return _compile_template(self.chat_template).render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                tools=tools,
                bos_token=self.token_text(self.bos_token_id),
                eos_token=self.token_text(eos),
            )
        except Exception as error:  # jinja2 raises many types; all mean the template failed
            raise InfluenceError(f"the model's chat template failed: {error}") from None

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
        chat_template = settings.get("chat_template")
        if isinstance(chat_template, list):  # named templates: take the default one
            chat_template = next((t["template"] for t in chat_template if t.get("name") == "default"), None)
        template_file = directory / "chat_template.jinja"
        if chat_template is None and template_file.exists():
            chat_template = template_file.read_text(encoding="utf-8")
        eos_ids = list(eos_token_ids)
        eos_text = _token_content(settings.get("eos_token"))
        if eos_text is not None and backend.token_to_id(eos_text) is not None:
            eos_id = backend.token_to_id(eos_text)
            if eos_id not in eos_ids:
                eos_ids.append(eos_id)
        bos_text = _token_content(settings.get("bos_token"))
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
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ModelFormatError(f"{path} is not valid JSON: {error}") from None


def _token_content(token: Any) -> str | None:
    if isinstance(token, dict):
        return token.get("content")
    return token


@lru_cache(maxsize=8)
def _compile_template(source: str) -> Any:
    # The same sandbox and helpers transformers gives templates, so templates written for it render alike.
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: Any = None, sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)
