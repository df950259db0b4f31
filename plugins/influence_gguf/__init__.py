"""Plugin ``gguf``: loads llama.cpp's single-file GGUF models.

The header is read directly from the file's memory map (`reader.GGUFHeader`); the config comes from
the ``llama.*`` metadata, the tokenizer from ``tokenizer.ggml.*``, and the weights stay in the map
until the architecture asks for them; each is then dequantized to float32 (with gguf-py's
dequantization) and handed over under its Hugging Face name, so the torch Llama runs a GGUF exactly
as it runs a safetensors checkpoint. Quantized formats may take a tensor's blocks as stored instead.
"""

from __future__ import annotations

from pathlib import Path

from influence_core import hookimpl
from influence_core.interfaces import ModelLoader, ModelSource

GGUF_MAGIC = b"GGUF"


def is_gguf_file(path: Path) -> bool:
    """A file that starts with the GGUF magic, or is named like one (so that a ``.gguf`` file that is
    not one, such as a Git LFS pointer, is refused with a reason rather than not recognised)."""
    if not path.is_file():
        return False
    if path.suffix.lower() == ".gguf":
        return True
    try:
        with path.open("rb") as handle:
            return handle.read(len(GGUF_MAGIC)) == GGUF_MAGIC
    except OSError:
        return False


def load_gguf(path: Path) -> ModelSource:
    # The reader brings numpy and gguf-py; import them only when a GGUF is actually opened.
    from .reader import GGUFFile, GGUFWeights, read_config
    from .tokenizer import read_tokenizer

    file = GGUFFile(path)
    config = read_config(file)
    return ModelSource(
        path=path, format="gguf", config=config, tokenizer=read_tokenizer(file, config),
        weights=lambda: GGUFWeights(file, config), hf_directory=None, details=file.details(),
    )


@hookimpl(trylast=True)
def register_model_loaders(register) -> None:
    register(ModelLoader("gguf", is_gguf_file, load_gguf,
                         "llama.cpp GGUF file, Llama architecture (F32/F16/BF16, Q4_0 to Q8_0, K-quants)"))
