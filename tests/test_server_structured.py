"""Structured output, tool calling and logprobs in `influence serve`, with the official openai client:
a tiny random model whose template renders tools (Hermes/Qwen style) for validity, and the real
default model for `.parse()` and the agent round."""

from __future__ import annotations

import enum
import json

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from influence_core.structured import ToolCall
from influence_grammar import HERMES
from influence_serve.tools import ReplyFilter, ToolPlan

from test_onnx import default_model_source
from test_server import Server
from tiny_models import make_tiny_llama

# A Qwen2.5-style template: tools in the system turn, calls as <tool_call>{json}</tool_call>.
TOOLS_TEMPLATE = """{%- if tools %}<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}

{% endif %}# Tools
<tools>
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}</tools>
For each function call, return a json object with function name and arguments within <tool_call></tool_call> tags.<|im_end|>
{% elif messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'system' %}{% continue %}{% endif %}
{%- if message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant
{{ message.content }}{% for call in message.tool_calls %}<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}
</tool_call>{% endfor %}<|im_end|>
{% elif message.role == 'tool' %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

WEATHER = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "days"], "additionalProperties": False}
CLOCK = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
         "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather forecast for a city.",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "The time in a zone.",
                                           "parameters": CLOCK}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": CLOCK}


@pytest.fixture(scope="module")
def tools_model(tmp_path_factory):
    # Tools in the prompt take hundreds of the tiny tokenizer's tokens.
    directory = make_tiny_llama(tmp_path_factory.mktemp("tools") / "tiny-tools", max_position_embeddings=2048)
    settings = json.loads((directory / "tokenizer_config.json").read_text())
    settings["chat_template"] = TOOLS_TEMPLATE
    (directory / "tokenizer_config.json").write_text(json.dumps(settings))
    return directory


@pytest.fixture(scope="module")
def tiny_server(tools_model):
    running = Server(tools_model, "--max-batch", "4", "--name", "tiny-tools")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def smol_server():
    running = Server(default_model_source().path, "--max-batch", "2", "--name", "smol")
    yield running
    running.stop()


def assert_valid_calls(message, names=None):
    assert message.tool_calls, message
    for call in message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert names is None or call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("parallel", [False, True])
def test_required_tool_choice_returns_valid_calls(tiny_server, parallel):
    reply = tiny_server.client().chat.completions.create(
        model="tiny-tools", messages=[{"role": "user", "content": "weather in Paris?"}], tools=TOOLS,
        tool_choice="required", parallel_tool_calls=parallel, max_tokens=300, temperature=1.0, seed=3)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert_valid_calls(choice.message)
    assert parallel or len(choice.message.tool_calls) == 1


def test_a_stream_holds_back_text_from_where_a_call_opens():
    functions = [{"name": "f", "parameters": {"type": "object"}}]
    auto = ToolPlan(HERMES, functions, native=True, calling=True, forced=False, parallel=True, constraint=None)
    reply = ReplyFilter(auto)
    pieces = ["Let me ", "check <", "tool", "_call>\n{\"name\": \"f\", ", "\"arguments\": {}}", "\n</tool_call>"]
    sent = [reply.push(piece) for piece in pieces]
    assert "".join(sent) == "Let me check " and sent[1] == "check "
    assert reply.finish() == ("", [ToolCall("f", {})])
    plain = ReplyFilter(auto)
    assert plain.push("a < b") == "a < b" and plain.push(" <tool") == " " and plain.finish() == ("<tool", [])
    forced = ReplyFilter(ToolPlan(HERMES, functions, True, True, True, False, None))
    assert forced.push("<tool_call>") == "" and forced.finish() == ("<tool_call>", [])


def test_named_function_is_the_one_called(tiny_server):
    for seed in range(3):
        reply = tiny_server.client().chat.completions.create(
            model="tiny-tools", messages=[{"role": "user", "content": "what time is it?"}], tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "get_time"}}, max_tokens=100, seed=seed,
            temperature=1.0)
        assert_valid_calls(reply.choices[0].message, names={"get_time"})
        assert len(reply.choices[0].message.tool_calls) == 1


def test_streamed_tool_call_deltas(tiny_server):
    stream = tiny_server.client().chat.completions.create(
        model="tiny-tools", messages=[{"role": "user", "content": "weather?"}], tools=TOOLS, tool_choice="required",
        parallel_tool_calls=False, max_tokens=200, stream=True, seed=1, temperature=1.0)
    calls, finish = {}, None
    for chunk in stream:
        choice = chunk.choices[0]
        for delta in choice.delta.tool_calls or []:
            entry = calls.setdefault(delta.index, {"name": "", "arguments": ""})
            entry["name"] += delta.function.name or ""
            entry["arguments"] += delta.function.arguments or ""
        finish = choice.finish_reason or finish
    assert finish == "tool_calls" and len(calls) == 1
    jsonschema.validate(json.loads(calls[0]["arguments"]), SCHEMAS[calls[0]["name"]])


def test_strict_auto_reply_is_text_or_valid_calls(tiny_server):
    strict = [{**tool, "function": {**tool["function"], "strict": True}} for tool in TOOLS]
    for seed in range(3):
        message = tiny_server.client().chat.completions.create(
            model="tiny-tools", messages=[{"role": "user", "content": "hi"}], tools=strict, max_tokens=60, seed=seed,
            temperature=1.0).choices[0].message
        if message.tool_calls:
            assert_valid_calls(message)
        else:
            assert not message.content.startswith("<tool_call>")


def test_tool_history_is_accepted_and_rendered(tiny_server):
    """An agent loop replays the call (content null) and the tool's result."""
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                             "arguments": '{"city": "Oslo", "days": 2}'}}
    reply = tiny_server.client().chat.completions.create(
        model="tiny-tools", tools=TOOLS, max_tokens=5, temperature=0, messages=[
            {"role": "user", "content": "weather in Oslo?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 3 degrees"}])
    assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert reply.usage.prompt_tokens > 40  # the call and its result reached the prompt


def test_response_format_json_schema_validates_on_tiny(tiny_server):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2, 3]}},
              "required": ["ok", "n"], "additionalProperties": False}
    reply = tiny_server.client().chat.completions.create(
        model="tiny-tools", messages=[{"role": "user", "content": "json"}], max_tokens=40, temperature=1.0, seed=2,
        response_format={"type": "json_schema", "json_schema": {"name": "flags", "schema": schema, "strict": True}})
    jsonschema.validate(json.loads(reply.choices[0].message.content), schema)


def test_greedy_logprobs_chat_and_completions(tiny_server):
    client = tiny_server.client()
    chat = client.chat.completions.create(model="tiny-tools", messages=[{"role": "user", "content": "hello"}],
                                          max_tokens=6, temperature=0, logprobs=True, top_logprobs=20)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 20
        assert entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
    completion = client.completions.create(model="tiny-tools", prompt="hello world", max_tokens=6, temperature=0,
                                           logprobs=3)
    logprobs = completion.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 6
    for token, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        assert max(top.values()) == pytest.approx(logprob) and top[token] == pytest.approx(logprob)
    assert "".join(logprobs.tokens) == completion.choices[0].text


def test_streamed_logprobs(tiny_server):
    stream = tiny_server.client().chat.completions.create(
        model="tiny-tools", messages=[{"role": "user", "content": "hello"}], max_tokens=8, temperature=0,
        logprobs=True, top_logprobs=2, stream=True)
    entries = [entry for chunk in stream if chunk.choices and chunk.choices[0].logprobs
               for entry in chunk.choices[0].logprobs.content]
    assert len(entries) == 8 and all(e.top_logprobs[0].token == e.token for e in entries)


def test_echo(tiny_server):
    client = tiny_server.client()
    reply = client.completions.create(model="tiny-tools", prompt="hello world", max_tokens=4, temperature=0, echo=True)
    assert reply.choices[0].text.startswith("hello world")
    with pytest.raises(openai.BadRequestError, match="echo"):
        client.completions.create(model="tiny-tools", prompt="hi", max_tokens=4, echo=True, logprobs=1)


def test_vllm_fields_pass_through_and_penalties_apply(tiny_server):
    client = tiny_server.client()
    plain = client.completions.create(model="tiny-tools", prompt="hello", max_tokens=12, temperature=0)
    penalised = client.completions.create(model="tiny-tools", prompt="hello", max_tokens=12, temperature=0,
                                          frequency_penalty=2.0, presence_penalty=2.0)
    local_plain = client.completions.create(model="tiny-tools", prompt="hello", max_tokens=12, temperature=0.7, seed=1,
                                            extra_body={"top_k": 1})
    assert local_plain.choices[0].text == plain.choices[0].text  # top_k 1 is greedy: it reached the sampler
    assert penalised.choices[0].text != plain.choices[0].text
    client.completions.create(model="tiny-tools", prompt="hello", max_tokens=2,
                              extra_body={"min_p": 0.1, "repetition_penalty": 1.3})


@pytest.mark.parametrize("body, field", [
    ({"presence_penalty": 5.0}, "presence_penalty"),
    ({"frequency_penalty": -2.5}, "frequency_penalty"),
    ({"logit_bias": {"5": 10}}, "logit_bias"),
    ({"suffix": "x"}, "suffix"),
    ({"best_of": 2}, "best_of"),
    ({"logprobs": 21}, "logprobs"),
])
def test_completion_fields_we_do_not_honour_are_refused_by_name(tiny_server, body, field):
    response = httpx.post(f"{tiny_server.url}/v1/completions", json={"prompt": "hi", "max_tokens": 2, **body})
    assert response.status_code == 400
    assert field in response.json()["error"]["message"]


@pytest.mark.parametrize("body, field", [
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"modalities": ["audio"]}, "modalities"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "nope"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
      "tools": TOOLS, "tool_choice": "required"}, "response_format"),
    ({"messages": [{"role": "user", "content": None}]}, "content"),
])
def test_chat_fields_we_do_not_honour_are_refused_by_name(tiny_server, body, field):
    payload = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **body}
    response = httpx.post(f"{tiny_server.url}/v1/chat/completions", json=payload)
    assert response.status_code == 400, response.text
    assert field in response.json()["error"]["message"]


class Color(enum.Enum):
    RED = "red"
    GREEN = "green"
    BLUE = "blue"


class City(BaseModel):
    name: str = Field(max_length=40)
    country: str = Field(max_length=40)


class Person(BaseModel):
    name: str = Field(max_length=40)
    age: int
    favourite_color: Color
    home: City
    languages: list[str] = Field(max_length=4)


class Answer(BaseModel):
    answer: bool
    reason: str = Field(max_length=120)


@pytest.mark.parametrize("schema, prompt", [
    (Person, "Invent a person: name, age, favourite color, home city and the languages they speak."),
    (City, "Name the capital of France and its country."),
    (Answer, "Is water wet? Answer with a reason."),
])
def test_parse_returns_pydantic_objects_on_the_default_model(smol_server, schema, prompt):
    completion = smol_server.client().beta.chat.completions.parse(
        model="smol", messages=[{"role": "user", "content": prompt}], response_format=schema, max_tokens=200,
        temperature=0)
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, schema)


def test_json_object_mode_on_the_default_model(smol_server):
    reply = smol_server.client().chat.completions.create(
        model="smol", messages=[{"role": "user", "content": "Give the capital of Italy as JSON."}],
        response_format={"type": "json_object"}, max_tokens=100, temperature=0)
    assert isinstance(json.loads(reply.choices[0].message.content), dict)


def test_agent_round_on_the_default_model_without_template_tools(smol_server):
    """SmolLM2's template cannot render tools: they go into the system message, and "required"
    still yields a valid call; the tool's result then leads to a plain answer."""
    client = smol_server.client()
    messages = [{"role": "user", "content": "What is the weather in Rome for 3 days?"}]
    first = client.chat.completions.create(model="smol", messages=messages, tools=TOOLS, tool_choice="required",
                                           parallel_tool_calls=False, max_tokens=120, temperature=0)
    message = first.choices[0].message
    assert_valid_calls(message)
    messages.append(message.model_dump(exclude_none=True))
    for call in message.tool_calls:
        messages.append({"role": "tool", "tool_call_id": call.id, "content": "Sunny, 24 degrees, light wind."})
    # A 135M model under "auto" keeps calling; the loop asks for the answer with tool_choice "none".
    final = client.chat.completions.create(model="smol", messages=messages, tools=TOOLS, tool_choice="none",
                                           max_tokens=60, temperature=0)
    answer = final.choices[0].message
    assert not answer.tool_calls and "24" in answer.content
