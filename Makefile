# `make demo` and `make test` each do the whole set-up on a fresh machine.
# Stamps make re-runs fast: nothing is reinstalled unless its inputs changed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
ARCH   ?=

.PHONY: all venv install libs test check demo bench clean

all: libs

$(VENV)/.deps: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -r requirements.txt
	touch $@

$(VENV)/.installed: $(VENV)/.deps setup.py pyproject.toml
	$(PY) -m pip install -q --no-build-isolation --no-deps -e . --config-settings editable_mode=compat
	touch $@

# Test oracles (detectron2, built for this machine) from ../shared/oracles/ when it exists;
# without it the detectron2 parity tests skip and say why.
ORACLES := $(wildcard ../shared/oracles/detectron2-*.whl)
$(VENV)/.oracles: $(VENV)/.deps $(ORACLES)
	$(if $(ORACLES),$(PY) -m pip install -q $(ORACLES),@echo "no ../shared/oracles: detectron2 parity tests will skip")
	touch $@

venv: $(VENV)/.deps
install: $(VENV)/.installed

# build_libs.py itself skips work when sources and flags are unchanged.
libs: $(VENV)/.installed
	$(PY) libs/build_libs.py $(ARCH)

# The export extra (onnx, onnxruntime): the deploy tests skip without it, CI runs them.
# (the same requirements as pyproject.toml's `export` extra, without reinstalling the package)
$(VENV)/.export: $(VENV)/.installed pyproject.toml
	$(PY) -m pip install -q "onnx>=1.16" "onnxruntime>=1.18"
	touch $@

test: libs $(VENV)/.oracles $(VENV)/.export
	$(PY) -m pytest tests

# The edit-test loop: the kernels, the stages and the config against their oracles,
# without the slow end-to-end tests (make test runs everything).
CHECK := tests/libs tests/layers tests/pooling tests/proposal tests/heads tests/tools \
         tests/test_config.py tests/test_builder.py tests/test_layering.py tests/test_inputs.py
check: libs
	$(PY) -m pytest -m "not slow" $(CHECK)

demo: libs
	$(VENV)/bin/maskrcnn demo

bench: libs
	$(PY) bench/kernels.py
	$(PY) bench/winograd.py

clean:
	rm -rf libs/build build *.egg-info
