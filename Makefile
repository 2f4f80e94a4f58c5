# Two commands matter: `make demo` and `make test`. Both build .venv from requirements.lock first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-all bench lint clean notebook

venv: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

demo: venv
	$(BIN)/medtransfer quickstart --out demo_out

test: venv
	$(BIN)/python -m pytest -m "not slow and not bench" -n 2 --dist loadfile

test-all: venv
	$(BIN)/python -m pytest

bench: venv
	$(BIN)/python benchmarks/decode_throughput.py
	$(BIN)/python benchmarks/cache_throughput.py
	$(BIN)/python benchmarks/load_vs_monai.py
	$(BIN)/python benchmarks/scoring_throughput.py
	$(BIN)/python benchmarks/scoring_vs_predict.py
	$(BIN)/python benchmarks/scoring_workers.py
	$(BIN)/python benchmarks/scoring_memory.py
	$(BIN)/python benchmarks/training_overhead.py
	$(BIN)/python benchmarks/augment_throughput.py
	$(BIN)/medtransfer train --spec data_specs/breastmnist.yaml --out benchmarks/out/ood_breast --overwrite
	$(BIN)/python benchmarks/ood_detection.py --run benchmarks/out/ood_breast

# JupyterLab on top of the project's environment, from its own pins (requirements.lock unchanged).
# Extra server options: make notebook JUPYTER_ARGS="--no-browser --port 8890"
JUPYTER_ARGS ?=
NOTEBOOK_STAMP := $(VENV)/.notebook-installed

$(NOTEBOOK_STAMP): $(STAMP) requirements-notebook.lock
	$(BIN)/python -m pip install --quiet -r requirements-notebook.lock -c requirements.lock
	touch $(NOTEBOOK_STAMP)

notebook: $(NOTEBOOK_STAMP)
	$(BIN)/jupyter lab notebooks/ $(JUPYTER_ARGS)

lint: venv
	$(BIN)/ruff check medtransfer tests benchmarks
	$(BIN)/ruff format --check medtransfer tests benchmarks

clean:
	rm -rf $(VENV) demo_out .pytest_cache .ruff_cache
