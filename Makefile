# Local commands. `make demo` and `make test` are the two a newcomer needs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv test test-fast lint demo up down bench reliability clean

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-dev.txt
	touch $(STAMP)

venv: $(STAMP)

## the whole suite; it starts and stops the emulators it needs
test: $(STAMP)
	$(PY) -m pytest -q

## the unit tier: no emulator, no socket, seconds
test-fast: $(STAMP)
	$(PY) -m pytest tests/unit -q

## ruff (pyflakes, bugbear, import order) and mypy (strict on handlers/ and config/), pyproject.toml
lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m mypy

## the main job offline: every local service, sample DICOM, two exports through Pub/Sub, the seed's queries
demo: $(STAMP)
	$(PY) -m stack demo

## keep the local stack running (endpoints and environment printed); stop it with make down
up: $(STAMP)
	$(PY) -m stack up

down:
	$(PY) -m stack down

## benchmarks: each prints its figure and its ratio to a baseline measured in the same run
bench: $(STAMP)
	$(PY) bench/cold_start.py
	$(PY) bench/intake_throughput.py
	$(PY) bench/poller.py
	$(PY) bench/ingest.py
	$(PY) bench/emulator_export.py --instances $${BENCH_INSTANCES:-20000}
	$(PY) bench/emulator_import.py --instances $${BENCH_INSTANCES:-20000}
	$(PY) bench/bq_dml.py

## the reliability suite at full size; exits non-zero when a figure is not met (make test runs it small)
reliability: $(STAMP)
	RELIABILITY_SCALE=full $(PY) -m pytest tests/reliability -q -rA

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
