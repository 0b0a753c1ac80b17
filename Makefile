# Every target installs what it needs into $(VENV) first: pyproject.toml's dependencies at the exact
# versions of constraints.txt (the lock CI passed with; `make lock` refreshes it).
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.install-stamp
PYTEST  := $(PY) -m pytest
ARGS    ?=
# pytest-xdist workers for test / test-integration: a test file stays on one worker (its module-scoped
# runs happen once; not loadgroup: pytest 9.2 drops its groups, pytest-xdist#1386), each worker and
# what it starts on one thread, so that the workers do not oversubscribe the cores;
# TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2
XDIST   := -n $(TEST_WORKERS) --dist loadfile
TESTENV := OMP_NUM_THREADS=1

.DEFAULT_GOAL := help
.PHONY: help install lock train test test-integration test-full preflight lint format bench bench-gpu bench-conta bench-conta-twins bench-sets bench-faults table2 clean clean-outputs

help: ## Show the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*?## "}{printf "  %-14s %s\n", $$1, $$2}'

install: $(STAMP) ## Create .venv and install the project with its dev extras

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

LOCK_VENV := .venv-lock
lock: ## Re-resolve pyproject.toml's ranges in a fresh venv and write constraints.txt (then run make test)
	rm -rf $(LOCK_VENV) && python3 -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LOCK_VENV)/bin/python -m pip install --quiet -e ".[dev]"
	{ sed -n '1,2p' constraints.txt; $(LOCK_VENV)/bin/python -m pip freeze --all --exclude-editable \
	  | grep -v '^setuptools=='; } > constraints.txt.new && mv constraints.txt.new constraints.txt
	rm -rf $(LOCK_VENV)

train: install ## Default experiment (synth_conta, T=2) after its supervised bound (ARGS="key=value ..." for the main run)
	$(PY) train.py experiment=synth_supervised
	$(PY) train.py $(ARGS)

test: install ## Unit tests (no integration, slow or GPU tests); CI runs test-integration after it
	$(TESTENV) $(PYTEST) $(XDIST) -m "not integration and not slow and not gpu" $(ARGS)

test-integration: install ## Integration tests: tiny pipelines, CLIs, DDP under gloo, SIGKILL resumes (no slow or GPU tests)
	$(TESTENV) $(PYTEST) $(XDIST) -m "integration and not slow and not gpu" $(ARGS)

test-full: install ## Every test, slow ones included
	$(PYTEST) $(ARGS)

# Every paper recipe end to end at paper shapes (debug=preflight: rounds 0-1, two images a split,
# two optimizer steps a training stage) on generated VOC 2012 + SBD and COCO 2014 folders of
# VOC-sized images, random init (pretrained=false), on the CPU; SEC also under DDP (2 ranks).
# The reports project to the real split sizes.
PREFLIGHT_DATA ?= outputs/preflight-data
PREFLIGHT := $(PY) train.py debug=preflight trainer=cpu pretrained=false num_workers=0 callbacks.rich_progress_bar=null
PREFLIGHT_VOC := data.root=$(PREFLIGHT_DATA)/VOC2012 data.cache_dir=$(PREFLIGHT_DATA)/cache/voc \
  'preflight.split_sizes={train_aug:10582,train:1464,val:1449}'
PREFLIGHT_COCO := data.root=$(PREFLIGHT_DATA)/coco data.cache_dir=$(PREFLIGHT_DATA)/cache/coco \
  'preflight.split_sizes={train:82081,val:40137}'
preflight: install ## Every paper experiment end to end at paper shapes on generated VOC/COCO folders (CPU, ~20 min)
	$(PY) -m src.datamodules.layouts voc $(PREFLIGHT_DATA)/VOC2012 --train-aug 2 --train 2 --val 2
	$(PY) -m src.datamodules.layouts coco $(PREFLIGHT_DATA)/coco --train 2 --val 2
	for run in "experiment=voc_conta" "experiment=voc method=seam" "experiment=voc method=dsrg" \
	  "experiment=voc method=cam" "experiment=voc_supervised"; do \
	  $(PREFLIGHT) $$run $(PREFLIGHT_VOC) $(ARGS) || exit 1; done
	$(PREFLIGHT) experiment=voc method=sec $(PREFLIGHT_VOC) trainer=ddp_cpu preflight.batch_size=2 $(ARGS)
	$(PREFLIGHT) experiment=coco_conta $(PREFLIGHT_COCO) $(ARGS)

lint: install ## ruff check + format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install ## ruff autofix + format
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: install ## Benchmarks (print ratios measured in one run): CAM stage, segmenter, random walk, CRF, SEC/DSRG step, CAM/logit storage, COCO reader memory, paper-scale CPU stages and their projection
	$(PY) bench/cam_stage.py
	$(PY) bench/segmenter.py
	$(PY) bench/random_walk.py
	$(PY) bench/crf.py
	$(PY) bench/seeded_step.py --shape synth --batch 16
	$(PY) bench/cam_store.py
	$(PY) bench/logits_store.py
	$(PY) bench/coco_memory.py
	$(PY) bench/scale.py

bench-gpu: install ## On a GPU machine: every stage at paper shapes, fp32 vs bf16, the T = 3 projection; the batched walk
	$(PY) bench/scale.py --images 4 --device cuda
	$(PY) bench/random_walk.py --batch 8 --device cuda

bench-conta: install ## CONTA vs baseline: layout confounder, 5 seeds, rounds 0-1, variants paper / gt C / shuffled m (long)
	$(PY) bench/conta_vs_baseline.py --confounder layout --jobs 2 --ablations paper gt_c shuffled_m

bench-conta-twins: install ## CONTA vs baseline where context is needed: twins confounder, 5 seeds, rounds 0-1, five variants (long)
	$(PY) bench/conta_vs_baseline.py --confounder twins --jobs 2 --ablations paper gt_c shuffled_m mean_c prior_attention

bench-sets: install ## The segmenter recipe on generated sets it was not tuned on: supervised bound + weak round 0
	$(PY) bench/off_home_sets.py --weak --jobs 2

bench-faults: install ## Fault campaign: SIGKILL the default experiment 20 times, resume, compare every artifact with an uninterrupted run (long; ARGS=--reuse: kills during reuse copies)
	$(PY) bench/faults.py --kills 20 --seed 0 $(ARGS)

# The four baselines with and without CONTA (T = 1), three seeds, two jobs at a time at one thread
# each, no loader workers (as measured in the README); conta=off jobs come first, so each conta=on
# job copies its round 0 (reuse_from).
SWEEP   ?= method=sec,seam,irnet,dsrg conta=off,on conta.rounds=1 seed=0,1,2
JOBS    ?= 2
WORKERS ?= 0
table2: install ## Table 2 on the synthetic set: the supervised bounds, the sweep $(SWEEP), then report.py (long)
	for seed in 0 1 2; do $(PY) train.py experiment=synth_supervised seed=$$seed || exit 1; done
	OMP_NUM_THREADS=1 $(PY) train.py -m $(SWEEP) hydra/launcher=joblib hydra.launcher.n_jobs=$(JOBS) num_workers=$(WORKERS) $(ARGS)
	$(PY) report.py outputs/multirun/synth

clean-outputs: ## Remove run outputs (outputs/)
	rm -rf outputs

clean: clean-outputs ## Remove the venv, caches and outputs
	rm -rf $(VENV) $(LOCK_VENV) .pytest_cache .ruff_cache *.egg-info
