# rankserve: `make demo` and `make test` set everything up from this repository's own files.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
EXTRAS := build,serve,client,loadtest,bench,dev
PYTEST_ARGS ?=

.PHONY: venv system demo test test-fast build serve report ts checkov modelopt loadtest loadtest-half loadtest-cache soak gpu-check bench docs-transcripts clean

# (Re)create the venv and install the package with its extras whenever pyproject.toml changes.
$(STAMP): pyproject.toml clients/python/pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q --no-compile -e '.[$(EXTRAS)]' -e clients/python
	@# Byte-compile on every core: pip compiles on one (measured: 163 s install vs 78 s + 52 s here).
	@# Like pip, skip the files this Python cannot compile (torch ships 3.12-only test files).
	@$(BIN)/python -m compileall -q -j 0 $(VENV)/lib > /dev/null || true
	@touch $@

venv: $(STAMP)

demo: venv
	$(BIN)/rankserve demo

# Real servers the tests start (deploy/debian-packages.txt), from Debian's archive, when missing.
# Needs root and apt-get (CI has both); elsewhere it names what to install and their tests skip.
SYSTEM_PACKAGES := $(shell sed 's/\#.*//' deploy/debian-packages.txt)
system:
	@missing=""; for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing Debian packages:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	else echo "missing Debian packages:$$missing (as root: apt-get install$$missing); the tests that need them will be skipped"; fi

# The TypeScript SDK: built with the npm toolchain, tested by pytest against the real server.
ts:
	@if command -v npm >/dev/null; then cd clients/typescript && npm ci --no-audit --no-fund --silent && npm run --silent build; \
	else echo "npm not found: the TypeScript SDK tests will be skipped"; fi

test: venv ts checkov modelopt system
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Tools in venvs of their own, from a requirements file: their pins would fight the serving stack's.
# $(call side-venv,DIR,REQUIREMENTS) makes DIR/.installed.
define side-venv
$(1)/.installed: $(2)
	@test -x $(1)/bin/python || $$(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q --upgrade pip
	$(1)/bin/python -m pip install -q -r $(2)
	@touch $$@
endef

# checkov: static security checks of the Kubernetes manifests and Dockerfiles.
CHECKOV_VENV := .venv-checkov
$(eval $(call side-venv,$(CHECKOV_VENV),deploy/checkov-requirements.txt))
checkov: $(CHECKOV_VENV)/.installed

# NVIDIA ModelOpt (TensorRT's quantizer; pins onnx~=1.21 and onnxruntime-gpu): the build runs it as
# a subprocess to make the INT8 engine's QDQ model (int8_trt).
MODELOPT_VENV := .venv-modelopt
$(eval $(call side-venv,$(MODELOPT_VENV),deploy/modelopt-requirements.txt))
modelopt: $(MODELOPT_VENV)/.installed

# Unit tests only: no server, no export.
test-fast: venv
	$(BIN)/python -m pytest -m "not triton and not slow" $(PYTEST_ARGS)

build: venv modelopt
	$(BIN)/rankserve build --ranker artifacts/ranker --target cpu --out model_repository \
		--variants all --data artifacts/data --work-dir artifacts/variants $(if $(SCHEDULING),--scheduling $(SCHEDULING))

# Headless Locust run (starts the embedded server unless HOST is given); non-zero exit when an SLO breaks.
# HOST's scheme decides the transport (grpc://h:8001 is gRPC); PROTOCOL picks the embedded server's
# (default http) and must agree with HOST if both are given. METRICS_URL (Triton's /metrics of HOST,
# e.g. http://h:8002/metrics) adds the per-step queue and compute times.
USERS ?= 4
SPAWN_RATE ?= 2
DURATION ?= 60
PROTOCOL ?=
MODEL ?= ranker
METRICS_URL ?=
LOADTEST_TARGET = $(if $(PROTOCOL),--protocol $(PROTOCOL)) $(if $(HOST),--host $(HOST)) $(if $(METRICS_URL),--metrics-url $(METRICS_URL))
loadtest: venv
	$(BIN)/rankserve loadtest --users $(USERS) --spawn-rate $(SPAWN_RATE) --duration $(DURATION) \
		--model $(MODEL) $(LOADTEST_TARGET)

# The tail at half of saturation: a closed-loop run with USERS users finds saturation, a one-user run
# measures each list size's zero-load latency, then TAIL_RUNS runs of TAIL_DURATION s of Poisson
# arrivals at 50% of saturation must keep, in every list-size bucket, p99 <= the ideal single FIFO
# server's p99 (same arrivals, sizes and measured speed) and p99 of slowdown <= TAIL_SLOWDOWN.
TAIL_RUNS ?= 3
TAIL_DURATION ?= 120
TAIL_SLOWDOWN ?= 5
# the ideal server the p99 is held to: fifo, or deadline for a repository built with SCHEDULING=deadline
TAIL_REFERENCE ?= fifo
loadtest-half: venv
	$(BIN)/rankserve loadtest --saturation-fraction 0.5 --runs $(TAIL_RUNS) --slo-tail-vs-ideal --tail-reference $(TAIL_REFERENCE) \
		--slo-max-slowdown-p99 $(TAIL_SLOWDOWN) --users $(USERS) --spawn-rate $(SPAWN_RATE) --duration $(TAIL_DURATION) \
		--model $(MODEL) $(LOADTEST_TARGET) --out reports/loadtest/half

# Head-heavy traffic (query popularity Zipf, exponent ZIPF_S, over the WANDS queries, a fixed list per
# query) against the embedded server without and then with Triton's response cache of CACHE_SIZE, in one
# run: pairs/s, p50/p99, hit ratio, identical answers, bounded memory; non-zero exit below x3 pairs/s.
ZIPF_S ?= 1.0
CACHE_SIZE ?= 256MiB
WARMUP ?= 60
loadtest-cache: venv
	$(BIN)/rankserve loadtest --zipf $(ZIPF_S) --compare-response-cache $(CACHE_SIZE) --warmup $(WARMUP) \
		--users $(USERS) --spawn-rate $(SPAWN_RATE) --duration $(DURATION) $(if $(PROTOCOL),--protocol $(PROTOCOL)) --model $(MODEL) \
		--out reports/loadtest/cache

# Soak: 10 minutes of Poisson arrivals at 70% of saturation against the embedded server; fails on
# any failed request, p95 drifting more than 20% first -> last minute, or server RSS or /dev/shm
# growing more than 5%. Reports (timeline.png, per-minute table) in reports/soak.
SOAK_DURATION ?= 600
soak: venv
	$(BIN)/rankserve loadtest --saturation-fraction 0.7 --users $(USERS) --spawn-rate $(SPAWN_RATE) \
		--duration $(SOAK_DURATION) --window 60 --slo-max-p95-drift 0.2 --slo-max-rss-growth 0.05 \
		--slo-max-shm-growth 0.05 $(if $(PROTOCOL),--protocol $(PROTOCOL)) --model $(MODEL) --out reports/soak

# On a GPU host (NVIDIA driver + Container Toolkit, TRITON_ADMIN_KEY exported, `make build` done):
# engines built, tested and measured in the TensorRT container, served by Triton, checked against
# the CPU FP32 ranker; report in reports/gpu/ (report.md, report.json). docker compose runs the build
# as you: HOST_UID/HOST_GID are your ids.
gpu-check: venv
	HOST_UID=$$(id -u) HOST_GID=$$(id -g) $(BIN)/rankserve gpu-check --data artifacts/data --model-repository model_repository --out reports/gpu

# Same workload, same concurrency: ranker (Triton) vs the model alone in process vs a FastAPI + PyTorch server
# with dynamic batching (the headline baseline; targets >= 3x and >= 0.9) and, as a footnote, the naive one.
CONCURRENCY ?= 4
bench: venv
	$(BIN)/rankserve bench --concurrency $(CONCURRENCY) --duration $(DURATION)

# RANKER=dir: build that ranker's variants into reports/<dir name>/ and report on them (e.g. a large one)
report: venv
	$(BIN)/rankserve report --data artifacts/data $(if $(RANKER),--ranker $(RANKER) --out reports/$(notdir $(RANKER)) \
		$(if $(MAX_NDCG_DROP),--max-ndcg-drop $(MAX_NDCG_DROP)),--model-repository model_repository --out reports/optimization)

# The READMEs' command transcripts (the blocks after <!-- transcript: NAME -->): run their commands in a fresh
# folder against a real server and rewrite the blocks; tests/e2e/test_first_hour_docs.py checks them.
# RANKER=dir picks the ranker (default: artifacts/ranker if trained, else the tests' tiny random-weight one).
docs-transcripts: venv
	$(BIN)/python tests/transcripts.py --write $(if $(RANKER),--ranker $(RANKER))

serve: venv
	$(BIN)/rankserve serve --model-repository model_repository

clean:
	rm -rf artifacts reports .pytest_cache
	git clean -fdX model_repository
