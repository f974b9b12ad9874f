# make demo: set up .venv, deploy the built-in digits example to this host, print the report.
# make test: set up .venv, run the whole test suite (slow real-model tests included).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PLUGINS := $(wildcard plugins/*)
STAMP := $(VENV)/.installed-$(shell cat requirements.txt requirements-nodeps.txt plugins/tflite/requirements-litert.txt pyproject.toml $(addsuffix /pyproject.toml,$(PLUGINS)) | sha1sum | cut -c1-10)
PIP := $(BIN)/python -m pip install -q --disable-pip-version-check

.PHONY: setup test test-fast demo bench clean

$(STAMP):
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) torch==2.13.0
	$(PIP) -r requirements.txt
	$(PIP) --no-deps -r requirements-nodeps.txt
	$(PIP) -e . $(addprefix -e ,$(PLUGINS))
	rm -f $(VENV)/.installed-* && touch $@

setup: $(STAMP)

test: setup
	$(BIN)/python -m pytest -q -ra

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

demo: setup
	$(BIN)/python examples/digits.py prepare build/digits
	$(BIN)/qdeploy deploy examples/digits.py:build_model --input-shape 1x1x8x8 --target detect \
		--spec examples/digits_spec.toml --calib build/digits/calib.npz --val build/digits/val.npz -o build/demo

bench: setup
	$(BIN)/python benchmarks/bench_onnxruntime.py
	$(BIN)/python benchmarks/bench_tflite.py
	$(BIN)/python benchmarks/bench_torch.py
	$(BIN)/python benchmarks/bench_serve.py
	$(BIN)/python benchmarks/bench_tensorrt_sim.py

clean:
	rm -rf build
