# One command each: `make demo` and `make test` set everything up on a fresh clone and run.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint clean

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e ".[test,minilm,hf,flower]"
	touch $(STAMP)

demo: setup
	$(BIN)/fedilora fit --config configs/demo.yaml

test: setup
	$(BIN)/ruff check src tests experiments
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check src tests experiments

clean:
	rm -rf $(VENV) runs .pytest_cache
