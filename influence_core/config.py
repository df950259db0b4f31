"""The typed model configuration every loader produces and every architecture consumes.

It carries each config.json field that changes the math, read the way transformers reads it, so a
loader for another format (GGUF) only has to fill the same fields.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ModelFormatError

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
# Far beyond any released model (the largest have 16k hidden, 256k vocabularies, 126 layers, 10M
# positions), near enough that a corrupt value is refused before anything is sized by it.
SIZE_LIMITS = {
    "vocab_size": 1 << 22,
    "hidden_size": 1 << 17,
    "intermediate_size": 1 << 20,
    "num_hidden_layers": 1 << 12,
    "num_attention_heads": 1 << 12,
    "num_key_value_heads": 1 << 12,
    "head_dim": 1 << 12,
    "max_position_embeddings": 1 << 24,
}
LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.")


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
        values = {name: data[name] for name in cls.__dataclass_fields__ if data.get(name) is not None}
        for name, value in values.items():
            wanted = bool if name == "do_sample" else (int, float)
            if not isinstance(value, wanted) or (name != "do_sample" and isinstance(value, bool)):
                raise ModelFormatError(f"generation_config.json: {name} should be "
                                       f"{'true or false' if name == 'do_sample' else 'a number'}, not {value!r}")
        return cls(**values)


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
        if not isinstance(generation, dict):
            raise ModelFormatError("generation_config.json does not hold a JSON object")
        # transformers 5 writes rope_theta and the scaling together as "rope_parameters".
        rope = data.get("rope_parameters") or {}
        if not isinstance(rope, dict):
            raise ModelFormatError(f"config.json: rope_parameters should be an object, not {rope!r}")
        rope = dict(rope)
        nested_theta = rope.pop("rope_theta", None)
        rope_theta = next((theta for theta in (data.get("rope_theta"), nested_theta) if theta is not None), 10000.0)
        rope_scaling = data.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        if rope_scaling is not None and not isinstance(rope_scaling, dict):
            raise ModelFormatError(f"config.json: rope_scaling should be an object, not {rope_scaling!r}")
        hidden_size = _size(data, "hidden_size")
        num_heads = _size(data, "num_attention_heads")
        head_dim = _size(data, "head_dim", None)
        if head_dim is None:
            if hidden_size % num_heads:
                raise ModelFormatError(f"config.json: hidden_size ({hidden_size}) is not a multiple of "
                                       f"num_attention_heads ({num_heads})")
            head_dim = hidden_size // num_heads
        values = dict(
            model_type=str(data.get("model_type", "")),
            architectures=tuple(str(name) for name in _list(data.get("architectures") or (), "architectures")),
            vocab_size=_size(data, "vocab_size"),
            hidden_size=hidden_size,
            intermediate_size=_size(data, "intermediate_size"),
            num_hidden_layers=_size(data, "num_hidden_layers"),
            num_attention_heads=num_heads,
            num_key_value_heads=_size(data, "num_key_value_heads", num_heads),
            head_dim=head_dim,
            rms_norm_eps=_real("rms_norm_eps", data.get("rms_norm_eps", 1e-6)),
            rope_theta=_real("rope_theta", rope_theta),
            rope_scaling=dict(rope_scaling) if rope_scaling else None,
            max_position_embeddings=_size(data, "max_position_embeddings", 2048),
            tie_word_embeddings=_flag(data, "tie_word_embeddings"),
            attention_bias=_flag(data, "attention_bias"),
            mlp_bias=_flag(data, "mlp_bias"),
            hidden_act=str(data.get("hidden_act", "silu")),
            bos_token_id=_first_id("bos_token_id", generation.get("bos_token_id", data.get("bos_token_id"))),
            eos_token_ids=_merge_ids(generation.get("eos_token_id"), data.get("eos_token_id")),
            pad_token_id=_first_id("pad_token_id", generation.get("pad_token_id", data.get("pad_token_id"))),
            torch_dtype=data.get("torch_dtype") or data.get("dtype"),
            generation=GenerationDefaults.from_dict(generation),
            raw=dict(data),
        )
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
        """Refuse what no model can be: every size within bounds, heads that divide evenly, positive
        finite norms and rope parameters, special token ids inside the vocabulary."""
        for name, limit in SIZE_LIMITS.items():
            value = getattr(self, name)
            if value > limit:
                raise ModelFormatError(f"{name} is {value}, beyond the {limit} of any real model (a corrupt config?)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelFormatError(
                f"num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ModelFormatError(f"head_dim {self.head_dim} is odd; rotary embeddings rotate pairs of dimensions")
        if not 0 < self.rms_norm_eps < 1:
            raise ModelFormatError(f"rms_norm_eps should be a small positive number, not {self.rms_norm_eps}")
        if not 1 < self.rope_theta < math.inf:
            raise ModelFormatError(f"rope_theta should be a finite number above 1, not {self.rope_theta}")
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ModelFormatError(
                f"rope_scaling type {self.rope_type!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
            )
        self._validate_rope_scaling()
        if self.hidden_act not in ("silu", "swish"):
            raise ModelFormatError(f"hidden_act {self.hidden_act!r} is not supported (supported: silu)")
        for name, token_id in [("bos_token_id", self.bos_token_id), ("pad_token_id", self.pad_token_id),
                               *(("eos_token_id", token_id) for token_id in self.eos_token_ids)]:
            if token_id is not None and not 0 <= token_id < self.vocab_size:
                raise ModelFormatError(f"{name} {token_id} is outside the vocabulary of {self.vocab_size} tokens")

    def _validate_rope_scaling(self) -> None:
        scaling = self.rope_scaling or {}
        if self.rope_type in ("linear", "llama3"):
            factor = _real("rope_scaling factor", scaling.get("factor"))
            if factor < 1:
                raise ModelFormatError(f"rope_scaling factor should be at least 1, not {factor}")
        if self.rope_type == "llama3":
            low = _real("rope_scaling low_freq_factor", scaling.get("low_freq_factor"))
            high = _real("rope_scaling high_freq_factor", scaling.get("high_freq_factor"))
            original = _real("rope_scaling original_max_position_embeddings",
                             scaling.get("original_max_position_embeddings"))
            if not 0 < low < high:
                raise ModelFormatError(f"rope_scaling needs 0 < low_freq_factor < high_freq_factor, not {low} and {high}")
            if original < 1:
                raise ModelFormatError(f"rope_scaling original_max_position_embeddings should be positive, not {original}")

    def check_tensors(self, shapes: dict[str, tuple[int, ...]], source: str) -> None:
        """Refuse a checkpoint whose Llama-named tensors disagree with this config: layers beyond or
        short of num_hidden_layers, or a tensor whose shape is not the one the config implies.
        Names outside Hugging Face's Llama layout are left to the architecture that reads them."""
        layers = {int(match.group(1)) for name in shapes if (match := LAYER_NAME.match(name))}
        if layers and (max(layers) >= self.num_hidden_layers or len(layers) != self.num_hidden_layers):
            raise ModelFormatError(f"{source}: the config says {self.num_hidden_layers} layers, but the weights "
                                   f"hold {len(layers)} (numbered {min(layers)} to {max(layers)})")
        expected = self.llama_tensor_shapes()
        for name, shape in shapes.items():
            generic = LAYER_NAME.sub("model.layers.N.", name, count=1)
            want = expected.get(generic)
            if want is not None and tuple(shape) != want:
                hint = " (transposed?)" if tuple(shape) == want[::-1] else ""
                raise ModelFormatError(f"{source}: tensor {name!r} has shape {tuple(shape)}, but the config "
                                       f"implies {want}{hint}")

    def llama_tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape of each tensor in Hugging Face's Llama layout; layers appear as ``model.layers.N``."""
        hidden, inner = self.hidden_size, self.intermediate_size
        q_rows, kv_rows = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        layer = {
            "input_layernorm.weight": (hidden,), "post_attention_layernorm.weight": (hidden,),
            "self_attn.q_proj.weight": (q_rows, hidden), "self_attn.q_proj.bias": (q_rows,),
            "self_attn.k_proj.weight": (kv_rows, hidden), "self_attn.k_proj.bias": (kv_rows,),
            "self_attn.v_proj.weight": (kv_rows, hidden), "self_attn.v_proj.bias": (kv_rows,),
            "self_attn.o_proj.weight": (hidden, q_rows), "self_attn.o_proj.bias": (hidden,),
            "mlp.gate_proj.weight": (inner, hidden), "mlp.gate_proj.bias": (inner,),
            "mlp.up_proj.weight": (inner, hidden), "mlp.up_proj.bias": (inner,),
            "mlp.down_proj.weight": (hidden, inner), "mlp.down_proj.bias": (hidden,),
        }
        return {
            "model.embed_tokens.weight": (self.vocab_size, hidden),
            "lm_head.weight": (self.vocab_size, hidden),
            "model.norm.weight": (hidden,),
            **{f"model.layers.N.{name}": shape for name, shape in layer.items()},
        }

    def parameter_count(self) -> int:
        """Parameters of a Llama-family model, counted from its config (no weights are read)."""
        hidden, heads, kv_heads = self.hidden_size, self.num_attention_heads, self.num_key_value_heads
        q_size, kv_size = heads * self.head_dim, kv_heads * self.head_dim
        attention = hidden * q_size + 2 * hidden * kv_size + q_size * hidden
        if self.attention_bias:
            attention += q_size + 2 * kv_size + hidden
        mlp = 3 * hidden * self.intermediate_size
        if self.mlp_bias:
            mlp += 2 * self.intermediate_size + hidden
        layer = attention + mlp + 2 * hidden  # two RMSNorm weights
        embeddings = self.vocab_size * hidden * (1 if self.tie_word_embeddings else 2)
        return embeddings + self.num_hidden_layers * layer + hidden

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
    except RecursionError:
        raise ModelFormatError(f"{path} nests its JSON too deeply to read") from None
    if not isinstance(data, dict):
        raise ModelFormatError(f"{path} does not hold a JSON object")
    return data


def _size(data: dict[str, Any], name: str, default: Any = ...) -> Any:
    """A positive integer field (a float with no fraction, as some converters write, counts)."""
    if name not in data and default is ...:
        raise ModelFormatError(f"config.json lacks the required field {name!r}")
    value = data.get(name)
    if value is None and default is not ...:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ModelFormatError(f"config.json: {name} should be a positive integer, not {value!r}")
    return value


def _real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ModelFormatError(f"{name} should be a finite number, not {value!r}")
    return float(value)


def _flag(data: dict[str, Any], name: str) -> bool:
    value = data.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ModelFormatError(f"config.json: {name} should be true or false, not {value!r}")
    return value


def _list(value: Any, name: str) -> list[Any]:
    if not isinstance(value, (list, tuple)):
        raise ModelFormatError(f"config.json: {name} should be a list, not {value!r}")
    return list(value)


def _token_id(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ModelFormatError(f"{name} should be an integer token id, not {value!r}")
    return value


def _first_id(name: str, value: Any) -> int | None:
    if isinstance(value, list):
        return _token_id(name, value[0]) if value else None
    return None if value is None else _token_id(name, value)


def _merge_ids(*values: Any) -> tuple[int, ...]:
    ids: list[int] = []
    for value in values:
        for token_id in value if isinstance(value, list) else [value]:
            if token_id is not None and _token_id("eos_token_id", token_id) not in ids:
                ids.append(token_id)
    return tuple(ids)
