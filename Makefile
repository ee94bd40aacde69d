# Two commands do all set-up on a fresh machine, from the lock (requirements-lock.txt, exact versions + hashes):
#   make run    -> creates .venv from the lock, then runs the main job
#   make test   -> creates .venv from the lock if needed, then runs the test suite
#   make lock   -> re-resolves requirements-lock.txt from pyproject.toml (see README, "Upgrading")
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
LOCK := requirements-lock.txt
OUT ?= runs/latest
PYTEST_ARGS ?=

.PHONY: run test setup figures lock doctor clean-venv

$(STAMP): pyproject.toml $(LOCK)
	rm -rf $(VENV)
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --require-hashes -r $(LOCK)
	$(VENV)/bin/pip install -q --no-deps --no-build-isolation -e .
	$(VENV)/bin/pip check
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/workbench run --out $(OUT)

# the committed figures/: the main job on the organism, published (figures, report, data tables)
figures: $(STAMP)
	$(VENV)/bin/workbench run --out runs/organism --steering.seeds 0,1,2 --publish figures

test: $(STAMP)
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

doctor: $(STAMP)
	$(VENV)/bin/workbench doctor --json

# Resolve every package the set-up installs (runtime, test and notebook extras, build backend) to exact versions
# with hashes. constraints.txt pins the CPU build of torch. Then: make clean-venv test, and rerun the main job.
lock:
	$(PY) -m venv .venv-lock
	.venv-lock/bin/pip install -q "pip-tools==7.6.2"
	.venv-lock/bin/pip-compile --quiet --generate-hashes --allow-unsafe --all-build-deps --strip-extras \
		--extra test --extra notebooks --no-emit-index-url --no-emit-find-links -c constraints.txt \
		--upgrade -o $(LOCK) pyproject.toml
	rm -rf .venv-lock

clean-venv:
	rm -rf $(VENV)
