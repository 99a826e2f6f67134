# make test / make bench do all set-up: a .venv (with system site packages when torch is already installed, so a
# GPU box or the container without a package index works), the dependencies, the build, then the run.
PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.14.1
TORCHVISION_SPEC ?= torchvision==0.29.1
BENCH_ARGS ?=
TEST_ARGS ?=
# pytest-xdist workers for make test (0: one process). Compiling graphs and interpreting Triton is single-threaded
# Python: two workers on the 2-core VM took the suite from 953 to 583 s, and 380-421 s once torch's OpenMP threads
# stopped spin-waiting (tests/conftest.py). At most 4; each keeps torch's intra-op threads, so the multi-threaded
# kernel paths stay tested.
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); echo $$(( n < 4 ? n : 4 )))
# --no-compile: modules are byte-compiled when first imported (as uv installs do), not all ~18k files of torch,
# transformers, keras, ... at install time (a minute and more on 2 cores).
PIP_INSTALL := $(VPY) -m pip install -q --no-compile
DEPS_STAMP := $(VENV)/.mltk-deps
BUILD_STAMP := $(VENV)/.mltk-built
SOURCES := setup.py $(shell find csrc -type f 2>/dev/null)

.PHONY: test bench bench-quick install info docker clean

test: $(BUILD_STAMP)
	$(VPY) -m pytest $$([ "$(TEST_WORKERS)" != 0 ] && $(VPY) -c "import xdist" 2>/dev/null \
		&& echo "-n $(TEST_WORKERS)") $(TEST_ARGS)

bench: $(BUILD_STAMP)
	$(VPY) -m mltoolkit bench $(BENCH_ARGS)

bench-quick: $(BUILD_STAMP)
	$(VPY) -m mltoolkit bench --quick $(BENCH_ARGS)

info: $(BUILD_STAMP)
	$(VPY) -m mltoolkit info

install: $(BUILD_STAMP)

$(DEPS_STAMP):
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
		echo "torch found in $(PYTHON): venv with system site packages"; \
		$(PYTHON) -m venv --system-site-packages $(VENV); \
		$(PYTHON) -c "import site, sys; sys.prefix != sys.base_prefix and print('\n'.join(site.getsitepackages()))" \
			> "$$($(VPY) -c 'import site; print(site.getsitepackages()[0])')/_mltk_parent_env.pth"; \
	else \
		$(PYTHON) -m venv $(VENV); \
	fi
	@missing=""; \
	$(VPY) -c "import torch" 2>/dev/null || missing="$$missing $(TORCH_SPEC)"; \
	for mod in triton pybind11 ninja pytest numpy setuptools wheel; do \
		$(VPY) -c "import $$mod" 2>/dev/null || missing="$$missing $$mod"; \
	done; \
	if [ -n "$$missing" ]; then echo "installing:$$missing"; $(PIP_INSTALL) $$missing || exit 1; fi
	@$(VPY) -c "import xdist" 2>/dev/null || $(PIP_INSTALL) pytest-xdist \
		|| echo "pytest-xdist not installed: make test runs in one process"
	@$(VPY) -c "import safetensors" 2>/dev/null || $(PIP_INSTALL) safetensors \
		|| echo "safetensors not installed: saving quantized models is unavailable"
	@$(VPY) -c "import matplotlib" 2>/dev/null || $(PIP_INSTALL) matplotlib \
		|| echo "matplotlib not installed: benchmark plots are skipped"
	@$(VPY) -c "import sklearn" 2>/dev/null || $(PIP_INSTALL) scikit-learn \
		|| echo "scikit-learn not installed: the digits accuracy tests are skipped"
	@# Trainer progress bars and loggers (each optional: the Trainer says which to install when asked for it).
	@$(VPY) -c "import tqdm, rich, tensorboard, mlflow, wandb" 2>/dev/null || $(PIP_INSTALL) tqdm rich \
		tensorboard mlflow-skinny wandb || echo "logger libraries not installed: their Trainer tests are skipped"
	@# Model zoo and text: tokenizers / sentencepiece do the tokenizing; transformers, timm and keras (torch backend)
	@# are only the references the model tests compare against and the checkpoint formats they read.
	@$(VPY) -c "import tokenizers, sentencepiece, google.protobuf, transformers, keras, h5py" 2>/dev/null \
		|| $(PIP_INSTALL) tokenizers sentencepiece protobuf transformers keras h5py \
		|| echo "text / model-zoo libraries not installed: their tests are skipped"
	@# torchvision (CNN fusion tests, ResNet-50 benchmark) must match torch's build: only beside the pinned torch.
	@$(VPY) -c "import torchvision" 2>/dev/null \
		|| { $(VPY) -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$(TORCH_SPEC)'.split('==')[1])" \
			&& $(PIP_INSTALL) --no-deps $(TORCHVISION_SPEC); } \
		|| echo "torchvision not installed: model tests and the ResNet benchmark are skipped"
	@# timm without its dependencies: they are torch and torchvision, which must not be replaced.
	@$(VPY) -c "import timm" 2>/dev/null || { $(VPY) -c "import torchvision, huggingface_hub, yaml" 2>/dev/null \
		&& $(PIP_INSTALL) --no-deps timm; } || echo "timm not installed: the timm mapping tests are skipped"
	touch $@

$(BUILD_STAMP): $(DEPS_STAMP) $(SOURCES)
	$(VPY) -m pip install --no-build-isolation --no-deps -e .
	$(VPY) -m mltoolkit info
	touch $@

docker:
	docker build -t mltoolkit:dev .

clean:
	rm -rf build *.egg-info mltoolkit/_C*.so $(BUILD_STAMP)
