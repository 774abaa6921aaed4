# Two set-up commands that work on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
# benchmarks/gpu_suite.py parts: abcd and ef take about 8 and 6 minutes (a device call lasts 10 at most)
PARTS ?= abcdef
VENV := .venv
PY := $(VENV)/bin/python
DEMO_DATA := datasets/demo
# torch comes first, from its pinned CPU wheel; constraints.txt keeps every later
# install from replacing it with a CUDA build.
$(VENV)/.installed: setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

.PHONY: install demo demo-data demo-s3 test unit integration clean gpu-check gpu-suite
install: $(VENV)/.installed

demo-data: install
	$(PY) -m data.demo_set $(DEMO_DATA)

# A real tiny training run: 2 processes, DeepSpeed ZeRO-2 on gloo, then generated videos. The launcher
# validates the config before any process starts, then runs torchrun -m train (as on a cluster).
# A second `make demo` resumes from runs/demo/checkpoints/latest; FRESH=1 starts over.
demo: demo-data
	$(PY) -m launch local experiment=demo_modes $(if $(FRESH),train.resume=false,)

# The demo with its data in a bucket of a local S3-compatible server (moto, started and stopped by the script):
# upload, train, stop halfway, resume, take down a rights holder, check exactly-once and that no secret was written
# (tests/integration/s3_demo.py). SHORT=1 trains 60 steps instead of 1600. The run goes to runs/demo-s3.
demo-s3: demo-data
	$(PY) tests/integration/s3_demo.py $(if $(SHORT),--short,)

# The whole suite, at most 15 minutes of pytest on the 2-core machine: two pytest-xdist workers (most tests wait on
# subprocesses, gloo peers, Ray or SLURM: one worker left a core idle a quarter of the time), each module whole on
# one worker, the longest dealt first (tests/conftest.py). It fails when a test that is not CUDA-only skips
# (tests/skip_guard.py: a skipped SLURM or Ray test is a check that did not run), and ends with the 25 slowest
# tests (BENCHMARKS.md keeps the table). WORKERS=1 runs it in one process.
WORKERS ?= 2
PYTEST_ALL := -p tests.skip_guard $(if $(filter 1,$(WORKERS)),,-n $(WORKERS) --dist loadfile --no-loadscope-reorder) \
	--durations=25 tests/integration tests/unit tests/gpu
test: install
	$(PY) -m pytest $(PYTEST_ALL)

unit: install
	$(PY) -m pytest tests/unit

integration: install
	$(PY) -m pytest tests/integration

clean:
	rm -rf runs datasets outputs .pytest_cache

# On a GPU machine (plain python3 with the wheel kit of ../shared/gpu; see docs/gpu.md): tests/gpu, the
# trainer end to end in fp32 and bf16, the 1B x 16k model-step benchmark, and one markdown table.
gpu-check:
	$(PYTHON) benchmarks/gpu_check.py --out gpu-check

# Every GPU figure of BENCHMARKS.md that needs a GPU (issue 12), about 8 minutes on one H100/H200.
gpu-suite:
	$(PYTHON) benchmarks/gpu_suite.py --out gpu-suite --parts $(PARTS)
