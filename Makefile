# Two set-up commands: `make demo` and `make test`. Both create the environment if needed.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Verified versions (CPU wheels / pure Python on these machines).
TORCH := torch==2.13.0
MEGATRON := megatron-core==0.16.1
NVML := nvidia-ml-py==13.615.71
FAIRSCALE := fairscale==0.4.13
# DeepSpeed builds no ops at install (DS_BUILD_OPS=0) and must not pull a CUDA torch into an
# isolated build environment; at run time DS_ACCELERATOR=cpu JIT-builds one small op with g++.
DEEPSPEED := deepspeed==0.19.8
# Triton runs the symmetric-product kernel on GPU, and on CPU under TRITON_INTERPRET=1 (tests).
TRITON := triton==3.9.0
# torchtitan (the optimizer-container test) and the few packages its imported modules need, without
# pip's resolver: torchtitan 0.3.0's full requirements would downgrade huggingface_hub and fsspec under transformers.
TORCHTITAN := torchtitan==0.3.0 tyro==1.0.17 docstring_parser==0.18.0 typeguard==4.6.1 spmd_types==0.2.3

.PHONY: env demo test clean

env: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q $(MEGATRON) $(NVML) $(FAIRSCALE) $(TRITON)
	DS_BUILD_OPS=0 DS_ACCELERATOR=cpu $(PY) -m pip install -q --no-build-isolation $(DEEPSPEED)
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps $(TORCHTITAN)
	touch $@

demo: env
	$(PY) launch/demo.py

test: env
	$(PY) -m ruff check lanton_dist launch tests slurm
	DS_ACCELERATOR=cpu $(PY) -m pytest -q --durations=15 tests

clean:
	rm -rf $(VENV) runs .pytest_cache
