# Two entry points: `make run` (the main job) and `make test`. Both build .venv from nothing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-precision lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

# The whole study, then its report; the report is written even when some runs failed. A study
# refused before its first run (exit 2: no data, no device, unwritable folder) has none to report.
run: $(STAMP)
	status=0; $(BIN)/resnet-study study --all --out runs/study || status=$$?; \
	if [ $$status -eq 2 ]; then exit 2; fi; \
	$(BIN)/resnet-study report runs/study && exit $$status

# Two workers, one thread each, a test file per worker at a time (module fixtures built once):
# most of the suite is process start-up and plotting, which one core does alone, and two torch
# thread pools on two cores would only fight. Files go out in the order tests/conftest.py gives
# them, the longest first, not xdist's (most tests first), which left the longest to the end.
test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder \
		--durations=12

# The tests marked `precision` once more each way: `auto` as on a CPU without native bf16 (fp32)
# and as on one with it (bf16), whatever this CPU is. CI runs it after `make test`.
test-precision: $(STAMP)
	RESNET_STUDY_CPU_BF16=0 $(BIN)/python -m pytest -q -m precision
	RESNET_STUDY_CPU_BF16=1 $(BIN)/python -m pytest -q -m precision

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) build src/*.egg-info
