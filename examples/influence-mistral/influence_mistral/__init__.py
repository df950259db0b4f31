"""Plugin ``mistral``: Mistral models on Influence's torch backend.

Mistral is Llama without biases and with sliding-window attention: each position attends to at
most ``sliding_window`` positions (itself included), as config.json says; the torch Llama honours
the window both in the attention mask and in which KV-cache entries it reads. Configs with
``"sliding_window": null`` (Mistral 7B v0.2 on) attend to the whole context. torch is imported only
when a model is built, so listing plugins stays instant.
"""

from __future__ import annotations

from typing import Any

from influence_core import hookimpl
from influence_core.config import ModelConfig
from influence_core.interfaces import Architecture, Weights

influence_hookspec_version = "1.0"


def build(config: ModelConfig, weights: Weights, device: str, dtype: str) -> Any:
    from influence_torch import LlamaVariant, build_llama

    window = config.raw.get("sliding_window")
    variant = LlamaVariant(qkv_bias=False, output_bias=False, sliding_window=int(window) if window else None)
    return build_llama(config, weights, device, dtype, variant=variant)


@hookimpl
def register_architectures(register) -> None:
    register(Architecture(
        name="mistral", backend="torch", model_types=("mistral",), class_names=("MistralForCausalLM",),
        build=build, description="Mistral 7B and other Mistral-architecture models (sliding-window attention)",
    ))
