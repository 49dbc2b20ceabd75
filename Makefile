# Two commands on a fresh clone: `make demo` and `make test`.
VENV   ?= .venv
PYTHON ?= python3
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed-stamp

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/streamfuse demo --duration 90 --fault image:fog@40 --summary out/demo-summary.json

test: $(STAMP)
	$(PY) -m pytest

clean:
	rm -rf $(VENV) .cache out .pytest_cache
