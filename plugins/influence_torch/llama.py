"""A Llama-family decoder in plain PyTorch, in the style of gpt-fast.

RMSNorm, rotary position embeddings (with linear and llama3 scaling), grouped-query attention
through scaled_dot_product_attention over a preallocated KV cache, and a SwiGLU MLP. Q/K/V and
gate/up are fused into one matmul each. Weights arrive under Hugging Face names (every loader
translates to those), so this file is the whole mapping from a checkpoint to a running model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from influence_core.config import ModelConfig
from influence_core.errors import ModelFormatError
from influence_core.interfaces import Weights


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


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 and scale in the model dtype, exactly as transformers does.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class KVCache(nn.Module):
    def __init__(self, batch: int, n_kv_heads: int, capacity: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        super().__init__()
        shape = (batch, n_kv_heads, capacity, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        q_size, kv_size = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.split_sizes = [q_size, kv_size, kv_size]
        self.wqkv = nn.Linear(config.hidden_size, q_size + 2 * kv_size, bias=config.attention_bias)
        self.wo = nn.Linear(q_size, config.hidden_size, bias=config.attention_bias)
        self.kv_cache: KVCache | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int,
                mask: torch.Tensor | None) -> torch.Tensor:
        batch, length, _ = x.shape
        q, k, v = self.wqkv(x).split(self.split_sizes, dim=-1)
        q = q.view(batch, length, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k, v = self.kv_cache.update(start, k, v)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and length > 1,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )
        return self.wo(y.transpose(1, 2).reshape(batch, length, -1))


class FeedForward(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.w13 = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=config.mlp_bias)
        self.w2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.feed_forward = FeedForward(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int,
                mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, start, mask)
        return x + self.feed_forward(self.ffn_norm(x))


class Llama(nn.Module):
    """The causal-LM interface the torch backend drives: `ensure_capacity(n)` sizes the KV cache,
    `forward(tokens, start, last_only)` returns float32 logits."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        # A bare parameter rather than nn.Embedding, whose random init would run (and import
        # torch._dynamo, a second of start-up) even on the meta device.
        self.embed_tokens = nn.Parameter(torch.empty(config.vocab_size, config.hidden_size))
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.output = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rope_cos: torch.Tensor | None = None
        self.rope_sin: torch.Tensor | None = None

    @property
    def capacity(self) -> int:
        cache = self.layers[0].attention.kv_cache
        return 0 if cache is None else cache.capacity

    def ensure_capacity(self, length: int, batch: int = 1) -> None:
        """Grow the KV cache (keeping its contents) and RoPE tables to hold ``length`` positions."""
        old = self.capacity
        if length <= old:
            return
        capacity = min(max(length, 2 * old, 256), self.config.context_length)
        param = self.output.weight
        for layer in self.layers:
            attention = layer.attention
            cache = KVCache(batch, attention.n_kv_heads, capacity, attention.head_dim, param.dtype, param.device)
            if attention.kv_cache is not None:
                cache.k[:, :, :old] = attention.kv_cache.k
                cache.v[:, :, :old] = attention.kv_cache.v
            attention.kv_cache = cache
        positions = torch.arange(capacity, dtype=torch.float32, device=param.device)
        angles = torch.outer(positions, rope_inverse_frequencies(self.config).to(param.device))
        angles = torch.cat((angles, angles), dim=-1)
        self.rope_cos, self.rope_sin = angles.cos(), angles.sin()

    def forward(self, tokens: torch.Tensor, start: int, last_only: bool = True) -> torch.Tensor:
        length = tokens.shape[1]
        end = start + length
        x = F.embedding(tokens, self.embed_tokens)
        cos = self.rope_cos[start:end].to(x.dtype)
        sin = self.rope_sin[start:end].to(x.dtype)
        mask = None
        if length > 1 and start > 0:
            # Query i (at position start + i) sees every cached position up to its own.
            mask = torch.ones(length, end, dtype=torch.bool, device=x.device).tril(diagonal=start)
        for layer in self.layers:
            x = layer(x, cos, sin, start, mask)
        if last_only:
            x = x[:, -1:]
        return self.output(self.norm(x)).float()


def build_llama(config: ModelConfig, weights: Weights, device: str, dtype: str) -> Llama:
    """Create the module without allocating, then move each checkpoint tensor straight into place."""
    torch_dtype = getattr(torch, dtype)
    with torch.device("meta"):
        model = Llama(config)

    def take(name: str) -> torch.Tensor:
        if name not in weights:
            raise ModelFormatError(f"the checkpoint lacks the tensor {name!r}")
        return weights[name].to(device=device, dtype=torch_dtype)

    def fused(names: list[str]) -> torch.Tensor:
        return torch.cat([take(name) for name in names])

    state: dict[str, torch.Tensor] = {"embed_tokens": take("model.embed_tokens.weight")}
    for i in range(config.num_hidden_layers):
        hf, ours = f"model.layers.{i}.", f"layers.{i}."
        qkv = [f"{hf}self_attn.{p}_proj" for p in "qkv"]
        state[ours + "attention.wqkv.weight"] = fused([name + ".weight" for name in qkv])
        state[ours + "attention.wo.weight"] = take(hf + "self_attn.o_proj.weight")
        if config.attention_bias:
            state[ours + "attention.wqkv.bias"] = fused([name + ".bias" for name in qkv])
            state[ours + "attention.wo.bias"] = take(hf + "self_attn.o_proj.bias")
        gate_up = [f"{hf}mlp.gate_proj", f"{hf}mlp.up_proj"]
        state[ours + "feed_forward.w13.weight"] = fused([name + ".weight" for name in gate_up])
        state[ours + "feed_forward.w2.weight"] = take(hf + "mlp.down_proj.weight")
        if config.mlp_bias:
            state[ours + "feed_forward.w13.bias"] = fused([name + ".bias" for name in gate_up])
            state[ours + "feed_forward.w2.bias"] = take(hf + "mlp.down_proj.bias")
        state[ours + "attention_norm.weight"] = take(hf + "input_layernorm.weight")
        state[ours + "ffn_norm.weight"] = take(hf + "post_attention_layernorm.weight")
    state["norm.weight"] = take("model.norm.weight")
    if config.tie_word_embeddings:
        state["output.weight"] = state["embed_tokens"]
    else:
        state["output.weight"] = take("lm_head.weight")
    for name, tensor in state.items():
        expected = model.get_parameter(name).shape
        if tensor.shape != expected:
            raise ModelFormatError(
                f"tensor {name} has shape {tuple(tensor.shape)}, but the config implies {tuple(expected)}"
            )
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()
