# transact-pl: `make demo` installs and runs the default job; `make test` installs and runs the tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-slow clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: on CPU machines 2.13.0 is the CPU build; an unpinned torch pulls a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[quant,dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) train.py fit --config configs/smollm2_transact.yaml

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

clean:
	rm -rf runs exports lightning_logs .pytest_cache

# `make test-kill`: runs of a tiny model are SIGKILLed at random moments, resumed from their last checkpoint and
# must end with the export of the run that never stopped; a saver killed mid-write leaves a whole checkpoint (~3 min).
.PHONY: test-kill
test-kill: $(STAMP)
	$(PY) -m pytest -q -m kill tests/test_kill.py
