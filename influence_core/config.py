"""The typed model configuration every loader produces and every architecture consumes.

It carries each config.json field that changes the math, read the way transformers reads it, so a
loader for another format (GGUF) only has to fill the same fields.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ModelFormatError

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class GenerationDefaults:
    """Sampling defaults a model ships in generation_config.json; flags given for a run win."""

    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    do_sample: bool | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationDefaults:
        return cls(**{name: data[name] for name in cls.__dataclass_fields__ if data.get(name) is not None})


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    architectures: tuple[str, ...]
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    mlp_bias: bool
    hidden_act: str
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None
    torch_dtype: str | None
    generation: GenerationDefaults = field(default_factory=GenerationDefaults)
    # The whole config.json, for architecture plugins that need fields beyond Llama's.
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def context_length(self) -> int:
        return self.max_position_embeddings

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))

    @classmethod
    def from_dict(cls, data: dict[str, Any], generation: dict[str, Any] | None = None) -> ModelConfig:
        generation = generation or {}
        # transformers 5 writes rope_theta and the scaling together as "rope_parameters".
        rope = dict(data.get("rope_parameters") or {})
        rope_theta = data.get("rope_theta") or rope.pop("rope_theta", None) or 10000.0
        rope_scaling = data.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        try:
            hidden_size = int(data["hidden_size"])
            num_heads = int(data["num_attention_heads"])
            values = dict(
                model_type=str(data.get("model_type", "")),
                architectures=tuple(data.get("architectures") or ()),
                vocab_size=int(data["vocab_size"]),
                hidden_size=hidden_size,
                intermediate_size=int(data["intermediate_size"]),
                num_hidden_layers=int(data["num_hidden_layers"]),
                num_attention_heads=num_heads,
                num_key_value_heads=int(data.get("num_key_value_heads") or num_heads),
                head_dim=int(data.get("head_dim") or hidden_size // num_heads),
                rms_norm_eps=float(data.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rope_theta),
                rope_scaling=rope_scaling,
                max_position_embeddings=int(data.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(data.get("tie_word_embeddings", False)),
                attention_bias=bool(data.get("attention_bias", False)),
                mlp_bias=bool(data.get("mlp_bias", False)),
                hidden_act=str(data.get("hidden_act", "silu")),
                bos_token_id=_first_id(generation.get("bos_token_id", data.get("bos_token_id"))),
                eos_token_ids=_merge_ids(generation.get("eos_token_id"), data.get("eos_token_id")),
                pad_token_id=_first_id(generation.get("pad_token_id", data.get("pad_token_id"))),
                torch_dtype=data.get("torch_dtype") or data.get("dtype"),
                generation=GenerationDefaults.from_dict(generation),
                raw=dict(data),
            )
        except KeyError as missing:
            raise ModelFormatError(f"config.json lacks the required field {missing}") from None
        except (TypeError, ValueError) as bad:
            raise ModelFormatError(f"config.json has an invalid value: {bad}") from None
        config = cls(**values)
        config.validate()
        return config

    @classmethod
    def from_dir(cls, directory: Path) -> ModelConfig:
        config_path = directory / "config.json"
        data = _read_json(config_path)
        generation_path = directory / "generation_config.json"
        generation = _read_json(generation_path) if generation_path.exists() else None
        return cls.from_dict(data, generation)

    def validate(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelFormatError(
                f"num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ModelFormatError(
                f"rope_scaling type {self.rope_type!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
            )
        if self.hidden_act not in ("silu", "swish"):
            raise ModelFormatError(f"hidden_act {self.hidden_act!r} is not supported (supported: silu)")

    def to_hf_dict(self) -> dict[str, Any]:
        """config.json as transformers writes it, for converted models."""
        data = dict(self.raw)
        data.update(
            model_type=self.model_type,
            architectures=list(self.architectures),
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            rope_scaling=self.rope_scaling,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
            attention_bias=self.attention_bias,
            mlp_bias=self.mlp_bias,
            hidden_act=self.hidden_act,
            bos_token_id=self.bos_token_id,
            eos_token_id=list(self.eos_token_ids) if len(self.eos_token_ids) != 1 else self.eos_token_ids[0],
            pad_token_id=self.pad_token_id,
        )
        return data


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelFormatError(f"{path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as bad:
        raise ModelFormatError(f"{path} is not valid JSON: {bad}") from None
    if not isinstance(data, dict):
        raise ModelFormatError(f"{path} does not hold a JSON object")
    return data


def _first_id(value: Any) -> int | None:
    if isinstance(value, list):
        return int(value[0]) if value else None
    return None if value is None else int(value)


def _merge_ids(*values: Any) -> tuple[int, ...]:
    ids: list[int] = []
    for value in values:
        for token_id in value if isinstance(value, list) else [value]:
            if token_id is not None and int(token_id) not in ids:
                ids.append(int(token_id))
    return tuple(ids)
