# Two set-up commands: `make demo` and `make test`. Both create the environment if needed.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Verified versions (CPU wheels / pure Python on these machines).
TORCH := torch==2.13.0
MEGATRON := megatron-core==0.16.1
NVML := nvidia-ml-py==13.615.71

.PHONY: env demo test clean

env: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q $(MEGATRON) $(NVML)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: env
	$(PY) launch/demo.py

test: env
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) runs .pytest_cache
