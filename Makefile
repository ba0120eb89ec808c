# kdsearch: `make demo` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1

.PHONY: install browser typecheck demo test lint bench quality soak clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned to the local CPU wheel; pyproject keeps a range so pip never pulls CUDA builds.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev,onnx]"
	touch $(STAMP)

demo: install
	$(BIN)/kdsearch demo

# The dashboard's browser tests drive Debian's Chromium (Playwright cannot download its own browser here): installed
# when missing and running as root, else a one-line reason and a failure, never a silent skip.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian's chromium for the dashboard's browser tests"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; \
	  else \
	    echo "make test: the dashboard's browser tests need Chromium: run 'sudo apt-get install chromium' (or make test as root)" >&2; \
	    exit 1; \
	  fi; }

typecheck: install
	$(BIN)/mypy

test: install browser
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .

bench: install
	$(BIN)/python bench/trial_speed.py

quality: install
	$(BIN)/python bench/quality.py

soak: install
	$(BIN)/python bench/soak.py

clean:
	rm -rf $(VENV) artifacts demo-export kdsearch.db kdsearch.db-wal kdsearch.db-shm
