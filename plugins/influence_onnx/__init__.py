"""Plugin ``onnx``: the ONNX Runtime backend, ``influence export onnx``, and a loader for export directories.

``--backend onnx`` exports a model with optimum the first time it is used and keeps the export in
the store, so later runs start from it. onnxruntime, optimum and torch are imported only when a
model is exported or loaded, and typer only when the CLI adds commands, so importing this is instant.
"""

from influence_core import hookimpl
from influence_core.interfaces import ModelLoader

from .backend import OnnxBackend
from .export import is_export_directory, open_export_directory


@hookimpl(trylast=True)
def register_backends(register) -> None:
    register(OnnxBackend())


# Not trylast: an export directory also has the config.json that the safetensors loader looks for,
# so this more specific check must come first.
@hookimpl
def register_model_loaders(register) -> None:
    register(ModelLoader("onnx", is_export_directory, open_export_directory,
                         "ONNX export directory (influence export onnx): model.onnx, config.json, tokenizer.json"))


@hookimpl(trylast=True)
def register_commands(cli) -> None:
    from .commands import export_app

    cli.add_typer(export_app, name="export")
