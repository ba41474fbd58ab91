# transact-pl: `make demo` installs and runs the default job; `make test` installs and runs the tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-slow test-dist clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: on CPU machines 2.13.0 is the CPU build; an unpinned torch pulls a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[quant,dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) train.py fit --config configs/smollm2_transact.yaml

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# Real multi-process runs (2 processes, gloo): DDP and FSDP2 against one process, FSDP2 resume, every scorer
# sharded, every collective on the model's device.
test-dist: $(STAMP)
	$(PY) -m pytest -q -m multiprocess tests/test_distributed.py tests/test_distributed_scorers.py tests/test_collective_devices.py \
		tests/test_reconstruction_distributed.py

clean:
	rm -rf runs exports lightning_logs .pytest_cache

# `make test-kill`: runs of a tiny model are SIGKILLed (or sent SIGTERM/SIGINT) at random moments, resumed from their last checkpoint and
# must end with the export of the run that never stopped; a saver killed mid-write leaves a whole checkpoint (~6 min).
.PHONY: test-kill
test-kill: $(STAMP)
	$(PY) -m pytest -q -m kill tests/test_kill.py

# `make eval [EXPORT=dir]`: perplexity of an exported model on the held-out texts with lm-eval-harness, offline
# (tasks in eval/lm_eval_tasks read local jsonl files written by eval/make_lm_eval_data.py); e.g.
# `make eval EXPORT=exports/debug_tiny LM_EVAL_ARGS="--limit 5"` for a quick check.
# Common-task accuracy (BoolQ, PIQA, HellaSwag, WinoGrande, ARC-e/c, OpenBookQA validation splits, eval/lm_eval_tasks/common):
# LM_EVAL_TASKS=transact_common_zeroshot (all zero-shot) or transact_common_reference (ARC-c 25, HellaSwag 10, WinoGrande 5 shots).
EXPORT ?= exports/smollm2_transact
LM_EVAL_TASKS ?= transact_heldout
LM_EVAL_ARGS ?=
.PHONY: eval
eval: $(STAMP)
	$(PY) -c "import lm_eval" 2>/dev/null || $(PY) -m pip install -q "lm-eval==0.4.13"
	$(PY) eval/make_lm_eval_data.py
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(VENV)/bin/lm_eval --model hf --model_args pretrained=$(EXPORT),dtype=float32 \
		--tasks $(LM_EVAL_TASKS) --include_path eval/lm_eval_tasks --batch_size 1 --output_path eval/results $(LM_EVAL_ARGS)

# `make check-clients [CLIENT_EXPORTS="dir ..."]`: load exports in transformers 4.57 (a separate virtualenv, built once in
# the cache) and in llama.cpp (converted by its own converter, f32 and f16 GGUF), and compare token ids and next-token
# logits with this project's transformers 5.x (~6 min for the two default exports; building llama.cpp first: ~35 min).
CLIENTS_DIR ?= $(or $(TRANSACT_PL_CACHE),$(HOME)/.cache/transact_pl)/clients
CLIENT_TF4 := $(CLIENTS_DIR)/transformers-4.57
LLAMA_CPP := $(or $(TRANSACT_LLAMA_CPP),$(CLIENTS_DIR)/llama.cpp)
CLIENT_EXPORTS ?= exports/debug_tiny exports/smollm2_transact
.PHONY: check-clients llama-cpp
check-clients: $(STAMP) llama-cpp
	test -x $(CLIENT_TF4)/bin/python || $(PYTHON) -m venv $(CLIENT_TF4)
	$(CLIENT_TF4)/bin/python -c "import transformers" 2>/dev/null || $(CLIENT_TF4)/bin/python -m pip install -q torch==2.13.0 "transformers==4.57.6" safetensors
	$(PY) -m benchmarks.check_clients $(CLIENT_EXPORTS) --client-python $(CLIENT_TF4)/bin/python --llama-cpp $(LLAMA_CPP)

# `make llama-cpp`: llama.cpp's converter (own virtualenv, its pinned requirements), llama-quantize, llama-perplexity and
# transact-llama-logits, built once into $(LLAMA_CPP) (outside the repo); needed by --export.gguf and check-clients.
llama-cpp:
	@test -x $(LLAMA_CPP)/bin/transact-llama-logits || echo "llama.cpp is not built yet: building it once into $(LLAMA_CPP) (~30 min on 2 cores)"
	PYTHON=$(PYTHON) benchmarks/llama_cpp_build.sh $(LLAMA_CPP)
