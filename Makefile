# One command each: `make test` runs the tests, `make train` the training driver (`make train-lm`
# its language-model task). They create the virtual environment and install everything first
# (torch pinned: override TORCH_SPEC, e.g. with a CUDA build, and TORCH_INDEX for its index).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
# the libraries kdkernels.integrations and tests/test_coming_from.py test against, at the
# versions tested (torch stays pinned: it is named again in their install line)
INTEGRATIONS ?= "transformers==5.25.*" "trl==1.16.*" "accelerate==1.16.*" "datasets==5.2.*" \
	"torchtune==0.6.1" "torchao==0.16.*" "liger-kernel==0.8.5" "nvidia-modelopt==0.47.*" \
	"megatron-core==0.16.*"
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kdkernels-installed

.PHONY: install test lint train train-lm bench gpu-check clean

install: $(STAMP)

$(STAMP): setup.py pyproject.toml csrc/distill.cpp
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q numpy triton tqdm pytest hypothesis mpmath scikit-learn matplotlib tokenizers setuptools wheel ninja ruff
	$(PY) -m pip install -q "$(TORCH_SPEC)" $(INTEGRATIONS) $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	$(PY) -c "import kdkernels; print(kdkernels.backends())"
	touch $(STAMP)

# a test skipped because an integration's library cannot be imported fails (tests/conftest.py)
test: install
	KDKERNELS_REQUIRE_INTEGRATIONS=1 $(PY) -m pytest -q tests

lint: install
	$(VENV)/bin/ruff check .

train: install
	$(VENV)/bin/kdkernels-train $(ARGS)

train-lm: install
	$(VENV)/bin/kdkernels-train --task lm $(ARGS)

bench: install
	$(PY) -m benchmarks.run --quick $(ARGS)

# on a CUDA machine without network, against the torch already installed: build, test, benchmark
gpu-check:
	benchmarks/gpu_check.sh $(or $(OUT),gpu-check-out)

clean:
	rm -rf $(VENV) build *.egg-info kdkernels/_C*.so kdkernels/_build_report.json
