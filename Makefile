# make demo: set up .venv, deploy the built-in digits example to this host, print the report.
# make test: set up .venv, run the whole test suite (slow real-model tests included).
PY ?= python3
# torch, CPU build, installed on its own first. The default pins the CPU wheel's own version (+cpu), so pip can
# never pick the CUDA build (which pulls 16 nvidia-* packages, triton and several GB): it is taken from the
# configured indexes if one carries it (a mirror or a wheel folder), else from PyTorch's CPU index. A mirror
# that carries CPU wheels under the plain name: make TORCH=torch==2.13.0. A GPU machine: make TORCH=torch==2.13.0
# TORCH_INDEX=https://download.pytorch.org/whl/cu128 (see README, "Install").
TORCH ?= torch==2.13.0+cpu
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
VENV := .venv
BIN := $(VENV)/bin
PLUGINS := $(wildcard plugins/*)
STAMP := $(VENV)/.installed-$(shell (cat requirements.txt requirements-nodeps.txt plugins/tflite/requirements-litert.txt pyproject.toml $(addsuffix /pyproject.toml,$(PLUGINS)); echo '$(TORCH)') | sha1sum | cut -c1-10)
PIP := $(BIN)/python -m pip install -q --disable-pip-version-check

.PHONY: setup test test-fast demo bench clean print-torch

$(STAMP):
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) "$(TORCH)" 2>/dev/null || $(PIP) "$(TORCH)" --extra-index-url $(TORCH_INDEX)
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
	$(BIN)/python benchmarks/bench_latency.py

clean:
	rm -rf build

print-torch:  # what `make setup` installs torch with (tests resolve it with pip --dry-run)
	@echo "$(TORCH) --extra-index-url $(TORCH_INDEX)"
