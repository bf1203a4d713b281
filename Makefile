# The two commands of the README: `make demo` (the whole method on the embedded ELPV images) and `make test`.
# Each creates its own virtual environment and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_OUTPUT ?= demo_output

.PHONY: install lint format test demo demo-dense docs benchmark clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[testing,demo]"
	touch $@

install: $(VENV)/.installed

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: install
	$(BIN)/python -m pytest -q tests

demo: install
	$(BIN)/python examples/run_demo.py --output_dir $(DEMO_OUTPUT)

demo-dense: install
	$(BIN)/python examples/run_dense_demo.py --output_dir $(DEMO_OUTPUT)/dense

docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

benchmark: install
	$(BIN)/python benchmarks/benchmark_generic_distillation.py

clean:
	rm -rf $(VENV) build dist *.egg-info site .pytest_cache
