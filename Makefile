# Two commands do all set-up on a fresh machine:
#   make run    -> creates .venv (CPU torch pinned by constraints.txt), then runs the main job
#   make test   -> creates .venv if needed, then runs the test suite
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
OUT ?= runs/latest
PYTEST_ARGS ?=

.PHONY: run test setup figures clean-venv

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -c constraints.txt torch==2.13.0
	$(VENV)/bin/pip install -q -c constraints.txt -e ".[test,notebooks]"
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/workbench run --out $(OUT)

# the committed figures/: the main job on the organism, published (figures, report, data tables)
figures: $(STAMP)
	$(VENV)/bin/workbench run --out runs/organism --publish figures

test: $(STAMP)
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
