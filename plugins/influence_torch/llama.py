"""A Llama-family decoder in plain PyTorch, in the style of gpt-fast.

RMSNorm, rotary position embeddings (with linear and llama3 scaling), grouped-query attention
through scaled_dot_product_attention over a preallocated KV cache, and a SwiGLU MLP. Q/K/V and
gate/up are fused into one matmul each. Weights arrive under Hugging Face names (every loader
translates to those), so this file is the whole mapping from a checkpoint to a running model.

Decode runs one token through 30-odd layers, so the per-layer op count matters as much as the
matmuls: norms are one fused call, and RoPE rotates q and k together in three ops. The forward
pass is shaped for compilation (gpt-fast's shape): positions arrive as tensors, keys and values
are written in place into caches the caller owns, and what the layers share is computed once per
call, so the same code runs eager and as one exported graph (`compiled`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from influence_core.config import ModelConfig
from influence_core.errors import ModelFormatError
from influence_core.interfaces import Weights

from .linear import WeightFormats, activation_dtype


def rope_inverse_frequencies(config: ModelConfig) -> torch.Tensor:
    dim = config.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
    inv_freq = 1.0 / (config.rope_theta ** exponents)
    scaling = config.rope_scaling or {}
    if config.rope_type == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif config.rope_type == "llama3":
        # Llama 3.1: stretch long wavelengths by `factor`, keep short ones, blend in between.
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        original = scaling["original_max_position_embeddings"]
        wavelength = 2 * math.pi / inv_freq
        scaled = torch.where(wavelength > original / low, inv_freq / factor, inv_freq)
        smooth = (original / wavelength - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelength >= original / high) & (wavelength <= original / low)
        inv_freq = torch.where(is_medium, blended, scaled)
    return inv_freq


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Hugging Face's rotate-half RoPE: x*cos + rotate_half(x)*sin, where rotate_half(x) is
    x rolled by half the head with its first half negated (the sign is folded into signed_sin)."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 and scale in the model dtype, exactly as transformers does.
        if x.dtype == torch.float32:
            return self.weight * F.rms_norm(x, (x.shape[-1],), eps=self.eps)
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


@dataclass(frozen=True)
class LlamaVariant:
    """How a Llama-family architecture departs from Llama itself (Qwen2: biases on q/k/v only;
    Mistral: sliding-window attention). Architecture plugins pass one to `build_llama`."""

    qkv_bias: bool | None = None  # None: config.attention_bias
    output_bias: bool | None = None  # bias on the attention output projection; None: config.attention_bias
    sliding_window: int | None = None  # attend to at most this many most recent positions


class StepTensors(NamedTuple):
    """What every layer of one forward call shares, built once per call from its positions."""

    cos: torch.Tensor  # [batch, length, 1, head_dim]
    sin: torch.Tensor  # the same, with the first half negated (rotate_half's sign)
    mask: torch.Tensor  # [batch, 1, length, keys]: which cached positions each query sees
    rows: torch.Tensor  # [batch, 1, 1]: the cache slot of each row
    heads: torch.Tensor  # [1, kv_heads, 1]
    positions: torch.Tensor  # [batch, 1, length]
    first_slot: int


class KVCache(NamedTuple):
    """One layer's keys and values, [slots, kv_heads, capacity, head_dim] each. Positions not yet
    written hold zeros: a batch row reads (masked) positions past its own, and uninitialised
    memory there could hold NaN, which a zero attention weight does not cancel."""

    k: torch.Tensor
    v: torch.Tensor

    @classmethod
    def zeros(cls, slots: int, n_kv_heads: int, capacity: int, head_dim: int, dtype: torch.dtype,
              device: torch.device | str) -> KVCache:
        shape = (slots, n_kv_heads, capacity, head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    def update(self, step: StepTensors, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's keys and values at their positions; return the rows' caches over the
        step's keys."""
        index = (step.rows, step.heads, step.positions)
        self.k.index_put_(index, k)
        self.v.index_put_(index, v)
        rows, keys = slice(step.first_slot, step.first_slot + k.shape[0]), step.mask.shape[-1]
        return self.k[rows, :, :keys], self.v[rows, :, :keys]


def _pick(choice: bool | None, default: bool) -> bool:
    return default if choice is None else choice


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, variant: LlamaVariant) -> None:
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.wqkv = nn.Linear(config.hidden_size, (self.n_heads + 2 * self.n_kv_heads) * self.head_dim,
                              bias=_pick(variant.qkv_bias, config.attention_bias))
        self.wo = nn.Linear(self.n_heads * self.head_dim, config.hidden_size,
                            bias=_pick(variant.output_bias, config.attention_bias))

    def forward(self, x: torch.Tensor, step: StepTensors, cache: KVCache) -> torch.Tensor:
        batch, length, _ = x.shape
        qkv = self.wqkv(x).view(batch, length, self.n_heads + 2 * self.n_kv_heads, self.head_dim)
        # The cache's dtype is the attention dtype (float32 on CPU, where bfloat16 attention is slow).
        if qkv.dtype != cache.k.dtype:
            qkv = qkv.to(cache.k.dtype)
        rotated = apply_rope(qkv[:, :, :self.n_heads + self.n_kv_heads], step.cos, step.sin).transpose(1, 2)
        q, k = rotated.split([self.n_heads, self.n_kv_heads], dim=1)
        v = qkv[:, :, self.n_heads + self.n_kv_heads:].transpose(1, 2)
        k, v = cache.update(step, k, v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=step.mask, enable_gqa=self.n_kv_heads != self.n_heads)
        y = y.transpose(1, 2).reshape(batch, length, -1)
        return self.wo(y if y.dtype == x.dtype else y.to(x.dtype))


class FeedForward(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.w13 = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=config.mlp_bias)
        self.w2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, variant: LlamaVariant) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention = Attention(config, variant)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.feed_forward = FeedForward(config)

    def forward(self, x: torch.Tensor, step: StepTensors, cache: KVCache) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), step, cache)
        return x + self.feed_forward(self.ffn_norm(x))


class Llama(nn.Module):
    """The causal-LM interface the torch backend drives: `forward` runs tokens at given positions
    over a list of per-layer KV caches and returns float32 logits; `new_caches` makes those caches.
    The model holds no per-run state, so one compiled graph of `forward` serves every run (see
    `compiled`)."""

    def __init__(self, config: ModelConfig, variant: LlamaVariant = LlamaVariant()) -> None:
        super().__init__()
        self.config = config
        self.variant = variant
        # A bare parameter rather than nn.Embedding, whose random init would run (and import
        # torch._dynamo, a second of start-up) even on the meta device.
        self.embed_tokens = nn.Parameter(torch.empty(config.vocab_size, config.hidden_size))
        self.layers = nn.ModuleList(Block(config, variant) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.output = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inverse_frequencies(config), persistent=False)
        self.activation_dtype = torch.float32
        self.attention_dtype = torch.float32

    def kv_bytes_per_position(self) -> int:
        """Bytes the KV cache of all layers takes for one position of one sequence."""
        first = self.layers[0].attention
        return len(self.layers) * 2 * first.n_kv_heads * first.head_dim * self.attention_dtype.itemsize

    def new_caches(self, slots: int, capacity: int) -> list[KVCache]:
        device = self.embed_tokens.device
        return [KVCache.zeros(slots, layer.attention.n_kv_heads, capacity, layer.attention.head_dim,
                              self.attention_dtype, device) for layer in self.layers]

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor, caches: list[KVCache],
                first_slot: int = 0, last_only: bool = True) -> torch.Tensor:
        """Logits for ``tokens`` [batch, length], each at its position in ``positions`` [batch, length],
        batch row i in cache slot ``first_slot + i``. Attention reads the cache's positions
        ``keys`` (``arange(n)``: the first n positions, n at least one past the last position),
        so a caller chooses how much of the cache a step reads."""
        step = self.step_tensors(positions, keys, first_slot, tokens.shape[0])
        x = F.embedding(tokens, self.embed_tokens)
        if x.dtype != self.activation_dtype:
            x = x.to(self.activation_dtype)
        for layer, cache in zip(self.layers, caches):
            x = layer(x, step, cache)
        if last_only:
            x = x[:, -1:]
        logits = self.output(self.norm(x))
        return logits if logits.dtype == torch.float32 else logits.float()

    def step_tensors(self, positions: torch.Tensor, keys: torch.Tensor, first_slot: int, batch: int) -> StepTensors:
        """What every layer of one step shares: the rotations for ``positions``, which keys each
        query sees, and where the step's keys and values go in the cache."""
        angles = positions[..., None].to(self.inv_freq.dtype) * self.inv_freq
        cos, sin = angles.cos(), angles.sin()
        # Shaped [batch, seq, 1 (heads), head_dim] to broadcast over the heads of [batch, seq, heads, dim].
        cos = torch.cat((cos, cos), dim=-1)[:, :, None]
        signed_sin = torch.cat((-sin, sin), dim=-1)[:, :, None]
        if cos.dtype != self.attention_dtype:
            cos, signed_sin = cos.to(self.attention_dtype), signed_sin.to(self.attention_dtype)
        visible = keys <= positions[..., None]
        if self.variant.sliding_window:
            visible &= keys > positions[..., None] - self.variant.sliding_window
        rows = torch.arange(first_slot, first_slot + batch, device=positions.device)
        heads = torch.arange(self.layers[0].attention.n_kv_heads, device=positions.device)
        return StepTensors(cos, signed_sin, visible[:, None], rows[:, None, None], heads[None, :, None],
                           positions[:, None, :], first_slot)


def build_llama(config: ModelConfig, weights: Weights, device: str, dtype: str,
                variant: LlamaVariant = LlamaVariant()) -> Llama:
    """Create the module without allocating, then move each checkpoint tensor straight into place,
    converting each layer's linears to ``dtype``'s fast format before reading the next layer (in a
    quantized file, each in its own tensors' precision: `WeightFormats`)."""
    compute_dtype = activation_dtype(dtype)
    formats = WeightFormats(weights, dtype, device)
    with torch.device("meta"):
        model = Llama(config, variant)

    def stored(name: str) -> torch.Tensor:
        if name not in weights:
            raise ModelFormatError(f"the checkpoint lacks the tensor {name!r}")
        return weights[name]

    def take(name: str) -> torch.Tensor:
        return stored(name).to(device=device, dtype=compute_dtype)

    def fused(names: list[str]) -> torch.Tensor:
        return torch.cat([take(name) for name in names])

    def load(module: nn.Module, state: dict[str, torch.Tensor], where: str,
             linears: dict[str, list[str]]) -> None:
        """``linears``: each linear's path in ``module`` and the checkpoint tensors stacked in it."""
        for name, tensor in state.items():
            expected = module.get_parameter(name).shape
            if tensor.shape != expected:
                raise ModelFormatError(f"tensor {where}{name} has shape {tuple(tensor.shape)}, "
                                       f"but the config implies {tuple(expected)}")
        module.load_state_dict(state, strict=True, assign=True)
        for path, names in linears.items():
            parent, _, attribute = path.rpartition(".")
            owner = module.get_submodule(parent)
            setattr(owner, attribute, formats.convert(getattr(owner, attribute), names))

    # The head first: converting it holds the checkpoint's copy and the converted one at once, a
    # vocab x hidden transient that would otherwise come on top of every layer already loaded.
    head = take("model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight")
    model.output.load_state_dict({"weight": head}, assign=True)
    if model.output.weight.shape != (config.vocab_size, config.hidden_size):
        raise ModelFormatError(f"the output head has shape {tuple(head.shape)}, "
                               f"but the config implies {(config.vocab_size, config.hidden_size)}")
    model.output = formats.convert_head(model.output, "model.embed_tokens.weight" if config.tie_word_embeddings
                                        else "lm_head.weight")
    del head

    for i, layer in enumerate(model.layers):
        hf = f"model.layers.{i}."
        qkv = [f"{hf}self_attn.{p}_proj" for p in "qkv"]
        gate_up = [f"{hf}mlp.gate_proj", f"{hf}mlp.up_proj"]
        linears = {
            "attention.wqkv": [name + ".weight" for name in qkv],
            "attention.wo": [hf + "self_attn.o_proj.weight"],
            "feed_forward.w13": [name + ".weight" for name in gate_up],
            "feed_forward.w2": [hf + "mlp.down_proj.weight"],
        }
        state = {
            "attention_norm.weight": take(hf + "input_layernorm.weight"),
            "ffn_norm.weight": take(hf + "post_attention_layernorm.weight"),
            **{f"{path}.weight": formats.weight(names, take) for path, names in linears.items()},
        }
        if _pick(variant.qkv_bias, config.attention_bias):
            state["attention.wqkv.bias"] = fused([name + ".bias" for name in qkv])
        if _pick(variant.output_bias, config.attention_bias):
            state["attention.wo.bias"] = take(hf + "self_attn.o_proj.bias")
        if config.mlp_bias:
            state["feed_forward.w13.bias"] = fused([name + ".bias" for name in gate_up])
            state["feed_forward.w2.bias"] = take(hf + "mlp.down_proj.bias")
        load(layer, state, f"layers.{i}.", linears)

    # On CPU a float embedding stays as the checkpoint stores it and each row is converted as it is
    # looked up: a memory-mapped table then keeps only the rows in use resident, whatever the dtype.
    # A quantized one is dequantized whole, so it is kept in the compute dtype.
    float_embedding = device == "cpu" and formats.stored_kind("model.embed_tokens.weight") is None
    embedding = (stored if float_embedding else take)("model.embed_tokens.weight")
    if embedding.shape != (config.vocab_size, config.hidden_size):
        raise ModelFormatError(f"the embedding has shape {tuple(embedding.shape)}, "
                               f"but the config implies {(config.vocab_size, config.hidden_size)}")
    model.embed_tokens = nn.Parameter(embedding, requires_grad=False)
    load(model.norm, {"weight": take("model.norm.weight")}, "norm.", {})
    model.inv_freq = rope_inverse_frequencies(config).to(device)
    model.activation_dtype = compute_dtype
    model.weight_format = formats.describe()
    # bfloat16 attention is several times slower than float32 on CPU; on GPUs it is the fast path.
    model.attention_dtype = torch.float32 if device == "cpu" else compute_dtype
    return model.eval()
