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
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from influence_core.config import ModelConfig
from influence_core.errors import ModelFormatError
from influence_core.interfaces import Weights

from .linear import activation_dtype, convert_linears, convert_output_head


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


@dataclass(frozen=True)
class LlamaVariant:
    """How a Llama-family architecture departs from Llama itself (Qwen2: biases on q/k/v only;
    Mistral: sliding-window attention). Architecture plugins pass one to `build_llama`."""

    qkv_bias: bool | None = None  # None: config.attention_bias
    output_bias: bool | None = None  # bias on the attention output projection; None: config.attention_bias
    sliding_window: int | None = None  # attend to at most this many most recent positions


@dataclass
class Step:
    """Where one forward call's tokens sit: batch row i is cache slot ``first_slot + i``.

    Either every row starts at ``start`` (prefill, single-sequence decode), or each row holds one
    token at its own position ``row_positions[i]`` (batched decode of independent sequences).
    """

    first_slot: int
    start: int
    end: int  # one past the last position any row reaches
    first_key: int  # the oldest cached position any query can see (sliding-window attention)
    cos: torch.Tensor
    sin: torch.Tensor
    mask: torch.Tensor | None
    row_positions: torch.Tensor | None = None


class KVCache(nn.Module):
    def __init__(self, slots: int, n_kv_heads: int, capacity: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        super().__init__()
        shape = (slots, n_kv_heads, capacity, head_dim)
        # Left unwritten: `Llama.ensure_capacity` clears positions before any step can read them.
        self.register_buffer("k", torch.empty(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.empty(shape, dtype=dtype, device=device), persistent=False)

    def clear(self, start: int, end: int) -> None:
        self.k[:, :, start:end] = 0
        self.v[:, :, start:end] = 0

    def update(self, step: Step, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's keys and values; return the rows' caches up to the step's end."""
        rows = slice(step.first_slot, step.first_slot + k.shape[0])
        if step.row_positions is None:
            self.k[rows, :, step.start:step.start + k.shape[2]] = k
            self.v[rows, :, step.start:step.start + k.shape[2]] = v
        else:
            batch = torch.arange(k.shape[0], device=k.device)
            self.k[rows][batch, :, step.row_positions] = k[:, :, 0]
            self.v[rows][batch, :, step.row_positions] = v[:, :, 0]
        return self.k[rows, :, step.first_key:step.end], self.v[rows, :, step.first_key:step.end]

    def copy_slot(self, source: int, target: int, length: int | None = None) -> None:
        self.k[target, :, :length] = self.k[source, :, :length]
        self.v[target, :, :length] = self.v[source, :, :length]


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
        self.kv_cache: KVCache | None = None

    def forward(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        batch, length, _ = x.shape
        qkv = self.wqkv(x).view(batch, length, self.n_heads + 2 * self.n_kv_heads, self.head_dim)
        # The cache's dtype is the attention dtype (float32 on CPU, where bfloat16 attention is slow).
        qkv = qkv.to(self.kv_cache.k.dtype)
        rotated = apply_rope(qkv[:, :, :self.n_heads + self.n_kv_heads], step.cos, step.sin).transpose(1, 2)
        q, k = rotated.split([self.n_heads, self.n_kv_heads], dim=1)
        v = qkv[:, :, self.n_heads + self.n_kv_heads:].transpose(1, 2)
        k, v = self.kv_cache.update(step, k, v)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=step.mask, is_causal=step.mask is None and length > 1,
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
    def __init__(self, config: ModelConfig, variant: LlamaVariant) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention = Attention(config, variant)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.feed_forward = FeedForward(config)

    def forward(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), step)
        return x + self.feed_forward(self.ffn_norm(x))


class Llama(nn.Module):
    """The causal-LM interface the torch backend drives: `ensure_capacity` sizes the KV cache,
    `forward` returns float32 logits, `copy_slot` moves a sequence between cache slots."""

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
        self.activation_dtype = torch.float32
        self.attention_dtype = torch.float32
        self.cleared_to = 0  # positions cleared (or written) in every cache slot
        self.rope_cos: torch.Tensor | None = None
        self.rope_sin: torch.Tensor | None = None

    def cache_shape(self) -> tuple[int, int]:
        """(slots, positions) the KV cache holds now."""
        cache = self.layers[0].attention.kv_cache
        return (0, 0) if cache is None else (cache.k.shape[0], cache.k.shape[2])

    def ensure_capacity(self, length: int, slots: int = 1) -> None:
        """Make the KV cache hold ``length`` positions in each of ``slots`` independent sequences.

        Positions are cleared before any step can read them: a batch row reads (masked) positions
        past its own, and uninitialised memory there could hold NaN, which a zero attention weight
        does not cancel. On CPU the whole context is reserved at once, since untouched memory costs
        nothing until cleared or written, and a cache that never moves keeps a compiled decode step
        valid; elsewhere the cache grows by doubling, keeping its contents.
        """
        old_slots, old_length = self.cache_shape()
        if slots > old_slots or length > old_length:
            context = self.config.context_length
            capacity = context if self.embed_tokens.device.type == "cpu" else min(max(length, 2 * old_length, 256), context)
            self._allocate(max(slots, old_slots), max(capacity, old_length))
        if length > self.cleared_to:
            end = min(max(length, 2 * self.cleared_to, 256), self.cache_shape()[1])
            for layer in self.layers:
                layer.attention.kv_cache.clear(self.cleared_to, end)
            self.cleared_to = end

    def _allocate(self, slots: int, capacity: int) -> None:
        old_slots = self.cache_shape()[0]
        device = self.embed_tokens.device
        for layer in self.layers:
            attention = layer.attention
            cache = KVCache(slots, attention.n_kv_heads, capacity, attention.head_dim, self.attention_dtype, device)
            if attention.kv_cache is not None:
                cache.k[:old_slots, :, :self.cleared_to] = attention.kv_cache.k[:, :, :self.cleared_to]
                cache.v[:old_slots, :, :self.cleared_to] = attention.kv_cache.v[:, :, :self.cleared_to]
            attention.kv_cache = cache
        if slots > old_slots:  # new slots hold nothing yet: clear what the others have cleared
            for layer in self.layers:
                layer.attention.kv_cache.k[old_slots:, :, :self.cleared_to] = 0
                layer.attention.kv_cache.v[old_slots:, :, :self.cleared_to] = 0
        positions = torch.arange(capacity, dtype=torch.float32, device=device)
        angles = torch.outer(positions, rope_inverse_frequencies(self.config).to(device))
        # Shaped [position, 1 (heads), head_dim] to broadcast over the heads of [batch, seq, heads, dim].
        self.rope_cos = torch.cat((angles, angles), dim=-1).cos()[:, None].to(self.attention_dtype)
        sin = angles.sin()
        self.rope_sin = torch.cat((-sin, sin), dim=-1)[:, None].to(self.attention_dtype)

    def copy_slot(self, source: int, target: int, length: int | None = None) -> None:
        """Copy positions 0..length-1 (None: all) of one cache slot over another."""
        for layer in self.layers:
            layer.attention.kv_cache.copy_slot(source, target, length)

    def step(self, length: int, start: int | list[int], first_slot: int) -> Step:
        device = self.embed_tokens.device
        window = self.variant.sliding_window
        if isinstance(start, int):
            end = start + length
            # With a sliding window, keys older than the first query's window are never read.
            first_key = max(0, start - window + 1) if window else 0
            mask = None
            if length > 1 and (start > 0 or (window and length > window)):
                mask = self.visible_keys(torch.arange(start, end, device=device)[:, None], first_key, end)
            return Step(first_slot, start, end, first_key, self.rope_cos[start:end], self.rope_sin[start:end], mask)
        positions = torch.tensor(start, device=device)
        end = max(start) + 1
        first_key = max(0, min(start) - window + 1) if window else 0
        # Each row decodes its own sequence: it sees its own cache up to its own position only.
        mask = self.visible_keys(positions[:, None], first_key, end)[:, None, None, :]
        return Step(first_slot, 0, end, first_key, self.rope_cos[positions][:, None],
                    self.rope_sin[positions][:, None], mask, row_positions=positions)

    def visible_keys(self, queries: torch.Tensor, first_key: int, end: int) -> torch.Tensor:
        """Which cached positions ``first_key..end-1`` each query position may attend to."""
        keys = torch.arange(first_key, end, device=queries.device)[None, :]
        visible = keys <= queries
        if self.variant.sliding_window:
            visible &= keys > queries - self.variant.sliding_window
        return visible

    def forward(self, tokens: torch.Tensor, start: int | list[int], last_only: bool = True,
                first_slot: int = 0) -> torch.Tensor:
        """Logits for ``tokens`` [batch, length] in cache slots ``first_slot...``. ``start`` is one
        position shared by every row, or a list with each row's position when each row decodes one
        token of its own sequence."""
        step = self.step(tokens.shape[1], start, first_slot)
        x = F.embedding(tokens, self.embed_tokens).to(self.activation_dtype)
        for layer in self.layers:
            x = layer(x, step)
        if last_only:
            x = x[:, -1:]
        return self.output(self.norm(x)).float()


def build_llama(config: ModelConfig, weights: Weights, device: str, dtype: str,
                variant: LlamaVariant = LlamaVariant()) -> Llama:
    """Create the module without allocating, then move each checkpoint tensor straight into place,
    converting each layer's linears to ``dtype``'s fast format before reading the next layer."""
    compute_dtype = activation_dtype(dtype)
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

    def load(module: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
        for name, tensor in state.items():
            expected = module.get_parameter(name).shape
            if tensor.shape != expected:
                raise ModelFormatError(f"tensor {where}{name} has shape {tuple(tensor.shape)}, "
                                       f"but the config implies {tuple(expected)}")
        module.load_state_dict(state, strict=True, assign=True)
        convert_linears(module, dtype, device)

    # The head first: converting it holds the checkpoint's copy and the converted one at once, a
    # vocab x hidden transient that would otherwise come on top of every layer already loaded.
    head = take("model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight")
    model.output.load_state_dict({"weight": head}, assign=True)
    if model.output.weight.shape != (config.vocab_size, config.hidden_size):
        raise ModelFormatError(f"the output head has shape {tuple(head.shape)}, "
                               f"but the config implies {(config.vocab_size, config.hidden_size)}")
    model.output = convert_output_head(model.output, dtype, device)
    del head

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
        if _pick(variant.qkv_bias, config.attention_bias):
            state["attention.wqkv.bias"] = fused([name + ".bias" for name in qkv])
        if _pick(variant.output_bias, config.attention_bias):
            state["attention.wo.bias"] = take(hf + "self_attn.o_proj.bias")
        if config.mlp_bias:
            state["feed_forward.w13.bias"] = fused([name + ".bias" for name in gate_up])
            state["feed_forward.w2.bias"] = take(hf + "mlp.down_proj.bias")
        load(layer, state, f"layers.{i}.")

    # On CPU the embedding stays as the checkpoint stores it and each row is converted as it is
    # looked up: a memory-mapped table then keeps only the rows in use resident, whatever the dtype.
    embedding = (stored if device == "cpu" else take)("model.embed_tokens.weight")
    if embedding.shape != (config.vocab_size, config.hidden_size):
        raise ModelFormatError(f"the embedding has shape {tuple(embedding.shape)}, "
                               f"but the config implies {(config.vocab_size, config.hidden_size)}")
    model.embed_tokens = nn.Parameter(embedding, requires_grad=False)
    load(model.norm, {"weight": take("model.norm.weight")}, "norm.")
    model.activation_dtype = compute_dtype
    # bfloat16 attention is several times slower than float32 on CPU; on GPUs it is the fast path.
    model.attention_dtype = torch.float32 if device == "cpu" else compute_dtype
    return model.eval()
