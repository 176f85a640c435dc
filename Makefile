# `make demo` and `make test` each install what they need into .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SMOKE ?= 0

.PHONY: install test demo experiment bench docs clean

$(VENV)/.installed: setup.py requirements-pins.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-pins.txt
	$(PY) -m pip install -q -c requirements-pins.txt -e '.[test,demo]'
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q -rs -p no:cacheprovider --fail-on-skip tests

demo: install
	$(PY) -m open_clip_superclip.tools.demo --smoke $(SMOKE)

experiment: install
	$(PY) -m open_clip_superclip.tools.demo --experiment $(if $(CELL),--cell '$(CELL)')

bench: install
	$(PY) bench/run.py
	$(PY) bench/bench_imports.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info demo_data demo_report demo_runs
