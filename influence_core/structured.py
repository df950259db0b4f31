"""Structured output: what a generation's text must match, and tool calls.

A `Constraint` names the form (any JSON object, a JSON schema, a regex, a GBNF or Lark grammar);
the sampler registered as ``grammar`` (plugins/influence_grammar) turns it into a token mask each
step. Tool calls use the `ToolParser` registered for the model's chat-template family
(``register_tool_parsers``; docs/structured-output.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .errors import InfluenceError

ConstraintKind = Literal["json", "json_schema", "regex", "grammar"]


@dataclass(frozen=True)
class Constraint:
    """The generated text must match this. ``value``: the JSON schema as a JSON string (kind
    json_schema), the regex, or the grammar text (GBNF, or Lark as llguidance reads it); unused for
    kind json (any JSON object)."""

    kind: ConstraintKind
    value: str = ""

    @classmethod
    def json_object(cls) -> Constraint:
        return cls("json")

    @classmethod
    def json_schema(cls, schema: dict[str, Any]) -> Constraint:
        if not isinstance(schema, dict):
            raise InfluenceError(f"a JSON schema must be a JSON object, got {type(schema).__name__}")
        return cls("json_schema", json.dumps(schema))

    @classmethod
    def regex(cls, pattern: str) -> Constraint:
        return cls("regex", pattern)

    @classmethod
    def grammar(cls, text: str) -> Constraint:
        return cls("grammar", text)

    @property
    def schema(self) -> dict[str, Any] | None:
        return json.loads(self.value) if self.kind == "json_schema" else None


def constraint_from(response_format: Any) -> Constraint | None:
    """What ``generate(..., response_format=...)`` accepts: None, a `Constraint`, "json" (any JSON
    object), a JSON schema dict, a pydantic model class, or OpenAI's response_format objects
    ({"type": "json_object"}, {"type": "json_schema", "json_schema": {"schema": ...}})."""
    if response_format is None or isinstance(response_format, Constraint):
        return response_format
    if response_format == "json":
        return Constraint.json_object()
    if isinstance(response_format, type) and hasattr(response_format, "model_json_schema"):
        return Constraint.json_schema(response_format.model_json_schema())
    if isinstance(response_format, dict):
        kind = response_format.get("type")
        if kind == "json_object":
            return Constraint.json_object()
        if kind == "text" and len(response_format) == 1:
            return None
        if kind == "json_schema":
            wrapper = response_format.get("json_schema")
            if not isinstance(wrapper, dict) or wrapper.get("schema") is None:
                raise InfluenceError("response_format json_schema needs {'json_schema': {'name': ..., 'schema': {...}}}")
            return Constraint.json_schema(wrapper["schema"])
        if kind == "text":
            raise InfluenceError("response_format text takes no other fields")
        return Constraint.json_schema(response_format)
    raise InfluenceError(f"response_format must be 'json', a JSON schema dict or a pydantic model class, "
                         f"got {response_format!r}")


def read_json_schema(path: Path) -> Constraint:
    try:
        return Constraint.json_schema(json.loads(path.read_text(encoding="utf-8")))
    except OSError as error:
        raise InfluenceError(f"cannot read {path}: {error.strerror}") from None
    except json.JSONDecodeError as error:
        raise InfluenceError(f"{path} is not valid JSON: {error}") from None


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]
