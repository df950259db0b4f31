"""Constrained decoding (the grammar plugin), penalties and logprobs, through the Python API and the
CLI, on tiny random models: constraints make even a random model's output valid."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

import influence_core as influence
from influence_core import Constraint, SamplingError
from influence_core.batching import BatchEngine

from cli_helpers import assert_one_error_line, invoke

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"], "additionalProperties": False},
    },
    "required": ["name", "age", "role", "tags", "address"],
    "additionalProperties": False,
}
FLAGS = {"type": "object", "properties": {"ok": {"type": "boolean"}, "level": {"enum": [1, 2, 3]}},
         "required": ["ok", "level"], "additionalProperties": False}


@pytest.fixture(scope="module")
def tiny(tiny_model):
    return influence.load(tiny_model, device="cpu", max_batch=4)


@pytest.mark.parametrize("schema", [PERSON, FLAGS], ids=["nested", "flags"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_json_schema_output_validates(tiny, schema, seed):
    result = tiny.generate("hello", raw=True, response_format=schema, max_tokens=200, temperature=1.0, seed=seed)
    assert result.finish_reason == "eos"  # the grammar ends the text once it is complete
    jsonschema.validate(json.loads(result.text), schema)


def test_pydantic_model_as_response_format(tiny):
    from pydantic import BaseModel, Field

    class Point(BaseModel):
        x: int = Field(ge=-5, le=5)
        y: int = Field(ge=-5, le=5)
        label: str = Field(max_length=8)

    result = tiny.generate("hello", raw=True, response_format=Point, max_tokens=100, temperature=0)
    assert isinstance(Point.model_validate_json(result.text), Point)


def test_json_object_mode_gives_an_object(tiny):
    result = tiny.generate("hello", raw=True, response_format="json", max_tokens=120, temperature=0)
    if result.finish_reason == "eos":
        assert isinstance(json.loads(result.text), dict)
    else:  # a random model may nest without end; what there is still opens an object
        assert result.text.startswith("{")


def test_regex_and_gbnf_grammar(tiny):
    regex = tiny.generate("hello", raw=True, response_format=Constraint.regex(r"[0-9]{3}-(cat|dog)"), temperature=1.0,
                          seed=3, max_tokens=20)
    assert re.fullmatch(r"[0-9]{3}-(cat|dog)", regex.text) and regex.finish_reason == "eos"
    gbnf = 'root ::= answer " " answer\nanswer ::= "yes" | "no"'
    grammar = tiny.generate("hello", raw=True, response_format=Constraint.grammar(gbnf), temperature=1.0, seed=4,
                            max_tokens=20)
    assert re.fullmatch(r"(yes|no) (yes|no)", grammar.text)


def test_eos_is_refused_before_the_grammar_is_complete_and_forced_after(tiny):
    eos = set(tiny.config.eos_token_ids) | set(tiny.tokenizer.eos_token_ids)
    generation = tiny.new_generation("hello", raw=True, response_format=Constraint.regex("ab"), max_tokens=10)
    mask = generation.chain.processors[0]
    history = torch.tensor(generation.prompt_ids)
    context = influence.interfaces.SamplingContext(history, None, prompt_length=len(generation.prompt_ids))
    first = mask(torch.zeros(tiny.config.vocab_size), context)
    assert all(first[e] == float("-inf") for e in eos)
    done = torch.cat([history, torch.tensor(tiny.tokenizer.encode("ab", add_special_tokens=False))])
    last = mask(torch.zeros(tiny.config.vocab_size), influence.interfaces.SamplingContext(
        done, None, prompt_length=len(generation.prompt_ids)))
    assert {int(i) for i in torch.nonzero(last > float("-inf"))} <= eos and any(last[e] == 0 for e in eos)


def test_invalid_constraints_are_refused(tiny):
    with pytest.raises(SamplingError, match="regex"):
        tiny.new_generation("hello", response_format=Constraint.regex("[0-9"))
    with pytest.raises(SamplingError, match="GBNF"):
        tiny.new_generation("hello", response_format=Constraint.grammar("root ::= ("))
    with pytest.raises(influence.InfluenceError, match="response_format"):
        tiny.new_generation("hello", response_format=42)


def test_batch_of_constrained_and_free_generations(tiny):
    """Each row of a batched decode keeps its own grammar state; free rows are untouched."""
    free_alone = tiny.generate("hello world", raw=True, max_tokens=12, temperature=0)
    generations = [tiny.new_generation("hello", raw=True, response_format=FLAGS, max_tokens=60, temperature=1.0, seed=1),
                   tiny.new_generation("hello world", raw=True, max_tokens=12, temperature=0),
                   tiny.new_generation("the quick", raw=True, response_format=PERSON, max_tokens=200, temperature=1.0,
                                       seed=2),
                   tiny.new_generation("hello", raw=True, response_format=Constraint.regex("[a-c]{4}"), max_tokens=10)]
    engine = BatchEngine(tiny.runner, max_queue=4)
    jobs = [engine.submit(generation) for generation in generations]
    tiny.cache.token_ids = []
    engine.run_until_idle()
    results = [job.result for job in jobs]
    jsonschema.validate(json.loads(results[0].text), FLAGS)
    assert results[1].token_ids == free_alone.token_ids
    jsonschema.validate(json.loads(results[2].text), PERSON)
    assert re.fullmatch("[a-c]{4}", results[3].text)


def test_constrained_generate_batch(tiny):
    results = tiny.generate_batch(["hello", "the quick", "Rust"], raw=True, response_format=FLAGS, max_tokens=60,
                                  temperature=1.0, seed=5)
    for result in results:
        jsonschema.validate(json.loads(result.text), FLAGS)


def test_greedy_logprobs_put_the_chosen_token_on_top(tiny):
    result = tiny.generate("hello", raw=True, max_tokens=8, temperature=0, logprobs=5)
    assert len(result.logprobs) == len(result.token_ids)
    for entry, token in zip(result.logprobs, result.token_ids):
        assert entry.token_id == token and len(entry.top) == 5
        assert entry.top[0][0] == token and entry.top[0][1] == pytest.approx(entry.logprob)
        assert entry.logprob <= 0


def test_constrained_logprobs_leave_masked_tokens_out(tiny):
    result = tiny.generate("hello", raw=True, max_tokens=5, temperature=0, logprobs=20,
                           response_format=Constraint.regex("(a|b)c"))
    first = result.logprobs[0]
    assert {tiny.tokenizer.decode([i]) for i, _ in first.top} <= {"a", "b", "ac", "bc"}
    assert sum(torch.tensor([lp for _, lp in first.top]).exp()) == pytest.approx(1.0, abs=1e-4)


def test_presence_and_frequency_penalties(tiny):
    from influence_samplers import frequency_penalty, presence_penalty

    history = torch.tensor([7, 1, 2, 2, 3])  # the prompt is [7]; the output is 1, 2, 2, 3
    context = influence.interfaces.SamplingContext(history, None, prompt_length=1)
    logits = torch.zeros(10)
    assert frequency_penalty(0.5)(logits, context).tolist() == [0, -0.5, -1.0, -0.5, 0, 0, 0, 0, 0, 0]
    assert presence_penalty(-1.0)(logits, context).tolist() == [0, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    with pytest.raises(SamplingError, match=r"\[-2, 2\]"):
        presence_penalty(5.0)
    with pytest.raises(SamplingError, match="frequency_penalty"):
        tiny.new_generation("hello", frequency_penalty=2.5)
    penalised = tiny.generate("hello", raw=True, max_tokens=20, temperature=0, frequency_penalty=2.0)
    plain = tiny.generate("hello", raw=True, max_tokens=20, temperature=0)
    assert len(set(penalised.token_ids)) >= len(set(plain.token_ids))


def test_onnx_backend_is_constrained_too(tiny_model, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    monkeypatch.setenv("INFLUENCE_HOME", str(tmp_path / "home"))
    model = influence.load(tiny_model, backend="onnx", device="cpu")
    result = model.generate("hello", raw=True, response_format=PERSON, max_tokens=200, temperature=1.0, seed=7)
    jsonschema.validate(json.loads(result.text), PERSON)


def test_cli_constraint_flags(capsys, tiny_model, tmp_path):
    schema = tmp_path / "flags.json"
    schema.write_text(json.dumps(FLAGS))
    for flags in (["--json-schema", str(schema)], ["--format", str(schema)]):
        code, out, err = invoke(capsys, "generate", "hello", "-p", str(tiny_model), "--raw", "--max-tokens", "60",
                                "--temperature", "1", "--seed", "2", *flags)
        assert code == 0, err
        jsonschema.validate(json.loads(out), FLAGS)
    code, out, err = invoke(capsys, "generate", "hello", "-p", str(tiny_model), "--raw", "--regex", "[xyz]{5}",
                            "--json")
    assert code == 0, err
    assert re.fullmatch("[xyz]{5}", json.loads(out)["text"])
    grammar = tmp_path / "answer.gbnf"
    grammar.write_text('root ::= "left" | "right"\n')
    code, out, err = invoke(capsys, "generate", "hello", "-p", str(tiny_model), "--raw", "--grammar", str(grammar))
    assert code == 0 and out.strip() in ("left", "right")
    code, out, err = invoke(capsys, "generate", "hello", "-p", str(tiny_model), "--format", "json", "--raw",
                            "--max-tokens", "200")
    assert code == 0 and out.startswith("{")


@pytest.mark.parametrize("flags, message", [
    (["--format", "yaml"], "--format takes 'json' or a JSON schema file"),
    (["--regex", "a", "--format", "json"], "give one of --format, --regex"),
    (["--regex", "[0-9"], "the regex cannot be used"),
    (["--json-schema", "missing.json"], "cannot read missing.json"),
])
def test_cli_constraint_errors(capsys, tiny_model, flags, message):
    code, out, err = invoke(capsys, "generate", "hello", "-p", str(tiny_model), "--raw", *flags)
    assert_one_error_line(code, err, message)


def test_hermes_tool_parser():
    from influence_grammar import HERMES

    content, calls = HERMES.parse('Let me look. <tool_call>\n{"name": "f", "arguments": {"a": {"b": [1]}}}\n</tool_call>'
                                  '<tool_call>{"name": "g", "arguments": {}}</tool_call>')
    assert content == "Let me look." and [(c.name, c.arguments) for c in calls] == [("f", {"a": {"b": [1]}}), ("g", {})]
    assert HERMES.parse("no calls here") == ("no calls here", [])
    assert HERMES.parse("<tool_call>{broken</tool_call>") == ("<tool_call>{broken</tool_call>", [])


def test_tool_parser_registry_takes_a_third_party_format(plugin):
    from influence_core.interfaces import ToolParser
    from influence_core.plugins import get_registry

    mistral = ToolParser("mistral-like", lambda template: "[TOOL_CALLS]" in template, lambda text: (text, []),
                         lambda functions, parallel, optional: None, lambda functions: "", lambda call: "",
                         "[TOOL_CALLS]")

    class Plugin:
        influence_hookspec_version = "1.1"

        @influence.hookimpl
        def register_tool_parsers(self, register):
            register(mistral)

    plugin(Plugin(), "mistral-like-tools")
    registry = get_registry()
    assert registry.tool_parser_for("{{ '[TOOL_CALLS]' }}").name == "mistral-like"
    assert registry.tool_parser_for("{{ messages }}").name == "hermes"


def test_grammar_plugin_is_listed(capsys):
    code, out, _ = invoke(capsys, "plugins", "--json")
    provides = {p["name"]: p["provides"] for p in json.loads(out)}
    assert "sampler:grammar" in provides["grammar"] and "tool_parser:hermes" in provides["grammar"]
