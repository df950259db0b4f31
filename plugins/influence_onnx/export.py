"""ONNX exports: optimum's exporter run once per model, kept in the store, and the variants derived from them.

    exports/onnx/KEY/        one model's export; KEY is the fingerprint of its Hugging Face directory,
                             so changed weights get a new export
        model.onnx           optimum's text-generation-with-past graph, beside config and tokenizer files
        influence.json       where it came from
        float32/model.onnx   the graph with ONNX Runtime's transformer fusions (what --dtype float32
                             runs), made on first use
        int8/model.onnx      weights quantized to int8 (--dtype int8), made on first use
        float16/model.onnx   float16 weights and KV cache (--dtype float16), made on first use

Each directory is written under a temporary name and renamed into place once complete, so an
interrupted export or conversion is never mistaken for a finished one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

from influence_core.config import ModelConfig
from influence_core.errors import ModelFormatError
from influence_core.hf_directory import hf_directory_for
from influence_core.interfaces import ModelSource
from influence_core.artifacts import (MANIFEST, atomic_directory, exports_dir, fingerprint, read_manifest,
                                      report_disk_use, timed_build)
from influence_core.tokenizer import Tokenizer

MODEL_FILE = "model.onnx"
# Seconds per model parameter for each one-off step, the estimate shown until this machine has timed
# its own: the export took 35 s for SmolLM2-135M on a quiet 2-core machine, and in one run on a busy
# one the fusions took 1.95x the export's time, int8 0.43x and float16 0.19x.
SECONDS_PER_PARAMETER = {"export": 2.6e-7, "float32": 5.1e-7, "int8": 1.1e-7, "float16": 4.9e-8}
TASK = "text-generation-with-past"
# Node-name parts of the float32 export that stay float32 in the float16 variant: RMSNorm squares
# activations (which overflow float16), and rotary angles grow with the position (float16 cannot
# hold position x frequency precisely past a few thousand tokens).
FLOAT32_SUBGRAPHS = ("layernorm/", "/model/norm/", "/rotary_emb/")


def export_for(source: ModelSource, *, force: bool = False) -> Path:
    """The directory holding ``source`` as ONNX: the source itself if it is an export, else the
    store's export of its Hugging Face directory, made on first use (or again, with ``force``)."""
    if source.format == "onnx":
        return source.path
    hf_directory = hf_directory_for(source)
    target = exports_dir("onnx") / fingerprint(hf_directory)
    if force or not target.exists():
        print(f"influence: exporting {hf_directory} to ONNX in {target} "
              "(once; later runs reuse the export)", file=sys.stderr)
        export_model(hf_directory, target)
        remove_older_exports(hf_directory, keep=target)
    return target


def is_export_directory(path: Path) -> bool:
    return path.is_dir() and (path / MODEL_FILE).is_file() and (path / "config.json").is_file()


def open_export_directory(path: Path) -> ModelSource:
    """An export directory (``influence export onnx OUT``) as a model source; only this backend runs it."""
    config = ModelConfig.from_dir(path)
    tokenizer = Tokenizer.from_dir(path, bos_token_id=config.bos_token_id, eos_token_ids=config.eos_token_ids,
                                   pad_token_id=config.pad_token_id)

    def no_weights():
        raise ModelFormatError(f"{path} is an ONNX export, which only --backend onnx can run")

    return ModelSource(path=path, format="onnx", config=config, tokenizer=tokenizer, weights=no_weights,
                       details={"bytes": sum(p.stat().st_size for p in path.glob(f"{MODEL_FILE}*"))})


def export_model(hf_directory: Path, target: Path) -> None:
    """Run optimum's exporter on ``hf_directory``, writing ``target`` atomically (replacing it)."""
    with atomic_directory(target) as partial:
        _run_optimum(hf_directory, partial)
        if not (partial / MODEL_FILE).is_file():
            raise ModelFormatError(f"optimum exported {hf_directory} but wrote no {MODEL_FILE} "
                                   f"(it wrote: {', '.join(sorted(p.name for p in partial.iterdir()))})")
        (partial / MANIFEST).write_text(json.dumps({
            "source": str(hf_directory.resolve()), "source_fingerprint": fingerprint(hf_directory), "task": TASK,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }, indent=2) + "\n", encoding="utf-8")
    report_disk_use("the ONNX export", target)


def _run_optimum(hf_directory: Path, output: Path) -> None:
    from optimum.exporters.onnx import main_export

    # The exporter's tracer warnings and logs mean nothing to a user; the progress line says what runs.
    # Anything it prints goes to stderr, so that stdout holds only the command's own output.
    with timed_build(f"exporting {hf_directory.name} to ONNX with optimum", "onnx-export",
                    _parameters(hf_directory), SECONDS_PER_PARAMETER["export"]), \
            _quiet_logs("optimum", "transformers", "torch.onnx"), warnings.catch_warnings(), \
            contextlib.redirect_stdout(sys.stderr):
        warnings.simplefilter("ignore")
        try:
            # Our own checks (the test suite, `influence compare`) replace optimum's slow validation.
            main_export(str(hf_directory), output=output, task=TASK, do_validation=False)
        except Exception as error:  # optimum and torch.onnx raise many types; all mean the export failed
            reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise ModelFormatError(f"optimum could not export {hf_directory} to ONNX: "
                                   f"{type(error).__name__}: {reason}") from None


@contextlib.contextmanager
def _quiet_logs(*names: str) -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def remove_older_exports(hf_directory: Path, keep: Path) -> None:
    """Delete exports of the same directory made before its weights changed: they are never used again."""
    for export in keep.parent.iterdir():
        manifest = read_manifest(export) if export != keep else None
        if manifest is not None and manifest.get("source") == str(hf_directory.resolve()):
            shutil.rmtree(export, ignore_errors=True)


def model_file(export: Path, dtype: str) -> Path:
    """The graph to run for ``dtype``: a variant derived once from optimum's export."""
    base = export / MODEL_FILE
    if not base.is_file():
        raise damaged(export, f"{base} is missing")
    target = export / dtype / MODEL_FILE
    if not target.is_file():
        _check_graph(export, base)
        print(f"influence: preparing the {dtype} graph in {target.parent} (once)", file=sys.stderr)
        # The quantizer logs advice on the root logger, the optimizer its progress on its own.
        with atomic_directory(target.parent) as partial, _quiet_logs("", "onnxruntime.transformers"), \
                timed_build(f"preparing the {dtype} ONNX graph", f"onnx-{dtype}", _parameters(export),
                           SECONDS_PER_PARAMETER[dtype]):
            DERIVE[dtype](base, partial / MODEL_FILE)
        report_disk_use(f"the {dtype} graph", target.parent)
    return target


def _parameters(directory: Path) -> int:
    """The model's parameter count, from its config (the size an estimate scales with)."""

    return ModelConfig.from_dir(directory).parameter_count()


def _check_graph(export: Path, path: Path) -> None:
    import onnx

    try:
        onnx.load(str(path), load_external_data=False)
    except Exception as error:  # protobuf's decode errors have several types
        raise damaged(export, f"{path} is not a valid ONNX graph ({type(error).__name__})") from None


def _fuse(source: Path, target: Path) -> None:
    """ONNX Runtime's transformer fusions (rotary embedding, residual add + RMSNorm) on optimum's graph.

    A decode step of a small model spends a good part of its time on per-node overhead across the
    graph's thousands of small nodes; fusing them makes it faster. The fusions match patterns, so
    the fused graph is kept only if it computes what the original does; otherwise the original is.
    """
    from onnxruntime.transformers.optimizer import optimize_model

    config = json.loads((source.parent / "config.json").read_text(encoding="utf-8"))
    try:
        # "gpt2" is ONNX Runtime's optimizer for decoder-only models (optimum uses it for Llama too).
        fused = optimize_model(str(source), model_type="gpt2", num_heads=config["num_attention_heads"],
                               hidden_size=config["hidden_size"], opt_level=0)
        fused.save_model_to_file(str(target), use_external_data_format=_has_external_data(source))
        if _same_outputs(source, target):
            return
    except Exception as error:  # the optimizer raises many types; any means: run the graph unfused
        print(f"influence: ONNX Runtime's fusions failed ({type(error).__name__}: {error}); "
              "running the graph unfused", file=sys.stderr)
    else:
        print("influence: the fused graph's outputs differ from the original's; running the graph unfused",
              file=sys.stderr)
    for written in target.parent.iterdir():
        written.unlink()
    for file in source.parent.glob(f"{source.name}*"):  # model.onnx and any external data beside it
        shutil.copyfile(file, target.parent / file.name)


def _same_outputs(original: Path, fused: Path) -> bool:
    """Whether both graphs give the same logits and KV cache for a prompt and one decode step."""
    import numpy as np
    import onnxruntime

    sessions = [onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"]) for path in (original, fused)]
    results = []
    for session in sessions:
        inputs = {i.name: i for i in session.get_inputs()}
        past = {name: np.zeros((1, i.shape[1], 0, i.shape[3]), dtype=np.float32)
                for name, i in inputs.items() if name.startswith("past_key_values.")}
        outputs = []
        for tokens, start in (([1, 5, 9, 13, 17, 21, 25, 29], 0), ([7], 8)):
            feeds = {"input_ids": np.array([tokens], dtype=np.int64),
                     "attention_mask": np.ones((1, start + len(tokens)), dtype=np.int64),
                     "position_ids": np.arange(start, start + len(tokens), dtype=np.int64)[None], **past}
            values = session.run(None, {name: value for name, value in feeds.items() if name in inputs})
            names = [o.name for o in session.get_outputs()]
            past = {name.replace("present.", "past_key_values."): v for name, v in zip(names, values) if name != "logits"}
            outputs += values
        results.append(outputs)
    return all(np.allclose(a, b, atol=1e-4, rtol=1e-4) for a, b in zip(*results))


def _quantize_int8(source: Path, target: Path) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # Activations are quantized per tensor at run time, and the MLP's down projection reads the
    # activations with the largest outliers: quantizing it too drops greedy top-1 agreement with
    # float32 from 88% to 62% on SmolLM2-135M (benchmarks/onnx_int8.py), so it stays float32.
    graph = onnx.load(str(source), load_external_data=False).graph
    down_projections = [node.name for node in graph.node if node.op_type == "MatMul" and "down_proj" in node.name]
    # Only matrix products with constant weights: quantizing the attention products (both inputs
    # activations) costs accuracy and gains nothing.
    quantize_dynamic(source, target, weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["MatMul"],
                     nodes_to_exclude=down_projections, extra_options={"MatMulConstBOnly": True},
                     use_external_data_format=_has_external_data(source))


def _convert_float16(source: Path, target: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(source))
    keep = [node.name for node in model.graph.node if any(part in node.name for part in FLOAT32_SUBGRAPHS)]
    # keep_io_types=False: the KV cache inputs and outputs become float16 too, halving its memory.
    model = convert_float_to_float16(model, keep_io_types=False, node_block_list=keep)
    onnx.save_model(model, str(target), save_as_external_data=_has_external_data(source),
                    location=f"{MODEL_FILE}.data")


def damaged(export: Path, problem: str) -> ModelFormatError:
    """The error for an export that cannot be used, saying how to make it anew."""
    if export.parent == exports_dir("onnx"):
        return ModelFormatError(f"{problem}; delete {export} and the next run exports the model again")
    return ModelFormatError(f"{problem}; export the model again with `influence export onnx --force {export}`")


DERIVE = {"float32": _fuse, "int8": _quantize_int8, "float16": _convert_float16}


def _has_external_data(model: Path) -> bool:
    """Whether the graph keeps its weights in other files (models over protobuf's 2 GB limit)."""
    return any(p != model for p in model.parent.glob(f"{model.name}*"))  # model.onnx_data, model.onnx.data
