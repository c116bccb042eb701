# flatminima developer tasks.  Every install step pins torch through
# constraints.txt so that pip uses the CPU wheel and never pulls CUDA packages.

PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
PIP    := $(VPY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: venv test typecheck demo bench bench-peers gpu-check clean distclean

venv: $(STAMP)

# Re-runs whenever pyproject.toml or constraints.txt changes; an existing
# .venv without the stamp is reused (installing into it is idempotent).
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -c constraints.txt torch==2.13.0
	$(PIP) install -c constraints.txt -e '.[dev,cli]'
	touch $@

test: venv
	$(VPY) -m mypy
	$(VPY) -m pytest -n 2 -q

typecheck: venv
	$(VPY) -m mypy

# The default comparison of the `flatminima` command (SGD, SAM, ASAM, WSAM on
# MNIST-1D, 3 seeds) on 30% noisy labels, asked for explicitly: the command's
# default is clean labels; results in runs/<timestamp>/.
demo: venv
	$(VENV)/bin/flatminima compare --noise 0.3

bench: venv
	$(VPY) -m benchmarks --training
	$(VPY) -m benchmarks.peers --threads 1

# flatminima against pytorch_optimizer alone (issue #15): steps, bookkeeping, peak memory.
bench-peers: venv
	$(VPY) -m benchmarks.peers --threads 1

# The CUDA checks, host synchronisations and benchmark ratios (at most ~4 minutes on one GPU; a CPU
# fallback without one). No venv: a GPU machine runs it with its own Python and CUDA build of torch.
GPU_PYTHON ?= python3
gpu-check:
	PYTHONPATH=src:. $(GPU_PYTHON) -m benchmarks.gpu_check

# Build artefacts and caches; keeps the virtual environment.
clean:
	rm -rf build dist src/*.egg-info .pytest_cache .hypothesis
	find . \( -path ./$(VENV) -o -path ./.git \) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

# Everything clean removes, plus the virtual environment.
distclean: clean
	rm -rf $(VENV)
