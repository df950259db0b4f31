"""Constrained decoding on llguidance, and the Hermes/Qwen tool-call format.

The ``grammar`` processor masks, at every step, the tokens that cannot continue a match of the
`Constraint` (a JSON object, a JSON schema, a regex, a GBNF or Lark grammar): it allows EOS only
once the text is complete, and nothing else once the grammar can go no further. It works on the
float32 torch logits every backend hands the loop, one matcher per generation, so batched rows
each keep their own state. Why llguidance rather than xgrammar: docs/structured-output.md.
"""

from __future__ import annotations

import json
import weakref
from typing import Any

from influence_core import SamplingError, hookimpl
from influence_core.interfaces import Sampler, SamplingContext, ToolParser
from influence_core.structured import Constraint, ToolCall
from influence_core.tokenizer import Tokenizer

influence_hookspec_version = "1.1"

# Compact JSON: flexible whitespace lets a weak model emit blank lines until max_tokens.
JSON_OPTIONS = {"whitespace_flexible": False}
ANY_JSON_OBJECT = {"type": "object"}

# Building llguidance's view of a vocabulary takes about a second; once per tokenizer.
_tokenizers: weakref.WeakKeyDictionary[Tokenizer, dict[tuple, Any]] = weakref.WeakKeyDictionary()


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise SamplingError("constrained decoding needs llguidance: pip install 'llguidance>=1.9'") from None
    return llguidance


def grammar_source(constraint: Constraint) -> str:
    """The constraint as an llguidance grammar."""
    matcher = _llguidance().LLMatcher
    if constraint.kind == "json":
        return matcher.grammar_from_json_schema(ANY_JSON_OBJECT, defaults=JSON_OPTIONS)
    if constraint.kind == "json_schema":
        return matcher.grammar_from_json_schema(constraint.value, defaults=JSON_OPTIONS)
    if constraint.kind == "regex":
        return matcher.grammar_from_regex(constraint.value)
    if constraint.kind == "grammar":
        from llguidance.gbnf_to_lark import GbnfToLarkError, any_to_lark

        try:
            return matcher.grammar_from_lark(any_to_lark(constraint.value))
        except GbnfToLarkError as error:
            raise SamplingError(f"the grammar is not valid GBNF: {error}") from None
    raise SamplingError(f"unknown constraint kind {constraint.kind!r}")


def _lltokenizer(tokenizer: Tokenizer, eos_token_ids: tuple[int, ...], vocab_size: int):
    key = (tuple(eos_token_ids), vocab_size)
    cached = _tokenizers.setdefault(tokenizer, {})
    if key not in cached:
        cached[key] = _llguidance().LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab_size,
                                                eos_token=list(eos_token_ids))
    return cached[key]


class GrammarMask:
    """One generation's matcher. It learns the picked tokens from the history the loop passes in,
    so it needs no hook into the picker."""

    def __init__(self, matcher: Any, vocab_size: int, eos_token_ids: tuple[int, ...]) -> None:
        import numpy as np

        self.matcher = matcher
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self.bitmask = np.zeros((vocab_size + 31) // 32, dtype=np.int32)
        self.consumed: int | None = None  # history length already fed to the matcher

    def __call__(self, logits, context: SamplingContext):
        import numpy as np
        import torch

        history = context.token_ids
        if self.consumed is None:
            self.consumed = context.prompt_length
        for token in history[self.consumed:].tolist():
            if not self.matcher.consume_token(token):
                raise SamplingError(f"the grammar refused token {token}: {self.matcher.get_error()}")
        self.consumed = history.numel()
        if self.matcher.is_stopped():  # complete, and nothing may follow: force the end
            forced = torch.full_like(logits, float("-inf"))
            forced[self.eos_token_ids] = logits[self.eos_token_ids]
            return forced
        self.matcher.unsafe_compute_mask_ptr(self.bitmask.ctypes.data, self.bitmask.nbytes)
        if self.matcher.is_error():
            raise SamplingError(f"the grammar failed: {self.matcher.get_error()}")
        width = logits.shape[-1]
        allowed = np.zeros(width, dtype=bool)
        unpacked = np.unpackbits(self.bitmask.view(np.uint8), bitorder="little")[:width]
        allowed[:unpacked.size] = unpacked
        if logits.device.type == "cpu":
            # In numpy: torch's small CPU ops wait on its thread pool, which costs milliseconds on a busy machine.
            return torch.from_numpy(np.where(allowed, logits.numpy(), np.float32("-inf")))
        return logits.masked_fill(~torch.from_numpy(allowed).to(logits.device, non_blocking=True), float("-inf"))


def _first_lines(problem: str) -> str:
    """llguidance's message, without the source excerpt it draws under it."""
    lines = [line.strip() for line in problem.splitlines() if line.strip() and "|" not in line and line.strip() != "^"]
    return " ".join(lines)


def grammar(constraint: Any = None, tokenizer: Any = None, eos_token_ids: Any = (), vocab_size: Any = 0):
    if not isinstance(constraint, Constraint) or not isinstance(tokenizer, Tokenizer):
        raise SamplingError("the grammar sampler is driven by a constraint (--format, --json-schema, "
                            "--grammar, --regex, or response_format), not by -o options")
    if not eos_token_ids:
        raise SamplingError("constrained decoding needs the model's EOS token, and it has none")
    llguidance = _llguidance()
    width = max(int(vocab_size), tokenizer.vocab_size)
    lltokenizer = _lltokenizer(tokenizer, tuple(eos_token_ids), width)
    source = grammar_source(constraint)
    problem = llguidance.LLMatcher.validate_grammar(source, lltokenizer)
    if problem:
        raise SamplingError(f"the {constraint.kind.replace('_', ' ')} cannot be used: {_first_lines(problem)}")
    matcher = llguidance.LLMatcher(lltokenizer, source, log_level=0)
    if matcher.is_error():
        raise SamplingError(f"the {constraint.kind.replace('_', ' ')} cannot be used: {matcher.get_error()}")
    return GrammarMask(matcher, width, tuple(eos_token_ids))


# ---- tool calls, Hermes/Qwen style: <tool_call>{"name": ..., "arguments": {...}}</tool_call> ----

HERMES_START, HERMES_END = "<tool_call>", "</tool_call>"


def hermes_matches(chat_template: str) -> bool:
    return HERMES_START in chat_template


def hermes_parse(text: str) -> tuple[str | None, list[ToolCall]]:
    start = text.find(HERMES_START)
    if start < 0:
        return text, []
    calls = []
    for block in text[start:].split(HERMES_START)[1:]:
        body = block.split(HERMES_END, 1)[0].strip()
        try:
            call = json.loads(body)
        except json.JSONDecodeError:
            return text, []
        if not (isinstance(call, dict) and isinstance(call.get("name"), str)
                and isinstance(call.get("arguments", {}), dict)):
            return text, []
        calls.append(ToolCall(call["name"], call.get("arguments", {})))
    content = text[:start].strip()
    return content or None, calls


def _call_schema(function: dict[str, Any]) -> dict[str, Any]:
    parameters = function.get("parameters") or {"type": "object", "properties": {}}
    return {"type": "object", "properties": {"name": {"const": function["name"]}, "arguments": parameters},
            "required": ["name", "arguments"], "additionalProperties": False}


def hermes_call_grammar(functions: list[dict[str, Any]], parallel: bool, optional: bool) -> Constraint:
    schema = {"anyOf": [_call_schema(f) for f in functions], "x-guidance": JSON_OPTIONS}
    calls = f"call{'+' if parallel else ''}"
    # Optional: a reply is either calls or text that does not open one.
    return Constraint.grammar(
        (f"start: {calls} | text\ntext: /[^<](?s:.)*/\n" if optional else f"start: {calls}\n") +
        f'call: "{HERMES_START}\\n" body "\\n{HERMES_END}"\n'
        f"body: %json {json.dumps(schema)}\n")


def hermes_system_prompt(functions: list[dict[str, Any]]) -> str:
    listed = "\n".join(json.dumps({"type": "function", "function": f}, ensure_ascii=False) for f in functions)
    return ("You may call one or more functions to help with the user's request. The functions are:\n"
            f"<tools>\n{listed}\n</tools>\n"
            "To call a function, reply with a JSON object holding its name and arguments inside tags:\n"
            f'{HERMES_START}\n{{"name": <function-name>, "arguments": <args-json-object>}}\n{HERMES_END}')


def hermes_render_call(call: ToolCall) -> str:
    body = json.dumps({"name": call.name, "arguments": call.arguments}, ensure_ascii=False)
    return f"{HERMES_START}\n{body}\n{HERMES_END}"


HERMES = ToolParser("hermes", hermes_matches, hermes_parse, hermes_call_grammar, hermes_system_prompt,
                    hermes_render_call, HERMES_START,
                    "Hermes/Qwen <tool_call>{json}</tool_call>; also the fallback for templates without tools")

@hookimpl(trylast=True)
def register_samplers(register) -> None:
    register(Sampler("grammar", "processor", grammar,
                     "mask tokens that cannot continue a JSON object, JSON schema, regex or grammar (llguidance)"))


@hookimpl(trylast=True)
def register_tool_parsers(register) -> None:
    register(HERMES)
