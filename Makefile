# One command each: `make demo` and `make test` set everything up on a fresh clone and run.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
HOOK := $(VENV)/.startup_hook

.PHONY: setup demo test lint docs clean

setup: $(STAMP) $(HOOK)

$(STAMP): setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e ".[test,minilm,hf,flower]"
	touch $(STAMP)

# torchvision's fix at every interpreter start, so `import peft` or `import open_clip` works before
# `import fedilora` (src/fedilora/_compat.py)
$(HOOK): $(STAMP) src/fedilora/_compat.py
	$(BIN)/python -c "import fedilora._compat as c; print('installed', c.install_startup_hook())"
	touch $(HOOK)

demo: setup
	$(BIN)/fedilora fit --config configs/demo.yaml

test: setup
	$(BIN)/ruff check src tests experiments
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check src tests experiments

# the documentation site, strictly (a broken link fails), into build/site; the result tables are first
# rendered from the benchmarks' JSON (experiments/results/*.json)
docs: setup
	$(BIN)/python experiments/render_results.py
	$(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) runs .pytest_cache build/site
