"""Tiny model files built with numpy alone (a GGUF, a Hugging Face directory), and a worker process
that opens mutated copies of them under a memory and time budget.

The worker imports Influence once and then loads one model file per request, so a fuzzing run pays
for torch's import once, not once per case. It runs under RLIMIT_AS (its size after imports plus the
budget), so a memory bomb fails as a MemoryError rather than taking the machine; the parent enforces
the time budget and restarts a worker that dies or overruns.

Run as ``python model_file_fuzzing.py BUDGET_BYTES``: reads one path per line on stdin, writes one
JSON object per line on stdout: ``outcome`` is "loaded", "refused" (an InfluenceError), or a failure
("unexpected", "memory", "warning", "garbage", "multi-line"), with ``message``.
"""

from __future__ import annotations

import json
import os
import resource
import select
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

WORKER = Path(__file__)
MEMORY_BUDGET = 2 << 30
TIME_BUDGET_S = 30.0

CONFIG = {"vocab_size": 260, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
          "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "bos_token_id": 1, "eos_token_id": 2,
          "tie_word_embeddings": False, "model_type": "llama", "architectures": ["LlamaForCausalLM"]}


def byte_level_vocabulary() -> list[str]:
    """<unk>, <s>, </s>, the 256 byte-level characters, and one merged token: 260 tokens."""
    from tokenizers import pre_tokenizers

    return ["<unk>", "<s>", "</s>", *sorted(pre_tokenizers.ByteLevel.alphabet()), "he"]


def llama_weights(config: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights under Hugging Face's Llama names."""
    rng = np.random.default_rng(seed)
    hidden, inner, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    head_dim = hidden // config["num_attention_heads"]
    q_rows, kv_rows = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim

    def random(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    weights = {"model.embed_tokens.weight": random(vocab, hidden), "lm_head.weight": random(vocab, hidden),
               "model.norm.weight": 1 + random(hidden)}
    for i in range(config["num_hidden_layers"]):
        layer = f"model.layers.{i}."
        weights.update({
            layer + "input_layernorm.weight": 1 + random(hidden),
            layer + "post_attention_layernorm.weight": 1 + random(hidden),
            layer + "self_attn.q_proj.weight": random(q_rows, hidden),
            layer + "self_attn.k_proj.weight": random(kv_rows, hidden),
            layer + "self_attn.v_proj.weight": random(kv_rows, hidden),
            layer + "self_attn.o_proj.weight": random(hidden, q_rows),
            layer + "mlp.gate_proj.weight": random(inner, hidden),
            layer + "mlp.up_proj.weight": random(inner, hidden),
            layer + "mlp.down_proj.weight": random(hidden, inner),
        })
    return weights


def write_model_directory(directory: Path, config: dict | None = None, seed: int = 0) -> Path:
    """config.json, tokenizer.json, tokenizer_config.json and model.safetensors, as transformers lays them out."""
    from safetensors.numpy import save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    config = config or CONFIG
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    tokens = byte_level_vocabulary()
    tokenizer = Tokenizer(models.BPE({token: i for i, token in enumerate(tokens)}, [("h", "e")]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(["<unk>", "<s>", "</s>"])
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>",
         "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"}))
    save_file(llama_weights(config, seed), str(directory / "model.safetensors"))
    return directory


GGUF_LAYER_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                    "mlp.down_proj": "ffn_down"}
GGUF_MODEL_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                    "lm_head.weight": "output.weight"}


def gguf_name(hf_name: str) -> str:
    if hf_name in GGUF_MODEL_NAMES:
        return GGUF_MODEL_NAMES[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{GGUF_LAYER_NAMES[module]}.{kind}"


def write_gguf(path: Path, config: dict | None = None, *, metadata: dict | None = None,
               quantization: str = "F32", seed: int = 0) -> Path:
    """A GGUF of the random Llama, as llama.cpp's converter writes one (q and k rows are random
    either way, so their permutation is left out). ``metadata`` overrides llama.* keys by name."""
    import gguf

    config = config or CONFIG
    writer = gguf.GGUFWriter(path, "llama")
    keys = {"llama.block_count": config["num_hidden_layers"],
            "llama.context_length": config["max_position_embeddings"],
            "llama.embedding_length": config["hidden_size"],
            "llama.feed_forward_length": config["intermediate_size"],
            "llama.attention.head_count": config["num_attention_heads"],
            "llama.attention.head_count_kv": config["num_key_value_heads"],
            "llama.attention.layer_norm_rms_epsilon": config["rms_norm_eps"],
            "llama.rope.freq_base": config["rope_theta"], **(metadata or {})}
    tokens = byte_level_vocabulary()
    keys.update({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens,
                 "tokenizer.ggml.token_type": [3, 3, 3] + [1] * (len(tokens) - 3),
                 "tokenizer.ggml.merges": ["h e"], "tokenizer.ggml.bos_token_id": 1,
                 "tokenizer.ggml.eos_token_id": 2,
                 "tokenizer.chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
                 **{key: value for key, value in (metadata or {}).items() if key.startswith("tokenizer.")}})
    for key, value in keys.items():
        add_metadata(writer, key, value)
    for name, values in llama_weights(config, seed).items():
        if values.ndim == 2 and quantization != "F32":
            qtype = gguf.GGMLQuantizationType[quantization]
            writer.add_tensor(gguf_name(name), gguf.quants.quantize(values, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_name(name), values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def add_metadata(writer, key: str, value: object) -> None:
    """A metadata value in the GGUF type its Python type suggests (llama.cpp's converter writes
    counts as uint32, floats as float32)."""
    import gguf

    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, list):
        writer.add_array(key, value)
    elif 0 <= value < 2**32:
        writer.add_uint32(key, value)
    elif -2**31 <= value < 0:
        writer.add_int32(key, value)
    else:
        writer.add_key_value(key, value % 2**64, gguf.GGUFValueType.UINT64)


class Worker:
    """The worker process, seen from the test: ``attempt(path)`` -> (outcome, message, seconds)."""

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None

    def _start(self) -> subprocess.Popen:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        return subprocess.Popen([sys.executable, str(WORKER), str(MEMORY_BUDGET)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True, env=env)  # stderr: the test's own

    def attempt(self, path: Path) -> dict:
        if self.process is None or self.process.poll() is not None:
            self.process = self._start()
        started = time.monotonic()
        self.process.stdin.write(f"{path}\n")
        self.process.stdin.flush()
        ready, _, _ = select.select([self.process.stdout], [], [], TIME_BUDGET_S + 60)  # + start-up
        line = self.process.stdout.readline() if ready else ""
        if not line:
            self.close()
            reason = "over the time budget" if not ready else "the worker died"
            return {"outcome": "timeout" if not ready else "crash", "message": reason,
                    "seconds": time.monotonic() - started}
        return json.loads(line)

    def close(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


def _serve(budget: int) -> None:
    import signal
    import warnings

    import torch

    import influence_core
    from influence_core.errors import InfluenceError

    torch.set_num_threads(1)
    with open("/proc/self/status") as status:
        size_kb = int(next(line for line in status if line.startswith("VmSize:")).split()[1])
    limit = size_kb * 1024 + budget
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    def overrun(signum, frame):
        raise TimeoutError("over the time budget")

    signal.signal(signal.SIGALRM, overrun)
    for line in sys.stdin:
        path = Path(line.rstrip("\n"))
        started = time.monotonic()
        signal.setitimer(signal.ITIMER_REAL, TIME_BUDGET_S)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                model = influence_core.load(path, device="cpu", dtype="float32")
                logits = model.logits(model.tokenizer.encode("hello"))
                outcome, message = ("loaded", "") if bool(torch.isfinite(logits).all()) else (
                    "garbage", "the model loaded but its logits are not finite")
                model.close()
            except InfluenceError as error:
                message = str(error)
                outcome = "refused" if message and "\n" not in message else "multi-line"
            except MemoryError as error:
                outcome, message = "memory", f"MemoryError: {error}"
            except TimeoutError as error:
                outcome, message = "timeout", str(error)
            except Exception as error:  # what the fuzzing looks for: anything the loaders did not anticipate
                outcome, message = "unexpected", f"{type(error).__name__}: {error}"
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        if caught and outcome in ("loaded", "refused"):
            outcome, message = "warning", f"{caught[0].category.__name__}: {caught[0].message}"
        print(json.dumps({"outcome": outcome, "message": message[:500],
                          "seconds": round(time.monotonic() - started, 3)}), flush=True)


if __name__ == "__main__":
    _serve(int(sys.argv[1]))
