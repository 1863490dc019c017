# Two set-up commands: `make demo` and `make test`. Each installs the Debian packages it needs when
# missing (or stops, naming the command), then creates .venv and installs what it needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test debian-demo debian-test lint check-deploy clean
# Prerequisites in the order written: the Debian check runs before anything else (python3-venv first).
.NOTPARALLEL:

debian-demo debian-test:
	@PYTHON=$(PYTHON) deploy/setup-debian.sh $(@:debian-%=%)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: debian-demo $(STAMP)
	$(VENV)/bin/riskwatch demo

test: debian-test $(STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check app agents models deploy tests bench
	$(VENV)/bin/mypy app agents models deploy

clean:
	rm -rf $(VENV) .riskwatch-data .pytest_cache .mypy_cache .ruff_cache
