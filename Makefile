# kdsearch: `make demo` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1

.PHONY: install test-tools typecheck demo test lint bench quality soak faults clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned to the local CPU wheel; pyproject keeps a range so pip never pulls CUDA builds.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev,onnx,s3]"
	touch $(STAMP)

demo: install
	$(BIN)/kdsearch demo

# Debian packages some tests drive: chromium (the dashboard's browser tests; Playwright cannot download its own
# browser here) and faketime (libfaketime: worker "hosts" whose clocks disagree). Installed when missing and running
# as root, else a one-line reason and a failure, never a silent skip.
TEST_PACKAGES := chromium:/usr/bin/chromium faketime:/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1
test-tools:
	@missing=""; for entry in $(TEST_PACKAGES); do \
	  [ -e "$${entry#*:}" ] || missing="$$missing $${entry%%:*}"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian's$$missing for the tests"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  else \
	    echo "make test: the tests need Debian's$$missing: run 'sudo apt-get install$$missing' (or make test as root)" >&2; \
	    exit 1; \
	  fi; fi

typecheck: install
	$(BIN)/mypy

test: install test-tools
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

faults: install
	$(BIN)/python bench/faults.py

clean:
	rm -rf $(VENV) artifacts demo-export kdsearch.db kdsearch.db-wal kdsearch.db-shm kdsearch.db-schema-lock
