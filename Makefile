# `make demo`: set up .venv and run the embedded default; `make test`: set up .venv and run the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/activate
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(BIN)/leakbench run experiments/default.yaml --out results/default

test: $(VENV)/.installed
	$(BIN)/ruff check leakbench splitnn defenses attacks evaluation contracts tests benchmarks
	mkdir -p .mypy_cache/tree/leakbench && ln -sfn $(addprefix $(CURDIR)/,leakbench/__init__.py contracts splitnn defenses attacks evaluation) .mypy_cache/tree/leakbench/ && $(BIN)/mypy -p leakbench
	$(BIN)/python -m pytest -q

clean:
	rm -rf results .pytest_cache
