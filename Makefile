# The few commands people type. Each creates .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: install browser run test test-all lint bench world

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

## the browse page's map library (Leaflet, pinned, from the npm registry, integrity-checked; ignored by git)
MAP := catalog/static/vendor/leaflet/VERSION.json
$(MAP): catalog/vendor.py | $(STAMP)
	$(PY) -m catalog.vendor || echo "note: the map library could not be installed (npm); the browse page needs it"

install: $(STAMP) $(MAP)

## main job on the offline default: build the demo corpus, validate it, print where everything is
run: $(STAMP) $(MAP)
	$(PY) -m flows.demo

## Debian's chromium + chromedriver for the browse-page test (installed once, when missing)
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then \
	  sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	else echo "note: cannot install chromium here; the browse-page test will be skipped"; fi

## the fast test suite (slow tests: make test-all); the page screenshot lands in artifacts/
test: $(STAMP) $(MAP) browser
	$(PY) -m pytest -q

test-all: $(STAMP) $(MAP) browser
	$(PY) -m pytest -q -m ''

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench: $(STAMP)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[bench]'
	$(PY) bench/build.py
	$(PY) bench/store_size.py
	$(PY) bench/loader.py
	$(PY) bench/train.py
	$(PY) bench/catalog.py
	$(PY) bench/ee_sim.py
	$(PY) bench/realism.py
	$(PY) bench/farmland.py
	$(PY) bench/scale.py

## regenerate the committed offline world layers (maintainers; needs the network to PyPI)
world: $(STAMP)
	$(PY) -m pip install -q -e '.[world]'
	$(PY) -m mmearth_data.world.make_world
