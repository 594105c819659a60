# Two commands from a fresh clone: `make quickstart` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install quickstart test test-fast lint format bench image clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# The main job on the embedded default data set (scikit-learn's digits).
quickstart: $(STAMP)
	$(BIN)/python -m raycollapse.quickstart

# The whole suite, slow tests included, with the 15 slowest printed. Two pytest workers
# (pytest-xdist), each with its own local Ray: most slow tests wait on process start-up and
# Ray's polling rather than on a CPU, so two overlap well on 2 cores.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_core.py

# The cluster image (Dockerfile; see notes on running on a cluster).
image:
	docker build -t raycollapse:0.1.0 .

clean:
	rm -rf $(VENV) runs .pytest_cache
