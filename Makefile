# Quick start: `make demo` runs the demo, `make test` the test suite; both install what they need into .venv.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast

$(STAMP): setup.py constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	PIP_CONSTRAINT=$(CURDIR)/constraints.txt $(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	PIP_CONSTRAINT=$(CURDIR)/constraints.txt $(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	$(VENV)/bin/nnUNetv2_lefusion_register
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/nnUNetv2_lefusion_demo

# The suite runs on TEST_JOBS processes (pytest-xdist), one thread each: on 2 cores about half the serial time.
TEST_JOBS ?= 2

test: install
	$(PY) -m pytest -q -n $(TEST_JOBS) --dist worksteal

test-fast: install
	$(PY) -m pytest -q -n $(TEST_JOBS) --dist worksteal -m "not slow"
