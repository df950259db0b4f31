"""Chat templates come with model files: hostile ones fail fast with one line, real ones render as before."""

from __future__ import annotations

import time

import pytest
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from influence_core.errors import InfluenceError
from influence_core.tokenizer import MAX_TEMPLATE_SECONDS, Tokenizer

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is Rust?"},
            {"role": "assistant", "content": "A language."}, {"role": "user", "content": "Say more."}]

# Features real templates use (transformers' Llama 3 / Qwen 2.5 style): namespace, loop.first and
# loop.last, a filtered loop, tojson, string methods, slicing, macros, a recursive loop and loop controls.
REALISTIC = """
{%- set ns = namespace(system='', count=0) -%}
{%- macro render(message) -%}<|{{ message.role }}|>{{ message.content | trim }}{%- endmacro -%}
{%- for message in messages if message.role == 'system' -%}{% set ns.system = message.content %}{%- endfor -%}
{{ bos_token }}{% if ns.system %}{{ '<|system|>' + ns.system ~ '\\n' }}{% endif %}
{%- for message in messages[1:] -%}
  {%- if message.role not in ['user', 'assistant'] %}{{ raise_exception('bad role') }}{% endif -%}
  {%- set ns.count = ns.count + 1 -%}
  {{ render(message) }}{% if not loop.last %}{{ eos_token }}{% endif %}{{ loop.index ~ '/' ~ loop.length }}
  {%- if message.content.startswith('Say') %}{% continue %}{% endif -%}
  {{ {'n': ns.count, 'role': message.role} | tojson }}
{%- endfor -%}
{%- for item in [[1, [2, 3]], 4] recursive %}{% if item is iterable %}[{{ loop(item) }}]{% else %}{{ item }}{% endif %}
{%- endfor -%}
{{ '%s-%d' % ('done', 3) }}{{ 'x' * 3 }}{{ '{}!'.format('ok') }}{{ messages | map(attribute='role') | join(',') }}
{%- if add_generation_prompt %}<|assistant|>{% endif %}
"""


def tokenizer(template: str) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import WordLevel

    return Tokenizer(HFTokenizer(WordLevel({"<s>": 0, "</s>": 1}, unk_token="<s>")), bos_token_id=0,
                     eos_token_ids=[1], chat_template=template)


def unlimited(template: str) -> str:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["raise_exception"] = lambda message: None
    return env.from_string(template).render(messages=MESSAGES, add_generation_prompt=True, bos_token="<s>",
                                            eos_token="</s>")


def test_a_realistic_template_renders_exactly_as_without_limits():
    rendered = tokenizer(REALISTIC).apply_chat_template(MESSAGES)
    assert rendered == unlimited(REALISTIC)
    assert "<|system|>You are terse." in rendered and "[1[23]]4" in rendered and "done-3xxxok!" in rendered


def test_a_long_conversation_still_renders():
    long = [{"role": "user" if i % 2 else "assistant", "content": f"turn {i}"} for i in range(5000)]
    template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content + '\\n' }}{% endfor %}"
    assert tokenizer(template).apply_chat_template(long).count("\n") == 5000


BOMBS = {
    "string repeated": ("{{ 'A' * 100000000 }}", "would build a result of length 100000000"),
    "repeated the other way": ("{{ 100000000 * 'A' }}", "would build a result of length 100000000"),
    "list repeated": ("{{ ([0] * 1000000000) | length }}", "would build a result of length 1000000000"),
    "nested ranges": ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
                      "steps (loop iterations and calls)"),
    "nested ranges writing": ("{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
                              "steps (loop iterations and calls)"),
    "nested string loops": ("{% for c in 'A' * 100000 %}{% for d in 'A' * 100000 %}{% endfor %}{% endfor %}",
                            "steps (loop iterations and calls)"),
    "doubling with ~": ("{% set ns = namespace(s='A') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
                        "{% endfor %}{{ ns.s }}", "past the limit of"),
    "doubling with +": ("{% set ns = namespace(s='A') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}"
                        "{% endfor %}", "past the limit of"),
    "doubling without a loop": ("{% set a = 'A' * 1000000 %}" + "{% set a = a ~ a %}" * 40, "past the limit of"),
    "huge power": ("{{ 2 ** 100000000 }}", "an integer of more than"),
    "center": ("{{ 'A' | center(1000000000) }}", "center() would build"),
    "ljust": ("{{ 'A'.ljust(1000000000) }}", "ljust() would build"),
    "format width": ("{{ '{:>1000000000}'.format('a') }}", "a format with that width"),
    "percent width": ("{{ '%1000000000s' % 'a' }}", "a % format with that width"),
    "nested format width": ("{{ '{:>{w}}'.format('a', w=1000000000) }}", "a format with that width"),
    "starred percent width": ("{{ '%*s' % (1000000000, 'a') }}", "a % format with that width"),
    "format filter width": ("{{ '%1000000000s' | format('a') }}", "a format with that width"),
    "replace": ("{{ ('A' * 1000000).replace('A', 'B' * 1000) }}", "replace() would build"),
    "replace filter": ("{{ ('A' * 1000000) | replace('A', 'B' * 1000) }}", "replace() would build"),
    "join filter": ("{{ ('A' * 1000000) | join('B' * 1000) }}", "join() would build"),
    "join method": ("{{ ('B' * 1000).join('A' * 1000000) }}", "join() would build"),
    "indent": ("{{ ('\\n' * 1000000) | indent(1000) }}", "indent() would build"),
    "expandtabs": ("{{ ('\\t' * 1000000).expandtabs(1000) }}", "expandtabs() would build"),
    "exponential macro": ("{% macro f(n) %}{% if n %}{{ f(n-1) }}{{ f(n-1) }}{% endif %}{% endmacro %}{{ f(40) }}",
                          ""),
    "recursive loop": ("{% for x in [1] recursive %}{{ loop(range(100000)) }}{% endfor %}", ""),
}


@pytest.mark.parametrize("template, message", BOMBS.values(), ids=BOMBS.keys())
def test_a_hostile_template_fails_fast_with_one_line(template, message):
    started = time.perf_counter()
    with pytest.raises(InfluenceError) as refused:
        tokenizer(template).apply_chat_template(MESSAGES)
    elapsed = time.perf_counter() - started
    text = str(refused.value)
    assert text.startswith("the model's chat template failed: ") and message in text and "\n" not in text
    assert elapsed < MAX_TEMPLATE_SECONDS + 0.5, f"{elapsed:.2f} s"


def test_the_limits_are_per_rendering():
    template = "{% for i in range(100000) %}{% endfor %}ok"  # half the step budget
    chat = tokenizer(template)
    assert [chat.apply_chat_template(MESSAGES) for _ in range(3)] == ["ok"] * 3
