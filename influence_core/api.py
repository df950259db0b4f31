"""The public Python API: `load` a model, then `generate` or `stream` from it.

    import influence_core as influence
    model = influence.load("path/to/model", backend="torch", device="auto")
    print(model.generate("What is Rust?", max_tokens=64).text)

The CLI is a thin layer over this module.
"""

from __future__ import annotations

import numbers
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .defaults import DEFAULT_MAX_TOKENS
from .errors import InfluenceError, ModelNotFoundError
from .generation import CacheState, Generation, GenerationResult, TextStream
from .interfaces import BackendOptions, ModelSource, Runner
from .plugins import Registry, call_plugin, get_registry
from .sampling import SamplingParams, build_chain
from .structured import constraint_from

Prompt = str | list[dict[str, str]] | list[int]


def open_source(model: str | Path) -> ModelSource:
    """Open a model (config and tokenizer; weights stay lazy).

    A `Path` is a model file or directory. A string is one too if it exists; otherwise it is a model
    name, which the installed model resolvers look up (hook spec 1.2; the shipped ``models`` plugin
    knows aliases, names in the store, and ORG/NAME on the Hugging Face hub, downloaded into the
    store on first use).
    """
    path = Path(model).expanduser()
    if path.exists():
        return _open_path(path)
    if isinstance(model, Path):
        raise ModelNotFoundError(f"model path {str(model)!r} does not exist")
    return _opened(get_registry().resolve_model(model))


def open_default_model(*, quantized: bool = False) -> ModelSource:
    """The default model, as the model resolvers find it (the shipped ones: the model `influence
    models default` chose, else the bundled one). ``quantized``: the caller will run a quantized
    format, so a model held both as a quantized file and as a float copy comes as the file."""
    return _opened(get_registry().resolve_model(None, prefer_quantized=quantized))


def _opened(resolved: Path | ModelSource) -> ModelSource:
    return resolved if isinstance(resolved, ModelSource) else _open_path(resolved)


def _open_path(path: Path) -> ModelSource:
    registry = get_registry()
    loader = registry.loader_for(path)
    return call_plugin(registry, loader, f"loader {loader.name!r}", loader.load, path)


def load(model: str | Path | ModelSource | None = None, *, backend: str = "torch", device: str = "auto",
         dtype: str = "auto", threads: int | None = None, context_length: int | None = None,
         max_batch: int | None = None, backend_options: Mapping[str, Any] | None = None) -> Model:
    """Load ``model`` onto a backend and device: a path, a model name (as `open_source` looks it up:
    ORG/NAME on the Hugging Face hub, downloaded on first use; a name in the store; an alias), an
    opened `ModelSource`, or None for the default model.

    ``device``: auto, cpu, cuda, cuda:N or mps. ``dtype``: auto (the backend's best for this model
    and device: for torch on a CPU, the file's own precision, so int4 for a 4-bit GGUF; bfloat16 on
    GPUs) or one the backend lists. ``context_length`` caps the KV cache below the model's context;
    ``max_batch`` is how many sequences may decode together (serving). ``backend_options`` are the
    backend's own options by name, as it declares them (`Backend.options_type`; `influence plugins`
    lists them): for torch, ``{"tensor_parallel": 2}`` splits the model across two processes
    (docs/scaling.md) and ``{"compiled": True}`` builds or loads its compiled decode step. One it
    does not declare, or a value of the wrong type, raises `BackendError`.
    """
    started = time.perf_counter()
    for option, value in (("threads", threads), ("context_length", context_length), ("max_batch", max_batch)):
        if value is not None and (not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1):
            raise InfluenceError(f"{option} must be an integer >= 1, got {value!r}")
    registry = get_registry()
    engine = registry.backend(backend)
    own_options = engine.options_type.from_values(backend_options or {}, backend)
    resolved_device = engine.resolve_device(device)
    # A backend that reads weights itself may run a quantized file's own blocks (the bundled GGUF's);
    # only if it picks a quantized format for them, though (`auto` on a CPU, or int8/int4 asked for).
    prefer_quantized = model is None and engine.uses_architectures and dtype in ("auto", "int8", "int4")
    if model is None:
        source = open_default_model(quantized=prefer_quantized)
    else:
        source = model if isinstance(model, ModelSource) else open_source(model)
    resolved_dtype = engine.resolve_dtype(dtype, resolved_device, source)
    if prefer_quantized and resolved_dtype not in ("int8", "int4"):
        source = _float_default_model(registry, source)
    architecture = registry.architecture_for(source.config, backend) if engine.uses_architectures else None
    options = {key: value for key, value in
               {"threads": threads, "context_length": context_length, "max_batch": max_batch}.items()
               if value is not None}
    # A backend that declares no options of its own (as none did before hook spec 1.2) takes no backend_options.
    declared = {} if engine.options_type is BackendOptions else {"backend_options": own_options}
    runner = call_plugin(registry, engine, f"backend {backend!r}", engine.load, source, architecture,
                         resolved_device, resolved_dtype, options, **declared)
    if not hasattr(runner, "logits_device"):  # a runner written for hook spec 1.0 or 1.1 called it `device`
        runner.logits_device = runner.device
    return Model(source, runner, backend=backend, device=resolved_device, dtype=resolved_dtype,
                 load_seconds=time.perf_counter() - started)


def _float_default_model(registry: Registry, quantized: ModelSource) -> ModelSource:
    """The default model again for a float format, where the resolvers hold another copy for it."""
    resolved = registry.resolve_model(None, prefer_quantized=False)
    return quantized if resolved == quantized.path else _opened(resolved)


class Model:
    """A loaded model. One generation at a time: it owns a single KV cache, which later calls reuse
    when their prompt starts with tokens already in it (multi-turn chat)."""

    def __init__(self, source: ModelSource, runner: Runner, *, backend: str, device: str, dtype: str,
                 load_seconds: float) -> None:
        self.source = source
        self.runner = runner
        self.backend = backend
        self.device = device
        self.dtype = dtype
        self.weight_format = runner.weight_format or dtype  # what ran, as precisely as the backend says
        self.load_seconds = load_seconds
        self.cache = CacheState()

    @property
    def config(self):
        return self.source.config

    @property
    def tokenizer(self):
        return self.source.tokenizer

    def encode_prompt(self, prompt: Prompt, *, raw: bool = False, system: str | None = None,
                      tools: list[dict[str, Any]] | None = None) -> list[int]:
        """Token ids for a prompt: a string (wrapped in the chat template unless ``raw`` or the model
        has none), a list of chat messages, or token ids as they are. ``tools`` (OpenAI's tool
        objects) go to the template as transformers passes them."""
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return list(prompt)
        tokenizer = self.tokenizer
        if isinstance(prompt, str) and (raw or not tokenizer.chat_template):
            if system is not None:
                raise InfluenceError("--system needs a chat template, and this model has none (or --raw was given)")
            return tokenizer.encode(prompt)
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if system is not None:
            messages.insert(0, {"role": "system", "content": system})
        return tokenizer.encode_chat(messages, tools=tools)

    def new_generation(self, prompt: Prompt, *, max_tokens: int | None = None, stop: Sequence[str] = (),
                       raw: bool = False, system: str | None = None, temperature: float | None = None,
                       top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
                       repetition_penalty: float | None = None, presence_penalty: float | None = None,
                       frequency_penalty: float | None = None, seed: int | None = None, sampler: str | None = None,
                       sampler_options: dict[str, Any] | None = None, response_format: Any = None,
                       logprobs: int | None = None, tools: list[dict[str, Any]] | None = None) -> Generation:
        """Tokenize and set up one generation (sampler chain, limits) without running it.

        Options left as None take the shared defaults (`influence_core.defaults`): sampling from
        the model's generation_config.json, else the built-in settings; ``max_tokens``
        `DEFAULT_MAX_TOKENS`. ``temperature=0`` is greedy. ``response_format`` constrains the text:
        "json" (any JSON object), a JSON schema dict, a pydantic model class, or a `Constraint` (a
        regex or a grammar too); see docs/structured-output.md. ``logprobs=N`` records each token's
        logprob and its N most likely alternatives in the result. ``tools`` go to the chat template."""
        requested_at = time.perf_counter()
        params = SamplingParams(
            temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
            repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty, sampler=sampler,
            # Drawn by the runner: one whose model spans processes gives each of them the same seed.
            seed=self.runner.random_seed() if seed is None else seed,
            sampler_options=dict(sampler_options or {}), constraint=constraint_from(response_format),
        )
        params.validate()
        eos = tuple(sorted(set(self.config.eos_token_ids) | set(self.tokenizer.eos_token_ids)))
        chain = build_chain(params.with_defaults(self.config.generation), get_registry(), self.runner.logits_device,
                            tokenizer=self.tokenizer, eos_token_ids=eos, vocab_size=self.config.vocab_size)
        prompt_ids = self.encode_prompt(prompt, raw=raw, system=system, tools=tools)
        limit = DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
        return Generation(self.tokenizer, prompt_ids, chain, limit, stop, eos,
                          self.runner.context_length, self.runner.logits_device, requested_at=requested_at,
                          logprobs=logprobs)

    def stream(self, prompt: Prompt, **options: Any) -> TextStream:
        """Start generating (options as `new_generation`); iterate the result for text pieces, then
        read its ``result``."""
        return TextStream(self.runner, self.cache, self.new_generation(prompt, **options))

    def generate(self, prompt: Prompt, **options: Any) -> GenerationResult:
        """Generate to the end and return the text, token ids, finish reason and timings."""
        stream = self.stream(prompt, **options)
        for _ in stream:
            pass
        return stream.result

    def generate_batch(self, prompts: list[Prompt], **options: Any) -> list[GenerationResult]:
        """Generate for several prompts at once: they decode together, up to ``max_batch`` at a
        time (see `load`), each stopping on its own. Results come back in prompt order."""
        from .batching import BatchEngine

        generations = [self.new_generation(prompt, **options) for prompt in prompts]
        engine = BatchEngine(self.runner, max_queue=len(generations), chunked_prefill=False)
        jobs = [engine.submit(generation) for generation in generations]
        self.cache.token_ids = []  # the batch overwrites slot 0
        engine.run_until_idle()
        failed = next((job.error for job in jobs if job.error), None)
        if failed:
            raise InfluenceError(failed)
        return [job.result for job in jobs]

    def logits(self, token_ids: Sequence[int]) -> Any:
        """Float32 logits for every position of ``token_ids`` from an empty cache: [len, vocab]."""
        self.cache.token_ids = []
        logits = self.runner.forward(list(token_ids), 0, all_logits=True)
        self.cache.token_ids = list(token_ids)
        return logits

    def close(self) -> None:
        self.runner.close()
