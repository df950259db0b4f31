"""Plugin ``torch``: the PyTorch backend and the Llama architecture built for it.

torch is imported only when a model is built, so listing plugins or printing help stays instant.
``influence prepare`` builds the compiled decode step ahead of time (see `compiled`);
``influence tensor-parallel N COMMAND`` runs a command as N tensor-parallel ranks (see `launch`).

For architecture plugins (docs/plugins.md) the public interface is what this module exports:
`TorchCausalLM`, the protocol a built model implements; `KVCache`, the per-layer cache it makes;
and the Llama building blocks, `build_llama` and `LlamaVariant`. The rest of the package is internal.
"""

from influence_core import hookimpl
from influence_core.interfaces import Architecture

from .backend import TorchBackend
from .protocol import TorchCausalLM

__all__ = ["KVCache", "LlamaVariant", "TorchCausalLM", "build_llama"]

# Defined beside the Llama, which imports torch: loaded on first use (PEP 562), not with the plugin.
_LLAMA_EXPORTS = ("KVCache", "LlamaVariant", "build_llama")


def __getattr__(name: str):
    if name in _LLAMA_EXPORTS:
        from . import llama

        return getattr(llama, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _build_llama(config, weights, device, dtype):
    from .llama import build_llama

    return build_llama(config, weights, device, dtype)


@hookimpl(trylast=True)
def register_backends(register) -> None:
    register(TorchBackend())


@hookimpl(trylast=True)
def register_architectures(register) -> None:
    register(Architecture(
        name="llama", backend="torch", model_types=("llama",), class_names=("LlamaForCausalLM",),
        build=_build_llama, description="Llama 1/2/3, SmolLM, TinyLlama and other Llama-architecture models",
    ))


@hookimpl(trylast=True)
def register_commands(cli) -> None:
    from .commands import prepare, tensor_parallel

    cli.command()(prepare)
    cli.command("tensor-parallel", context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                                                      "allow_interspersed_args": False})(tensor_parallel)
