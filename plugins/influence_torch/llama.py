"""A Llama-family decoder in plain PyTorch, in the style of gpt-fast.

RMSNorm, rotary position embeddings (with linear and llama3 scaling), grouped-query attention
through scaled_dot_product_attention over a preallocated KV cache, and a SwiGLU MLP. Q/K/V and
gate/up are fused into one matmul each. Weights arrive under Hugging Face names (every loader
translates to those), so this file is the whole mapping from a checkpoint to a running model.

Decode runs one token through 30-odd layers, so the per-layer op count matters as much as the
matmuls: norms are one fused call, and RoPE rotates q and k together in three ops.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from influence_core.config import ModelConfig
from influence_core.errors import ModelFormatError
from influence_core.interfaces import Weights

from .linear import activation_dtype, convert_linear, convert_linears


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
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


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
        self.wqkv = nn.Linear(config.hidden_size, (self.n_heads + 2 * self.n_kv_heads) * self.head_dim,
                              bias=config.attention_bias)
        self.wo = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=config.attention_bias)
        self.kv_cache: KVCache | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int,
                mask: torch.Tensor | None) -> torch.Tensor:
        batch, length, _ = x.shape
        qkv = self.wqkv(x).view(batch, length, self.n_heads + 2 * self.n_kv_heads, self.head_dim)
        # The cache's dtype is the attention dtype (float32 on CPU, where bfloat16 attention is slow).
        qkv = qkv.to(self.kv_cache.k.dtype)
        rotated = apply_rope(qkv[:, :, :self.n_heads + self.n_kv_heads], cos, sin).transpose(1, 2)
        q, k = rotated.split([self.n_heads, self.n_kv_heads], dim=1)
        v = qkv[:, :, self.n_heads + self.n_kv_heads:].transpose(1, 2)
        k, v = self.kv_cache.update(start, k, v)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and length > 1,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )
        return self.wo(y.transpose(1, 2).reshape(batch, length, -1).to(x.dtype))


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
        self.attention_dtype = torch.float32
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
        device = self.embed_tokens.device
        for layer in self.layers:
            attention = layer.attention
            cache = KVCache(batch, attention.n_kv_heads, capacity, attention.head_dim, self.attention_dtype, device)
            if attention.kv_cache is not None:
                cache.k[:, :, :old] = attention.kv_cache.k
                cache.v[:, :, :old] = attention.kv_cache.v
            attention.kv_cache = cache
        positions = torch.arange(capacity, dtype=torch.float32, device=device)
        angles = torch.outer(positions, rope_inverse_frequencies(self.config).to(device))
        # Shaped [position, 1 (heads), head_dim] to broadcast over the heads of [batch, seq, heads, dim].
        self.rope_cos = torch.cat((angles, angles), dim=-1).cos()[:, None].to(self.attention_dtype)
        sin = angles.sin()
        self.rope_sin = torch.cat((-sin, sin), dim=-1)[:, None].to(self.attention_dtype)

    def forward(self, tokens: torch.Tensor, start: int, last_only: bool = True) -> torch.Tensor:
        length = tokens.shape[1]
        end = start + length
        x = F.embedding(tokens, self.embed_tokens)
        cos, sin = self.rope_cos[start:end], self.rope_sin[start:end]
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
    """Create the module without allocating, then move each checkpoint tensor straight into place,
    converting each layer's linears to ``dtype``'s fast format before reading the next layer."""
    compute_dtype = activation_dtype(dtype)
    with torch.device("meta"):
        model = Llama(config)

    def take(name: str) -> torch.Tensor:
        if name not in weights:
            raise ModelFormatError(f"the checkpoint lacks the tensor {name!r}")
        return weights[name].to(device=device, dtype=compute_dtype)

    def fused(names: list[str]) -> torch.Tensor:
        return torch.cat([take(name) for name in names])

    def load(module: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
        for name, tensor in state.items():
            expected = module.get_parameter(name).shape
            if tensor.shape != expected:
                raise ModelFormatError(f"tensor {where}{name} has shape {tuple(tensor.shape)}, "
                                       f"but the config implies {tuple(expected)}")
        module.load_state_dict(state, strict=True, assign=True)
        convert_linears(module, dtype, device)

    for i, layer in enumerate(model.layers):
        hf = f"model.layers.{i}."
        qkv = [f"{hf}self_attn.{p}_proj" for p in "qkv"]
        gate_up = [f"{hf}mlp.gate_proj", f"{hf}mlp.up_proj"]
        state = {
            "attention_norm.weight": take(hf + "input_layernorm.weight"),
            "attention.wqkv.weight": fused([name + ".weight" for name in qkv]),
            "attention.wo.weight": take(hf + "self_attn.o_proj.weight"),
            "ffn_norm.weight": take(hf + "post_attention_layernorm.weight"),
            "feed_forward.w13.weight": fused([name + ".weight" for name in gate_up]),
            "feed_forward.w2.weight": take(hf + "mlp.down_proj.weight"),
        }
        if config.attention_bias:
            state["attention.wqkv.bias"] = fused([name + ".bias" for name in qkv])
            state["attention.wo.bias"] = take(hf + "self_attn.o_proj.bias")
        if config.mlp_bias:
            state["feed_forward.w13.bias"] = fused([name + ".bias" for name in gate_up])
            state["feed_forward.w2.bias"] = take(hf + "mlp.down_proj.bias")
        load(layer, state, f"layers.{i}.")

    embedding = take("model.embed_tokens.weight")
    head = embedding if config.tie_word_embeddings else take("lm_head.weight")
    model.embed_tokens = nn.Parameter(embedding, requires_grad=False)
    load(model.norm, {"weight": take("model.norm.weight")}, "norm.")
    model.output.load_state_dict({"weight": head}, assign=True)
    if model.output.weight.shape != (config.vocab_size, config.hidden_size):
        raise ModelFormatError(f"the output head has shape {tuple(head.shape)}, "
                               f"but the config implies {(config.vocab_size, config.hidden_size)}")
    model.output = convert_linear(model.output, dtype, device)
    # bfloat16 attention is several times slower than float32 on CPU; on GPUs it is the fast path.
    model.attention_dtype = torch.float32 if device == "cpu" else compute_dtype
    return model.eval()
