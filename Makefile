# The few commands people type. Each creates .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: install run test test-all lint bench world

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

## main job on the offline default: build the demo corpus, validate it, print where everything is
run: $(STAMP)
	$(PY) -m flows.demo

## the fast test suite (slow tests: make test-all)
test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m ''

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench: $(STAMP)
	$(PY) bench/build.py
	$(PY) bench/store_size.py
	$(PY) bench/loader.py
	$(PY) bench/train.py

## regenerate the committed offline world layers (maintainers; needs the network to PyPI)
world: $(STAMP)
	$(PY) -m pip install -q -e '.[world]'
	$(PY) -m mmearth_data.world.make_world
