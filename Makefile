# kdsearch: `make demo` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1

.PHONY: install demo test lint bench quality soak clean

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

test: install
	$(BIN)/ruff check .
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
