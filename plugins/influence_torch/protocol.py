"""What the torch backend needs of a built model: the interface architecture plugins implement.

An `Architecture` registered for backend ``"torch"`` returns from ``build(config, weights, device,
dtype)`` an object with the members of `TorchCausalLM`; the backend checks them when it loads the
model and refuses one that lacks any, naming the architecture. `build_llama` (with a `LlamaVariant`)
builds one for Llama-family models. The protocol is part of the hook specs' contract
(`influence_core.hookspecs.HOOKSPEC_VERSION`): a minor version may add members only as optional
ones, which the backend uses where a model has them; a new required member is a major version.

No torch here (annotations only), so importing the protocol costs nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from influence_core.config import ModelConfig
from influence_core.errors import BackendError
from influence_core.interfaces import Architecture

if TYPE_CHECKING:
    import torch

    from .llama import KVCache


class TorchCausalLM(Protocol):
    """A causal language model the torch backend runs (a ``torch.nn.Module``, in practice).

    It holds no per-run state: the caches it makes with `new_caches` are owned and passed in by the
    backend's runner, so one compiled graph of a call serves every run.
    """

    config: ModelConfig  # the config it was built from
    weight_format: str  # what its weights run as, for listings: "float32", "int4 (from Q4_0)", ...

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor, caches: list[KVCache],
                 first_slot: int = 0, last_only: bool = True) -> torch.Tensor:
        """Float32 logits for ``tokens`` [batch, length], each at its position in ``positions``
        [batch, length], batch row i in cache slot ``first_slot + i``: [batch, 1, vocab] when
        ``last_only``, else [batch, length, vocab]. Writes the tokens' keys and values into
        ``caches`` at their positions, and attends over the cache positions ``keys``
        (``arange(n)``, n past the last position: the caller chooses how much of the cache a step
        reads; masked positions past a row's own must not change its logits)."""

    def new_caches(self, slots: int, capacity: int) -> list[KVCache]:
        """Zeroed caches for ``slots`` sequences of ``capacity`` positions, one `KVCache` per layer
        (``k`` and ``v`` shaped [slots, kv_heads, capacity, head_dim]); the runner grows them by
        copying into larger ones, and copies positions between slots."""

    def kv_bytes_per_position(self) -> int:
        """Bytes the caches of all layers take for one position of one sequence (to fit the
        context to the machine's memory)."""


# The members check_causal_lm looks for; __call__ is checked as callable().
REQUIRED_MEMBERS = ("config", "weight_format", "new_caches", "kv_bytes_per_position")


def check_causal_lm(model: object, architecture: Architecture) -> None:
    """Refuse, in one line naming the architecture, a built model that lacks part of `TorchCausalLM`."""
    missing = [name for name in REQUIRED_MEMBERS if not hasattr(model, name)]
    if not callable(model):
        missing.insert(0, "__call__")
    if missing:
        raise BackendError(f"architecture {architecture.name!r} built a {type(model).__name__} without "
                           f"{', '.join(missing)}: the torch backend runs models with the interface of "
                           "influence_torch.TorchCausalLM (docs/plugins.md)")
