# Two commands do all the set-up on a fresh machine:
#   make demo   tiny GPT-2 pretraining on CPU, every save evaluated with HELM (outputs/demo/)
#   make test   the whole test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup browser demo test bench lint clean

setup: $(STAMP)

# megatron-core 0.19.2 declares Python >= 3.12 but ships a working cp311 wheel: it is installed
# on its own with --ignore-requires-python (given to the whole install, that flag would also
# pick packages that really need 3.12), and then satisfies the project's pin (pyproject.toml).
# The constraints keep the local CPU torch (no CUDA build). torchvision, which crfm-helm pulls
# in, is removed: beside the CPU torch it breaks every `transformers` model import, and HELM's
# text benchmarks never use it.
MEGATRON_CORE := megatron-core==0.19.2

$(STAMP): pyproject.toml constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --ignore-requires-python --no-deps $(MEGATRON_CORE)
	$(PY) -m pip install --quiet -c constraints-cpu.txt -e '.[test]'
	$(PY) -m pip uninstall --quiet --yes torchvision
	touch $@

demo: $(STAMP)
	$(PY) examples/pretrain_gpt2/demo.py --out outputs/demo

# The HTML report's tests load it in a real headless browser: Debian's chromium, installed with
# apt (as root) unless a chromium is already on PATH.
browser:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

test: $(STAMP) browser
	$(PY) -m pytest

# The throughput benchmark (bench/throughput.py) also needs lm-evaluation-harness: the `bench` extra,
# with the same constraints. Pass options with BENCH_ARGS, e.g. make bench BENCH_ARGS=--quick
BENCH_STAMP := $(VENV)/.bench-installed

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -c constraints-cpu.txt -e '.[test,bench]'
	$(PY) -m pip uninstall --quiet --yes torchvision
	touch $@

bench: $(BENCH_STAMP)
	$(PY) bench/throughput.py $(BENCH_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf outputs .pytest_cache
