# The two commands: `make demo` and `make test`. Both install what they need first.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test lint bench clean-labs

setup:
	@bash scripts/bootstrap.sh

demo: setup
	@$(VENV)/bin/nodemesh demo

test: setup
	@$(VENV)/bin/ruff check .
	@$(PY) -m pytest -q -p no:cacheprovider

lint: setup
	@$(VENV)/bin/ruff check .

bench: setup
	@$(PY) -m bench

clean-labs: setup
	@$(VENV)/bin/nodemesh lab down --all
