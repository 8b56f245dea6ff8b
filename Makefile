# The two set-up commands. Both create .venv on first use and install the package into it.
#
# torch is pinned to 2.13.0 here because that CPU wheel is available locally on the dev/CI machines;
# any torch >= 2.6 works (pyproject). DeepSpeed ships only an sdist whose build imports torch, so
# everything is installed without build isolation: an isolated build would fetch a CUDA torch.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast install clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" "setuptools>=68" wheel
	$(PY) -m pip install -q --no-build-isolation -e ".[deepspeed,fairscale,mpi,dev,hf,plot]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/dist-train launch configs/quickstart.yaml --nproc 2
	@echo
	@echo "TensorBoard logs: runs/quickstart/tb  ->  $(VENV)/bin/tensorboard --logdir runs/"

# Four pytest workers keep two cores busy: most tests wait on subprocesses, rendezvous or a
# launcher part of the time (with three workers the cores still sat idle about a third of the suite).
# Measured on fresh clones on 2026-12-07, a host whose speed varied by ~20% through the day: the
# non-serial part took 13:51 and 15:09 with four workers, 15:20 with three: a small gain at most. Each test file
# stays on one worker so its module fixtures run once. Tests marked `serial` (wall-clock
# assertions, a Slurm cluster, network namespaces) then run alone. The slowest tests are listed at
# the end of each part, so a suite creeping towards its 15-minute budget shows where.
test: $(STAMP)
	$(PY) -m pytest -q -n 4 --dist loadfile -m "not serial" --durations=15
	$(PY) -m pytest -q -m serial --durations=5

# The fast tier, for the edit-test loop: every package is exercised, but not by the tests marked
# `slow` (smoke-size benchmarks, multi-process runs of about 5 s or more, and the second and later
# backends of a test repeated over backends: tests/tiers.py). Its few short `serial` tests run
# alone afterwards, as in `make test`. Under 5 minutes on 2 cores.
test-fast: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not slow and not serial" --durations=10
	$(PY) -m pytest -q -m "serial and not slow" --durations=5

clean:
	rm -rf $(VENV) runs .pytest_cache
