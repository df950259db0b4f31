"""`influence perplexity`: llama-perplexity's chunks, checked against transformers' own logits."""

from __future__ import annotations

import json
import math

import pytest
import torch
from cli_helpers import assert_one_error_line, invoke
from tiny_models import TRAINING_TEXT

import influence_core as influence
from influence_bench.perplexity import chunks, measure

TEXT = " ".join(TRAINING_TEXT[:12])
CONTEXT = 32


def transformers_perplexity(model_dir, token_ids: list[int], context: int, bos: int) -> float:
    """The same chunks scored directly from transformers' logits."""
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    nll, count = 0.0, 0
    for start in range(0, len(token_ids) - context + 1, context):
        chunk = [bos] + token_ids[start + 1:start + context]
        with torch.no_grad():
            logits = reference(torch.tensor([chunk])).logits[0].double()
        for position in range(context // 2, context - 1):
            nll -= torch.log_softmax(logits[position], -1)[chunk[position + 1]].item()
            count += 1
    return math.exp(nll / count)


def test_perplexity_equals_transformers_computed_directly(tiny_model):
    model = influence.load(tiny_model, dtype="float32")
    ids = model.tokenizer.encode(TEXT, add_special_tokens=False)
    result = measure(model, TEXT, CONTEXT)
    assert result.chunks == len(ids) // CONTEXT and result.tokens == result.chunks * (CONTEXT // 2 - 1)
    expected = transformers_perplexity(tiny_model, ids, CONTEXT, model.tokenizer.bos_token_id)
    assert result.perplexity == pytest.approx(expected, rel=1e-5)


def test_against_itself_there_is_no_divergence_and_against_int4_some(tiny_model):
    model = influence.load(tiny_model, dtype="float32")
    same = measure(model, TEXT, CONTEXT, reference=influence.load(tiny_model, dtype="float32"))
    assert same.kl_divergence == pytest.approx(0, abs=1e-9) and same.top1_agreement == 1
    assert same.reference_perplexity == pytest.approx(same.perplexity)
    int4 = measure(influence.load(tiny_model, dtype="int4"), TEXT, CONTEXT, reference=model)
    assert int4.kl_divergence > 0 and 0 < int4.top1_agreement <= 1
    assert int4.reference_perplexity == pytest.approx(same.perplexity)


def test_chunks_start_with_bos_and_drop_the_remainder():
    assert chunks(list(range(10, 21)), 4, bos_token_id=1) == [[1, 11, 12, 13], [1, 15, 16, 17]]
    assert chunks(list(range(10, 18)), 4, bos_token_id=None) == [[10, 11, 12, 13], [14, 15, 16, 17]]


def test_cli_json_has_perplexity_kl_and_agreement(tiny_model, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    code, out, err = invoke(capsys, "perplexity", str(text), "-p", str(tiny_model), "--dtype", "int8",
                            "--context", str(CONTEXT), "--against", "float32", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert {"perplexity", "kl_divergence", "top1_agreement", "reference_perplexity"} <= set(result)
    assert result["dtype"] == "int8" and result["against"] == "float32"


def test_cli_refuses_a_text_shorter_than_one_chunk_and_a_missing_file(tiny_model, tmp_path, capsys):
    text = tmp_path / "short.txt"
    text.write_text("hello world", encoding="utf-8")
    code, _, err = invoke(capsys, "perplexity", str(text), "-p", str(tiny_model), "--context", "512")
    assert_one_error_line(code, err, "fewer than one chunk of --context 512")
    code, _, err = invoke(capsys, "perplexity", str(tmp_path / "absent.txt"), "-p", str(tiny_model))
    assert_one_error_line(code, err, "cannot read")
