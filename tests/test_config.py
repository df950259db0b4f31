"""config.json as transformers 4 and 5 write it, read into the same typed config."""

from __future__ import annotations

import pytest

from influence_core import ModelFormatError
from influence_core.config import ModelConfig

BASE = {"vocab_size": 10, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 1, "model_type": "llama"}
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}


def test_transformers_4_rope_fields():
    config = ModelConfig.from_dict({**BASE, "rope_theta": 500000.0, "rope_scaling": LLAMA3})
    assert config.rope_theta == 500000.0 and config.rope_type == "llama3" and config.rope_scaling["factor"] == 8.0


def test_transformers_5_rope_parameters():
    config = ModelConfig.from_dict({**BASE, "rope_parameters": {**LLAMA3, "rope_theta": 500000.0}})
    assert config.rope_theta == 500000.0 and config.rope_type == "llama3" and config.rope_scaling["factor"] == 8.0
    plain = ModelConfig.from_dict({**BASE, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}})
    assert plain.rope_theta == 1e6 and plain.rope_scaling is None


def test_eos_ids_merge_config_and_generation_config():
    config = ModelConfig.from_dict({**BASE, "eos_token_id": 2}, {"eos_token_id": [7, 2], "do_sample": True,
                                                                  "temperature": 0.6})
    assert config.eos_token_ids == (7, 2) and config.generation.temperature == 0.6
    assert ModelConfig.from_dict({**BASE, "num_key_value_heads": 2}).head_dim == 4


@pytest.mark.parametrize("change, message", [
    ({"num_key_value_heads": 3}, "not a multiple"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "'yarn' is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"vocab_size": None}, "vocab_size should be a positive integer, not None"),
])
def test_unsupported_or_broken_configs_are_clear_errors(change, message):
    with pytest.raises(ModelFormatError, match=message):
        ModelConfig.from_dict({**BASE, **change})


def test_missing_required_field():
    data = dict(BASE)
    del data["hidden_size"]
    with pytest.raises(ModelFormatError, match="lacks the required field 'hidden_size'"):
        ModelConfig.from_dict(data)
