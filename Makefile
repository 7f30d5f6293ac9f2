# Two commands are all a newcomer needs: `make demo` and `make test` (both set up the venv).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CONSTRAINTS := requirements/constraints.txt
STAMP := $(VENV)/.installed
DEVSLURM := scripts/devslurm.sh
SLURM_CONF_FILE := $(CURDIR)/.devslurm/etc/slurm.conf
# Slurm hosts of the local cluster: 1 (localhost), or 2 and more (localhost plus node1..N in
# network namespaces). The test suite needs two for its multi-node tests.
NODES ?= 1

.PHONY: venv demo demo-slurm test test-all lint fmt test-unit test-integration test-slurm slurm-up slurm-down bench chaos clean-venv

venv: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q pip==24.3.1
	# torch first (deepspeed's build imports it), then deepspeed without build isolation,
	# then the package itself; everything pinned by the constraints file.
	$(PIP) install -q -c $(CONSTRAINTS) torch torchvision
	$(PIP) install -q -c $(CONSTRAINTS) --no-build-isolation deepspeed
	$(PIP) install -q -c $(CONSTRAINTS) -e '.[dev,deepspeed]'
	touch $(STAMP)

demo: venv
	$(VENV)/bin/slurmvision demo

demo-slurm: venv slurm-up
	SLURM_CONF=$(SLURM_CONF_FILE) $(VENV)/bin/slurmvision demo --cluster devslurm

# One pytest session, two workers: the Slurm tests spend most of their time waiting on Slurm, so
# the other worker trains meanwhile. Tests that share Slurm nodes form one xdist group (localhost,
# two-hosts) and run one after another on one worker; everything else is spread over both.
test: venv lint
	bash $(DEVSLURM) up --nodes 2
	SLURM_CONF=$(SLURM_CONF_FILE) $(PY) -m pytest tests -m "not slow" -n 2 --dist loadgroup --durations=40

test-all: venv lint
	bash $(DEVSLURM) up --nodes 2
	SLURM_CONF=$(SLURM_CONF_FILE) $(PY) -m pytest tests -n 2 --dist loadgroup

# ruff: the format (line length 120) and the lint rules of pyproject.toml; `make fmt` applies both.
lint: venv
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/ruff check src tests benchmarks

fmt: venv
	$(VENV)/bin/ruff format src tests benchmarks
	$(VENV)/bin/ruff check --fix src tests benchmarks

test-unit: venv
	$(PY) -m pytest tests -m unit

test-integration: venv
	$(PY) -m pytest tests -m integration

test-slurm: venv
	bash $(DEVSLURM) up --nodes 2
	SLURM_CONF=$(SLURM_CONF_FILE) $(PY) -m pytest tests -m slurm -n 2 --dist loadgroup

slurm-up:
	bash $(DEVSLURM) up --nodes $(NODES)

slurm-down:
	bash $(DEVSLURM) down

# Every CPU benchmark of benchmarks/, one after another: each writes its section of benchmarks/RESULTS.md
# and its keys of benchmarks/results.json; a listed script missing from the checkout stops the target. The GPU
# benchmark runs on a GPU machine: benchmarks/gpu.sh OUT_DIR (its CPU check, --smoke, is in make test).
BENCHMARKS := data_pipeline grad_checkpointing trainer_vs_bare checkpoint_io login_commands restart shard_build
bench: venv
	@set -e; for name in $(BENCHMARKS); do \
		script=benchmarks/$$name.py; \
		if [ ! -f $$script ]; then echo "make bench: $$script is missing" >&2; exit 1; fi; \
		echo "== $$script"; $(PY) $$script; \
	done

# Ten faults drawn from SEED on the local cluster, the cluster-wide ones too (slurmctld restarted,
# slurmdbd stopped a minute): run it alone. Its table goes to benchmarks/RESULTS.md.
SEED ?= 1
chaos: venv slurm-up
	SLURM_CONF=$(SLURM_CONF_FILE) $(PY) benchmarks/chaos.py --seed $(SEED) --faults 10

clean-venv:
	rm -rf $(VENV)
