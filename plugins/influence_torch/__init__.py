"""Plugin ``torch``: the PyTorch backend and the Llama architecture built for it.

torch is imported only when a model is built, so listing plugins or printing help stays instant.
``influence prepare`` builds the compiled decode step ahead of time (see `compiled`).
"""

from influence_core import hookimpl
from influence_core.interfaces import Architecture

from .backend import TorchBackend


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
    from .commands import prepare

    cli.command()(prepare)
