# The two commands a new user needs: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: run test lint unit bench soak fuzz debs clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,postgres]'
	touch $@

debs:
	bash scripts/install-debs.sh

run: $(STAMP)
	$(BIN)/mailward serve --demo

lint: $(STAMP)
	$(BIN)/ruff check src tests $(wildcard bench fuzz)
	$(BIN)/mypy --strict src

test: $(STAMP) debs lint
	$(BIN)/python -m pytest -q

unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

# BENCH_ARGS=--quick for a short check that everything runs.
# Cyrus SASL lets the benchmark's Postfix require AUTH on 465/587 as mailward does.
bench: $(STAMP)
	bash scripts/install-debs.sh sasl2-bin libsasl2-modules libsasl2-modules-db
	$(BIN)/python bench/run.py $(BENCH_ARGS)

# The soak alone (make bench runs it last): SOAK_ARGS="--minutes 2" for a short check.
soak: $(STAMP)
	$(BIN)/python bench/soak.py $(SOAK_ARGS)

fuzz: $(STAMP)
	MAILWARD_FUZZ_SECONDS=$${MAILWARD_FUZZ_SECONDS:-600} $(BIN)/python -m pytest -q -m fuzz tests

clean:
	rm -rf $(VENV) var .mypy_cache .ruff_cache .pytest_cache .hypothesis
