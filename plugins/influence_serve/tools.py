"""Tool calling for chat: tools into the prompt, the model's calls out of its reply.

The model's chat-template family decides the syntax, through the `ToolParser` registered for it
(``register_tool_parsers``). A template that reads ``tools`` gets them as transformers passes them;
one that does not gets them described in the system message, in the parser's syntax. Under
``tool_choice`` "required" or a named function, the parser's grammar forces a valid call; under
"auto" the reply is free, unless a function asks for ``strict``, and then it is either text or
valid calls; under "none" it may not open with the call syntax.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from influence_core.errors import InfluenceError
from influence_core.interfaces import ToolParser
from influence_core.plugins import get_registry
from influence_core.structured import Constraint, ToolCall
from influence_core.tokenizer import Tokenizer


@dataclass(frozen=True)
class ToolPlan:
    parser: ToolParser
    functions: list[dict[str, Any]]  # OpenAI's function objects the model may call
    native: bool  # the chat template renders the tools itself
    calling: bool  # False under tool_choice "none": the history may hold calls, the reply holds none
    forced: bool  # the reply must be calls ("required" or a named function)
    parallel: bool
    constraint: Constraint | None


def plan_tools(tokenizer: Tokenizer, tools: list[dict[str, Any]] | None, tool_choice: Any,
               parallel: bool) -> ToolPlan | None:
    """How a request's ``tools`` and ``tool_choice`` shape its prompt and reply (None: no tools)."""
    if not tools:
        if tool_choice not in (None, "none"):
            raise InfluenceError("tool_choice needs tools")
        return None
    functions = [tool["function"] for tool in tools]
    names = [function["name"] for function in functions]
    if len(set(names)) != len(names):
        raise InfluenceError(f"tools name the same function twice: {names}")
    parser = get_registry().tool_parser_for(tokenizer.chat_template or "")
    native = tokenizer.renders_tools
    choice = tool_choice or "auto"
    if choice == "none":  # a reply, and no call: it may not open with the call syntax
        no_call = Constraint.regex(f"[^{re.escape(parser.call_start[0])}][\\s\\S]*")
        return ToolPlan(parser, functions, native, False, False, parallel, no_call)
    if choice == "auto":
        strict = any(function.get("strict") for function in functions)
        constraint = parser.call_grammar(functions, parallel, True) if strict else None
        return ToolPlan(parser, functions, native, True, False, parallel, constraint)
    if choice == "required":
        return ToolPlan(parser, functions, native, True, True, parallel, parser.call_grammar(functions, parallel, False))
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        wanted = choice["function"].get("name")
        chosen = [function for function in functions if function["name"] == wanted]
        if not chosen:
            raise InfluenceError(f"tool_choice names function {wanted!r}, which is not among the tools ({', '.join(names)})")
        return ToolPlan(parser, chosen, native, True, True, False, parser.call_grammar(chosen, False, False))
    raise InfluenceError(f"tool_choice must be 'auto', 'none', 'required' or {{'type': 'function', 'function': "
                         f"{{'name': ...}}}}, got {choice!r}")


def _arguments(call: dict[str, Any]) -> dict[str, Any]:
    arguments = call["function"].get("arguments") or "{}"
    if isinstance(arguments, dict):
        return arguments
    try:
        parsed = json.loads(arguments)
    except json.JSONDecodeError as error:
        raise InfluenceError(f"the arguments of tool call {call.get('id')!r} are not JSON: {error}") from None
    if not isinstance(parsed, dict):
        raise InfluenceError(f"the arguments of tool call {call.get('id')!r} must be a JSON object")
    return parsed


def template_messages(messages: list[dict[str, Any]], plan: ToolPlan | None, tokenizer: Tokenizer
                      ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The messages and the ``tools`` for the chat template. ``messages`` are OpenAI's, with text
    content; tool-call arguments become objects, as templates written for transformers expect.
    Past calls go to a template that cannot render them as text in the tool parser's syntax."""
    native = plan.native if plan else tokenizer.renders_tools
    parser = plan.parser if plan else None
    if parser is None and not native and any(message.get("tool_calls") for message in messages):
        parser = get_registry().tool_parser_for(tokenizer.chat_template or "")
    rendered = []
    for message in messages:
        message = {key: value for key, value in message.items() if value is not None}
        message.setdefault("content", "")
        if message.get("tool_calls"):
            calls = [{"id": call.get("id"), "type": "function",
                      "function": {"name": call["function"]["name"], "arguments": _arguments(call)}}
                     for call in message["tool_calls"]]
            if native:
                message["tool_calls"] = calls
            else:
                del message["tool_calls"]
                written = "\n".join(parser.render_call(ToolCall(c["function"]["name"], c["function"]["arguments"]))
                                    for c in calls)
                message["content"] = f"{message['content']}\n{written}".strip()
        rendered.append(message)
    if plan is None or not plan.calling:
        return rendered, None
    if native:
        return rendered, [{"type": "function", "function": function} for function in plan.functions]
    instructions = plan.parser.system_prompt(plan.functions)
    if rendered and rendered[0]["role"] == "system":
        rendered[0] = {**rendered[0], "content": f"{rendered[0]['content']}\n\n{instructions}"}
    else:
        rendered.insert(0, {"role": "system", "content": instructions})
    return rendered, None


def split_reply(plan: ToolPlan | None, text: str) -> tuple[str | None, list[ToolCall]]:
    """A reply's content and its calls (only calls of offered functions; the first one alone when
    parallel calls are off)."""
    if plan is None or not plan.calling:
        return text, []
    content, calls = plan.parser.parse(text)
    offered = {function["name"] for function in plan.functions}
    if not calls or any(call.name not in offered for call in calls):
        return text, []
    return content, calls if plan.parallel else calls[:1]


class ReplyFilter:
    """For streams: passes content on as it comes, holding back from the text that opens a call."""

    def __init__(self, plan: ToolPlan | None) -> None:
        self.plan = plan
        self.text = ""
        self.sent = 0
        self.holding = bool(plan and plan.calling and plan.forced)

    def push(self, piece: str) -> str:
        self.text += piece
        if self.plan is None or not self.plan.calling:
            return self._send(len(self.text))
        if self.holding:
            return ""
        marker = self.plan.parser.call_start
        found = self.text.find(marker, self.sent)
        if found >= 0:
            self.holding = True
            return self._send(found)
        hold = next((n for n in range(min(len(marker) - 1, len(self.text)), 0, -1) if self.text.endswith(marker[:n])), 0)
        return self._send(len(self.text) - hold)

    def finish(self) -> tuple[str, list[ToolCall]]:
        """What content is left to send, and the calls."""
        _, calls = split_reply(self.plan, self.text)
        return ("", calls) if calls else (self._send(len(self.text)), [])

    def _send(self, end: int) -> str:
        text, self.sent = self.text[self.sent:end], max(self.sent, end)
        return text
