"""llguidance against xgrammar on the default model's 49k vocabulary, on CPU: grammar compile time and
the per-token cost of the token mask while a JSON-schema document is forced through, token by token.

    .venv/bin/python benchmarks/grammar_engines.py            # llguidance only
    pip install --target /tmp/xgr --no-deps xgrammar==0.2.8 apache-tvm-ffi
    PYTHONPATH=/tmp/xgr .venv/bin/python benchmarks/grammar_engines.py

xgrammar is kept out of our environment (it pulls triton and requires transformers at run time), so
it is measured from a side directory. The figures are in docs/structured-output.md.
"""

from __future__ import annotations

import json
import statistics
import time

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                    "required": ["city", "zip"], "additionalProperties": False},
        "role": {"enum": ["admin", "user", "guest"]},
    },
    "required": ["name", "age", "tags", "address", "role"],
    "additionalProperties": False,
}
DOCUMENT = json.dumps({"name": "Alice Liddell", "age": 30, "tags": ["reader", "dreamer", "explorer"],
                       "address": {"city": "Oxford", "zip": "OX1 1DP"}, "role": "guest"}, separators=(",", ":"))


def llguidance_costs(tokenizer, ids: list[int]) -> dict:
    import llguidance
    import numpy as np

    started = time.perf_counter()
    lltokenizer = llguidance.LLTokenizer(tokenizer.backend.to_str(), n_vocab=tokenizer.vocab_size,
                                         eos_token=list(tokenizer.eos_token_ids))
    tokenizer_s = time.perf_counter() - started
    started = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, defaults={"whitespace_flexible": False})
    matcher = llguidance.LLMatcher(lltokenizer, grammar)
    compile_s = time.perf_counter() - started
    mask = np.zeros((tokenizer.vocab_size + 31) // 32, dtype=np.int32)
    times = []
    for token in ids:
        started = time.perf_counter()
        matcher.unsafe_compute_mask_ptr(mask.ctypes.data, mask.nbytes)
        times.append(time.perf_counter() - started)
        assert mask[token // 32] >> (token % 32) & 1, "the document's token was masked out"
        assert matcher.consume_token(token), matcher.get_error()
    return {"tokenizer_s": tokenizer_s, "compile_s": compile_s, "mask_ms": times}


def xgrammar_costs(hf_directory, ids: list[int]) -> dict:
    import torch
    import xgrammar
    from transformers import AutoTokenizer

    started = time.perf_counter()
    info = xgrammar.TokenizerInfo.from_huggingface(AutoTokenizer.from_pretrained(hf_directory))
    compiler = xgrammar.GrammarCompiler(info)
    tokenizer_s = time.perf_counter() - started
    started = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False, separators=(",", ":"))
    matcher = xgrammar.GrammarMatcher(compiled)
    compile_s = time.perf_counter() - started
    mask = xgrammar.allocate_token_bitmask(1, info.vocab_size)
    times = []
    for token in ids:
        started = time.perf_counter()
        matcher.fill_next_token_bitmask(mask)
        times.append(time.perf_counter() - started)
        assert matcher.accept_token(token)
    del torch
    return {"tokenizer_s": tokenizer_s, "compile_s": compile_s, "mask_ms": times}


def main() -> None:
    from influence_core.api import open_default_model

    source = open_default_model()
    ids = source.tokenizer.encode(DOCUMENT, add_special_tokens=False)
    engines = {"llguidance": lambda: llguidance_costs(source.tokenizer, ids)}
    try:
        import xgrammar  # noqa: F401

        engines["xgrammar"] = lambda: xgrammar_costs(source.hf_directory, ids)
    except ImportError:
        pass
    for name, measure in engines.items():
        costs = measure()
        masks = sorted(costs["mask_ms"])
        print(json.dumps({
            "engine": name, "tokens": len(ids), "tokenizer_setup_s": round(costs["tokenizer_s"], 3),
            "schema_compile_ms": round(costs["compile_s"] * 1000, 2),
            "mask_median_us": round(statistics.median(masks) * 1e6, 1),
            "mask_p90_us": round(masks[int(len(masks) * 0.9)] * 1e6, 1), "mask_max_us": round(masks[-1] * 1e6, 1),
        }))


if __name__ == "__main__":
    main()
