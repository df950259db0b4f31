"""Any `ModelSource`, whatever its format, written out as a standard Hugging Face directory.

That is how a GGUF model becomes something transformers, optimum or the safetensors loader opens:
config.json, generation_config.json, tokenizer.json and tokenizer_config.json beside float
safetensors weights, with a manifest naming the source and its fingerprint. `hf_directory_for`
gives any source such a directory, writing a derived copy under ``exports/hf/`` once.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .artifacts import MANIFEST, atomic_directory, exports_dir, fingerprint, read_manifest, report_disk_use
from .interfaces import ModelSource


def hf_directory_for(source: ModelSource) -> Path:
    """A Hugging Face directory holding ``source``: its own if it has one, else a copy written once
    to ``exports/hf/NAME-FINGERPRINT`` (a derived artefact: `influence models prune` may remove it,
    and the next call writes it again)."""
    if source.hf_directory is not None:
        return source.hf_directory
    target = exports_dir("hf") / f"{source.path.stem}-{fingerprint(source.path)}"
    if read_manifest(target) is not None:
        return target
    print(f"influence: converting {source.path.name} to a Hugging Face directory in {target} "
          "(once; later runs reuse it)", file=sys.stderr)
    write_hf_directory(source, target, progress=True)
    report_disk_use("the converted model", target)
    return target


def write_hf_directory(source: ModelSource, target: Path, *, progress: bool = False,
                       max_shard_bytes: int = 4 << 30) -> None:
    """Write config, generation config, tokenizer and float weights as transformers lays them out;
    ``progress`` reports the weights written on stderr.

    Written to a temporary sibling and renamed into place, so an interrupted run never leaves a
    half-written model behind.
    """
    config, tokenizer = source.config, source.tokenizer
    with atomic_directory(target) as partial:
        hf_config = config.to_hf_dict()
        hf_config.setdefault("torch_dtype", "float32")
        _write_json(partial / "config.json", hf_config)
        generation = {"bos_token_id": config.bos_token_id, "eos_token_id": list(config.eos_token_ids),
                      "pad_token_id": config.pad_token_id}
        generation.update({k: v for k, v in vars(config.generation).items() if v is not None})
        _write_json(partial / "generation_config.json", {k: v for k, v in generation.items() if v is not None})
        tokenizer.backend.save(str(partial / "tokenizer.json"))
        eos = tokenizer.eos_token_ids[0] if tokenizer.eos_token_ids else None
        _write_json(partial / "tokenizer_config.json", {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": tokenizer.token_text(tokenizer.bos_token_id) or None,
            "eos_token": tokenizer.token_text(eos) or None,
            "pad_token": tokenizer.token_text(tokenizer.pad_token_id) or None,
            "chat_template": tokenizer.chat_template,
            "clean_up_tokenization_spaces": False,
            "model_max_length": config.context_length,
        })
        weights = source.weights()
        names = [n for n in weights.keys() if not (config.tie_word_embeddings and n == "lm_head.weight")]
        report = _progress_reporter(len(names)) if progress else None
        _write_weights(weights, names, partial, max_shard_bytes, report)
        _write_json(partial / MANIFEST, {
            "source": str(source.path), "source_format": source.format,
            "source_fingerprint": fingerprint(source.path), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        })


def _write_weights(weights: Any, names: list[str], directory: Path, max_shard_bytes: int,
                   report: Callable[[int], None] | None) -> None:
    """Stream tensors into shards of at most ``max_shard_bytes``, holding one shard in memory."""
    from safetensors.torch import save_file

    written: list[tuple[Path, list[str]]] = []
    shard: dict[str, Any] = {}
    shard_bytes = total_bytes = 0

    def flush() -> None:
        path = directory / f"shard-{len(written):05d}.safetensors"
        save_file(shard, str(path), metadata={"format": "pt"})
        written.append((path, list(shard)))
        shard.clear()

    for done, name in enumerate(names, 1):
        tensor = weights[name].contiguous()
        size = tensor.numel() * tensor.element_size()
        if shard and shard_bytes + size > max_shard_bytes:
            flush()
            shard_bytes = 0
        shard[name] = tensor
        shard_bytes += size
        total_bytes += size
        if report is not None:
            report(done)
    flush()
    if len(written) == 1:
        written[0][0].rename(directory / "model.safetensors")
        return
    weight_map = {}
    for i, (path, shard_names) in enumerate(written, 1):
        file = f"model-{i:05d}-of-{len(written):05d}.safetensors"
        path.rename(directory / file)
        weight_map.update(dict.fromkeys(shard_names, file))
    _write_json(directory / "model.safetensors.index.json",
                {"metadata": {"total_size": total_bytes}, "weight_map": weight_map})


def _progress_reporter(total: int) -> Callable[[int], None]:
    """Says on stderr how many of ``total`` tensors are written: one line rewritten in place on a
    terminal, else a line at each quarter (logs and pipes get no carriage returns)."""
    terminal = sys.stderr.isatty()
    shown = 0

    def report(done: int) -> None:
        nonlocal shown
        percent = 100 * done // max(total, 1)
        step = percent if terminal else percent // 25 * 25
        if step == shown:
            return
        shown = step
        start, end = ("\r", "\n" if done == total else "") if terminal else ("", "\n")
        print(f"{start}influence: converting weights: {step}% ({done} of {total} tensors)", end=end,
              file=sys.stderr, flush=True)

    return report


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
