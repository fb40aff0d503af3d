# Every target creates the project venv (.venv) on first use from requirements.lock.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

CHECKPOINT     ?= export/demo/weights/target
ASSISTANT      ?= export/demo/weights/assistant
BACKEND        ?= torch
MAX_NEW_TOKENS ?= 64
DRAFT_TOKENS   ?= 0
TARGET         ?= android
SHAPE          ?= e4b
OUT            ?= artifacts
BENCH_OUT      ?= artifacts/bench
PEERS_OUT      ?= artifacts/bench-peers
PEERS_STAMP    := $(VENV)/.peers-installed

GEN_ARGS = --backend $(BACKEND) --checkpoint $(CHECKPOINT) --assistant $(ASSISTANT) \
	--max-new-tokens $(MAX_NEW_TOKENS) --draft-tokens $(DRAFT_TOKENS) \
	$(if $(PROMPT),--prompt "$(PROMPT)") $(if $(PROMPT_FILE),--prompt-file $(PROMPT_FILE)) \
	$(if $(PROMPT_IDS),--prompt-ids $(PROMPT_IDS)) $(if $(JSON),--json) $(if $(IGNORE_EOS),--ignore-eos) \
	$(if $(ARTIFACTS),--artifacts $(ARTIFACTS))

.PHONY: help venv test generate export parity bench bench-peers results native size-check demo-model random-pair clean

help:
	@echo "make export TARGET=android|ios|linux-x86_64|web [CHECKPOINT=dir ASSISTANT=dir OUT=artifacts STEP_COSTS=file]"
	@echo "make test                 fast test tier (< 20 min on 2 cores)"
	@echo "make generate [BACKEND=torch|onnx|executorch] [PROMPT=..|PROMPT_FILE=..|PROMPT_IDS=1,2,3] [MAX_NEW_TOKENS=64]"
	@echo "              [DRAFT_TOKENS=0] [CHECKPOINT=dir ASSISTANT=dir | ARTIFACTS=dir] [JSON=1] [IGNORE_EOS=1]"
	@echo "              BACKEND=native: the C++ runner over the .pte (make native first)"
	@echo "make parity [CHECKPOINT=dir ASSISTANT=dir] [ARTIFACTS=dir] [PARITY_BACKEND=onnx|executorch|all] [DRAFT_TIE=1e-3]"
	@echo "make bench  [BENCH_OUT=artifacts/bench]                       greedy vs speculative, side by side"
	@echo "make bench-peers [CHECKPOINT=dir ASSISTANT=dir PEERS_OUT=dir]  prefill/decode vs ExecuTorch's example and mobius"
	@echo "make native               build the C++ speculative runner (build/native/gemma4-spec, libgemma4_spec.so)"
	@echo "make results [ADD=artifacts/parity/parity.json NAME=parity-demo]   keep a measurement, re-render README's table"
	@echo "make demo-model           retrain the shipped demo pair from scratch (about 75 minutes)"
	@echo "make random-pair SHAPE=e4b|e2b|e4b-multimodal OUT=dir   a random-weight pair of the real proportions"
	@echo "make size-check LAYERS=4,8 OUT=dir [SIZE_TARGETS=android,linux-x86_64] [MEMORY_LIMIT_GB=20]"
	@echo "                          E4B widths at those depths: export memory/time, artifact and run-time sizes, -> 42 layers"

$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements.lock
	$(VENV)/bin/pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

venv: $(STAMP)

# the Node client the web layout is tested with (transformers.js); onnxruntime-node's
# install script is told to skip its optional downloads (tests/clients/.npmrc)
NODE_STAMP := tests/clients/node_modules/.installed
$(NODE_STAMP): tests/clients/package.json tests/clients/package-lock.json
	cd tests/clients && npm ci --no-audit --no-fund --loglevel=error
	touch $@

# two workers (one per core): each test module, and each shape of tests/test_shapes.py, is one
# xdist group, so every export a module builds is built once (tests/conftest.py)
test: $(STAMP) $(NODE_STAMP)
	$(PY) -m pytest -q -n 2 --dist loadgroup --durations=12

generate: $(STAMP)
	@$(PY) -m runtime.generate $(GEN_ARGS)

export: $(STAMP)
	$(PY) -m export --target $(TARGET) --checkpoint $(CHECKPOINT) --assistant $(ASSISTANT) --out $(OUT) \
		$(if $(STEP_COSTS),--step-costs $(STEP_COSTS))

parity: $(STAMP)
	$(PY) -m runtime.parity --checkpoint $(CHECKPOINT) --assistant $(ASSISTANT) $(if $(ARTIFACTS),--artifacts $(ARTIFACTS)) \
		$(if $(PARITY_BACKEND),--backend $(PARITY_BACKEND)) $(if $(DRAFT_TIE),--draft-tie $(DRAFT_TIE))

bench: $(STAMP)
	$(PY) -m runtime.bench --checkpoint $(CHECKPOINT) --assistant $(ASSISTANT) --out $(BENCH_OUT) \
		$(if $(ARTIFACTS),--artifacts $(ARTIFACTS))

# the peers (benchmark-only dependencies, requirements-peers.lock) and the side-by-side run
$(PEERS_STAMP): $(STAMP) requirements-peers.lock
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements-peers.lock
	touch $@

bench-peers: $(PEERS_STAMP)
	$(PY) -m runtime.bench_peers --checkpoint $(CHECKPOINT) --assistant $(ASSISTANT) --out $(PEERS_OUT)

# the C++ runner against the installed executorch wheel (CMake >= 3.28 from the venv)
NATIVE_BUILD ?= build/native
native: $(STAMP)
	$(VENV)/bin/cmake -S native -B $(NATIVE_BUILD) -DCMAKE_BUILD_TYPE=Release \
		-DCMAKE_PREFIX_PATH=$$($(PY) -c "import executorch, os; print(os.path.join(list(executorch.__path__)[0], 'share', 'cmake'))")
	$(VENV)/bin/cmake --build $(NATIVE_BUILD) -j2

results: $(STAMP)
	$(PY) -m runtime.results $(if $(ADD),--add $(ADD) --name $(NAME))

LAYERS ?= 4,8
size-check: $(STAMP)
	$(PY) -m export.size_check --layers $(LAYERS) --out $(OUT) $(if $(SIZE_TARGETS),--targets $(SIZE_TARGETS)) \
		$(if $(MEMORY_LIMIT_GB),--memory-limit-gb $(MEMORY_LIMIT_GB))

random-pair: $(STAMP)
	$(PY) -m export.random_pair --shape $(SHAPE) --out $(OUT)

demo-model: $(STAMP)
	$(PY) -m export.demo.train --out export/demo/weights

clean:
	rm -rf $(OUT) .pytest_cache
