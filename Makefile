# Every target bootstraps .venv on a fresh clone; nothing else is needed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: test lab bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,temporal,langgraph]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

lab: $(STAMP)
	$(VENV)/bin/revive lab

bench: $(STAMP)
	$(PY) bench/proxy_overhead.py

clean:
	rm -rf $(VENV) .revive .pytest_cache
