# Everything a newcomer needs: `make run` serves on the embedded defaults,
# `make test` runs the whole suite. Both set up the virtual environment first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
NPM    ?= npm
EMBED  := gateway/static/cellgate.js
EMBED_SOURCES := $(wildcard client-js/src/*.ts) client-js/build.mjs

.PHONY: run test lint embed embed-test pytest bench clean

$(VENV)/.runtime: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

# The embed (client-js/) is built into gateway/static/ when Node.js is here; without
# it the server still runs, and its demo page says what is missing.
embed:
	@if command -v $(NPM) >/dev/null 2>&1; then $(MAKE) --no-print-directory $(EMBED); \
	else echo "Node.js (npm) not found: the embed (/static/cellgate.js) is not built, so the demo page cannot run code. Install Node.js 20+ and run 'make embed'." >&2; fi

client-js/node_modules/.installed: client-js/package.json client-js/package-lock.json
	cd client-js && $(NPM) ci --no-audit --no-fund --loglevel=error
	touch $@

$(EMBED): client-js/node_modules/.installed $(EMBED_SOURCES)
	cd client-js && $(NPM) run --silent build

run: $(VENV)/.runtime embed
	$(PY) -m gateway $(ARGS)

lint: $(VENV)/.dev
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# The embed's type check, unit tests, and end-to-end tests in Chromium against a real gateway.
embed-test: $(VENV)/.runtime client-js/node_modules/.installed $(EMBED)
	cd client-js && $(NPM) run --silent typecheck && $(NPM) run --silent test:unit
	cd client-js && CELLGATE_PYTHON=$(abspath $(PY)) $(NPM) run --silent test:e2e

pytest: $(VENV)/.dev $(EMBED)
	$(PY) -m pytest $(PYTEST_ARGS)

test: lint embed-test pytest

bench: $(VENV)/.dev
	$(PY) bench/latency.py

clean:
	rm -rf $(VENV) cellgate-data .pytest_cache .ruff_cache client-js/node_modules client-js/.test-build
	rm -f gateway/static/cellgate*
