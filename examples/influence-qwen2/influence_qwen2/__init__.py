"""Plugin ``qwen2``: Qwen2 and Qwen2.5 models on Influence's torch backend.

Qwen2 is Llama with biases on the query, key and value projections and none on the attention
output, so the torch backend's Llama builds it, given that `LlamaVariant`. Its other settings (RoPE
theta, RMSNorm epsilon, tied or untied embeddings) are config.json fields the Llama already reads.
torch is imported only when a model is built, so listing plugins stays instant.
"""

from __future__ import annotations

from typing import Any

from influence_core import hookimpl
from influence_core.config import ModelConfig
from influence_core.errors import ModelFormatError
from influence_core.interfaces import Architecture, Weights

influence_hookspec_version = "1.0"


def sliding_window(config: ModelConfig) -> int | None:
    """The attention window of every layer, or None for full attention.

    A Qwen2 config can turn on sliding-window attention (``use_sliding_window``) for the layers
    from ``max_window_layers`` on (or as listed in ``layer_types``, as transformers writes it now).
    The torch Llama slides all layers or none, so a model that mixes the two is refused.
    """
    raw = config.raw
    window = raw.get("sliding_window") if raw.get("use_sliding_window") else None
    if window is None:
        return None
    first_sliding = int(raw.get("max_window_layers", 28))  # transformers' default
    layer_types = raw.get("layer_types") or [
        "sliding_attention" if layer >= first_sliding else "full_attention"
        for layer in range(config.num_hidden_layers)
    ]
    sliding = layer_types.count("sliding_attention")
    if sliding == 0:
        return None
    if sliding == config.num_hidden_layers:
        return int(window)
    raise ModelFormatError(
        f"this Qwen2 model uses sliding-window attention on {sliding} of its {config.num_hidden_layers} layers "
        "(use_sliding_window with max_window_layers or layer_types); influence-qwen2 supports a window "
        "on every layer or on none"
    )


def build(config: ModelConfig, weights: Weights, device: str, dtype: str) -> Any:
    from influence_torch import LlamaVariant, build_llama

    variant = LlamaVariant(qkv_bias=True, output_bias=False, sliding_window=sliding_window(config))
    return build_llama(config, weights, device, dtype, variant=variant)


@hookimpl
def register_architectures(register) -> None:
    register(Architecture(
        name="qwen2", backend="torch", model_types=("qwen2",), class_names=("Qwen2ForCausalLM",), build=build,
        description="Qwen2 and Qwen2.5 (q/k/v biases; sliding-window attention on every layer or none)",
    ))
