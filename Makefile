# fmnist — every command a user or CI needs. `make help` lists them.
#
# System packages: protobuf-compiler (protoc, needed to build candle-onnx) and
# dataset-fashion-mnist (the official data set). As root the targets install them with apt;
# otherwise they print the apt-get line to run.

SHELL := /bin/bash
CARGO ?= cargo
RELEASE := target/release
TRAIN := $(RELEASE)/fmnist-train
DATASET_DIR ?= /usr/share/datasets/fashion-mnist
FMNIST_URL ?= http://fashion-mnist.s3-website.eu-central-1.amazonaws.com
MODEL ?= weights/fmnist-cnn.onnx
VENV ?= .venv

.PHONY: oip-clients browser-test report help deps deps-data build data train eval serve test test-rust test-onnxruntime check-shipped \
        bench bench-train bench-serve bench-vgg bench-kernels soak soak-ci fuzz fuzz-tools fuzz-ci fuzz-long fuzz-cmin schemathesis vgg16-weights train-vgg postman image image-run image-test k8s-validate fmt lint clean

help:
	@echo "make serve        serve $(MODEL) on http://127.0.0.1:8080, gRPC on 127.0.0.1:8081 (dev credentials admin/password123)"
	@echo "make train        train the default CNN on the full training set -> $(MODEL)"
	@echo "make eval         evaluate $(MODEL) on the official test set"
	@echo "make report       the visual evaluation report of $(MODEL) -> target/report/index.html"
	@echo "make vgg16-weights download timm's ImageNet VGG16 (528 MB) to $(VGG16_WEIGHTS)"
	@echo "make train-vgg    VGG16 transfer learning (frozen backbone, new head) at VGG_SIZE=$(VGG_SIZE)"
	@echo "make test         the whole test suite (what CI runs)"
	@echo "make data         data/fashion-mnist_{train,test}.csv from the official files"
	@echo "make postman      run the Postman collection with newman against a fresh server"
	@echo "make browser-test the web page and the report in Debian's chromium (Playwright, axe-core); screenshots in target/browser/"
	@echo "make oip-clients  tritonclient (HTTP, gRPC) and kserve against a fresh server, plus a short fmnist-load run"
	@echo "make image        static fmnist-serve (musl) in a FROM scratch image $(IMAGE)"
	@echo "make image-run    run the image on port 8080 (dev credentials admin/password123)"
	@echo "make image-test   check the image end to end (what CI runs)"
	@echo "make k8s-validate validate deploy/k8s/ against the Kubernetes schemas"
	@echo "make bench        all benchmarks (bench-kernels, bench-train, bench-serve, bench-vgg)"
	@echo "make bench-kernels stock candle vs fmnist kernels vs onnxruntime: training step, inference, VGG16"
	@echo "make bench-train  training throughput and time-to-accuracy on the full data"
	@echo "make bench-serve  load test: POST /predict with wrk; v2 JSON, binary and gRPC with fmnist-load"
	@echo "make bench-vgg    VGG16 feature extraction (img/s at 224 and 64) and head-training time"
	@echo "make soak         10-minute load at capacity: errors and memory growth (soak-ci: 45 s)"
	@echo "make schemathesis API conformance: schemathesis against /openapi.json of a live server"
	@echo "make fuzz         property-based fuzzing of request decoding and preprocessing"
	@echo "make fuzz-long    cargo fuzz (libFuzzer, nightly): every target for FUZZ_LONG_SECONDS (600) each"
	@echo "make fuzz-ci      the same, FUZZ_SECONDS (35) each; make fuzz-cmin folds new finds into fuzz/corpus"
	@echo "make lint         cargo fmt --check and clippy -D warnings"

# Installs (as root) or names (otherwise) a Debian package when the command/file is missing.
define need_pkg
	@if ! $(2) >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing $(1)"; \
	    (apt-get install -y -qq $(1) || (apt-get update -qq && apt-get install -y -qq $(1))) >/dev/null; \
	  else \
	    echo "missing package $(1): run 'sudo apt-get install $(1)'"; exit 1; \
	  fi; \
	fi
endef

deps:
	$(call need_pkg,protobuf-compiler,command -v protoc)

# The data set package is optional: without it `make data` downloads the official files.
deps-data:
	@if [ ! -d $(DATASET_DIR) ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get install -y -qq dataset-fashion-mnist || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)) >/dev/null 2>&1 \
	    || echo "dataset-fashion-mnist is not available here; will download the official files"; \
	fi

build: deps
	$(CARGO) build --release --workspace

data/fashion-mnist_train.csv data/fashion-mnist_test.csv &: | deps-data build
	@mkdir -p data
	@src=$(DATASET_DIR); \
	if [ ! -f $$src/train-images-idx3-ubyte.gz ]; then \
	  src=data/idx; mkdir -p $$src; \
	  for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do \
	    [ -f $$src/$$f.gz ] || curl -fsSL -o $$src/$$f.gz $(FMNIST_URL)/$$f.gz || exit 1; \
	  done; \
	fi; \
	$(TRAIN) convert --images $$src/train-images-idx3-ubyte.gz --out data/fashion-mnist_train.csv && \
	$(TRAIN) convert --images $$src/t10k-images-idx3-ubyte.gz --out data/fashion-mnist_test.csv

data: data/fashion-mnist_train.csv data/fashion-mnist_test.csv

train: build data
	$(TRAIN) train --data data/fashion-mnist_train.csv --test data/fashion-mnist_test.csv --out $(MODEL)

# VGG16 transfer learning. The pretrained weights (528 MB) are never committed: they live in
# data/ (git-ignored), and so does the feature cache. Nothing downloads during tests.
VGG16_WEIGHTS ?= data/vgg16.safetensors
VGG16_URL ?= https://huggingface.co/timm/vgg16.tv_in1k/resolve/main/model.safetensors
VGG_SIZE ?= 64
VGG_HEAD ?= last

$(VGG16_WEIGHTS):
	@mkdir -p $(dir $@)
	curl -fL --retry 3 -o $@.part $(VGG16_URL) && mv $@.part $@

vgg16-weights: $(VGG16_WEIGHTS)

train-vgg: build data $(VGG16_WEIGHTS)
	$(TRAIN) train --model vgg16 --weights $(VGG16_WEIGHTS) --head $(VGG_HEAD) --input-size $(VGG_SIZE) \
	  --data data/fashion-mnist_train.csv --test data/fashion-mnist_test.csv --out weights/fmnist-vgg16.onnx

# Development server: the documented development credentials, on loopback only.
serve: build
	@echo "fmnist-serve: development credentials admin / password123 (FMNIST_BASIC_AUTH); do not use them in production"
	FMNIST_BASIC_AUTH=admin:password123 $(RELEASE)/fmnist-serve --model $(MODEL) --grpc-listen 127.0.0.1:8081

eval: build data
	$(TRAIN) eval --model $(MODEL) --data data/fashion-mnist_test.csv --json target/eval.json

# The visual evaluation report of the shipped model on the official test set.
report: build data
	$(TRAIN) eval --model $(MODEL) --data data/fashion-mnist_test.csv --json target/report/metrics.json --report target/report

# ---- tests -------------------------------------------------------------------------------
# Everything runs in release mode: candle in debug is ~10x slower, and one profile means one
# build of the dependencies.
test: build data test-rust fuzz check-shipped test-onnxruntime

test-rust:
	$(CARGO) test --release --workspace

# Property-based fuzzing of request decoding and preprocessing, bounded by case count
# (20,000 cases per property: ~10 s here).
PROPTEST_CASES ?= 20000
fuzz:
	PROPTEST_CASES=$(PROPTEST_CASES) $(CARGO) test --release -p fmnist --lib fuzz

# Coverage-guided fuzzing (fuzz/, cargo fuzz + libFuzzer, nightly): every target for
# FUZZ_SECONDS each. fuzz-ci is CI's bounded run (8 targets x FUZZ_SECONDS, CI passes 20,
# after an 8- to 15-minute instrumented build); fuzz-long is the long run whose figures RELIABILITY.md records;
# fuzz-cmin folds what the runs found into the committed corpus, minimised.
FUZZ_SECONDS ?= 35
FUZZ_LONG_SECONDS ?= 600
fuzz-tools:
	@rustup toolchain list | grep -q '^nightly' || { echo "cargo fuzz needs the nightly toolchain: rustup toolchain install nightly"; exit 1; }
	@command -v cargo-fuzz >/dev/null || $(CARGO) install --locked cargo-fuzz --version 0.13.2

fuzz-ci: fuzz-tools
	bash scripts/fuzz.sh $(FUZZ_SECONDS)

fuzz-long: fuzz-tools
	bash scripts/fuzz.sh $(FUZZ_LONG_SECONDS)

fuzz-cmin: fuzz-tools
	bash scripts/fuzz.sh --cmin

# API conformance against the live server's OpenAPI document (schemathesis from PyPI).
ST_EXAMPLES ?= 100
schemathesis: build $(VENV)/.ok
	@bash scripts/schemathesis.sh $(RELEASE)/fmnist-serve $(MODEL) 127.0.0.1:18089 $(ST_EXAMPLES)

# Soak: wrk at capacity; fails on any error or on RSS growth above 5 % (10 minutes). CI runs
# 45 s, where allocator noise needs an absolute slack too (12 MiB; see scripts/soak.sh).
SOAK_ADDR ?= 127.0.0.1:18086
soak: build
	$(call need_pkg,wrk,command -v wrk)
	@SOAK_SLACK_KB=0 bash scripts/soak.sh $(RELEASE)/fmnist-serve $(MODEL) $(SOAK_ADDR) 10m
soak-ci: build
	$(call need_pkg,wrk,command -v wrk)
	@bash scripts/soak.sh $(RELEASE)/fmnist-serve $(MODEL) $(SOAK_ADDR) 45s

# The shipped model must keep its promise on the full official test set: 0.94 (the six-conv
# model shipped on 2026-12-08 reaches 0.9412 with its flip averaging, BENCHMARKS.md), through
# candle-onnx (the reference runtime) and through the planned executor the server runs.
MIN_ACCURACY ?= 0.94
check-shipped:
	$(TRAIN) eval --model $(MODEL) --data data/fashion-mnist_test.csv --min-accuracy $(MIN_ACCURACY) \
	  --engine candle-onnx --json target/shipped-eval.json
	$(TRAIN) eval --model $(MODEL) --data data/fashion-mnist_test.csv --min-accuracy $(MIN_ACCURACY) \
	  --engine auto --json target/shipped-eval-planned.json >/dev/null

# An independent runtime (onnxruntime from PyPI) must agree with fmnist's runtime on our files.
$(VENV)/.ok: scripts/requirements.txt
	python3 -m venv $(VENV) || (apt-get install -y -qq python3-venv >/dev/null && python3 -m venv $(VENV))
	$(VENV)/bin/pip install -q -r scripts/requirements.txt
	touch $@

# The same for a VGG16 transfer export (random backbone, mlp head, 64 px: the 3-channel input,
# resize and the adaptive pool's upsampling MatMuls), for a random six-conv GELU network
# (examples/gelu_model.rs: GELU as the opset-13 Erf chain, on the planned executor), and for a
# `train --arch six --act gelu --flip-average` export (one epoch on the fixture: GELU, global average pooling,
# and flip averaging written as Slice + Concat ... Reshape + ReduceMean).
test-onnxruntime: build $(VENV)/.ok
	$(TRAIN) eval --model $(MODEL) --data fixtures/sample.csv --logits-out target/candle-logits.json >/dev/null
	$(VENV)/bin/python scripts/onnxruntime_agrees.py $(MODEL) fixtures/sample.csv target/candle-logits.json
	@mkdir -p target/ort-vgg
	$(VENV)/bin/python scripts/random_vgg16_backbone.py target/ort-vgg/backbone.safetensors
	$(TRAIN) train --model vgg16 --weights target/ort-vgg/backbone.safetensors --head mlp --input-size 64 \
	  --data fixtures/sample.csv --limit 100 --epochs 2 --cache-dir target/ort-vgg/cache \
	  --out target/ort-vgg/vgg.onnx --quiet
	$(TRAIN) eval --model target/ort-vgg/vgg.onnx --data fixtures/sample.csv --logits-out target/ort-vgg/logits.json >/dev/null
	$(VENV)/bin/python scripts/onnxruntime_agrees.py target/ort-vgg/vgg.onnx fixtures/sample.csv target/ort-vgg/logits.json
	@mkdir -p target/ort-gelu
	cargo run --release --quiet --example gelu_model -- target/ort-gelu/gelu.onnx
	$(TRAIN) eval --model target/ort-gelu/gelu.onnx --data fixtures/sample.csv --logits-out target/ort-gelu/logits.json \
	  | grep -q '^engine planned' || { echo "the GELU network did not run on the planned executor" >&2; exit 1; }
	$(VENV)/bin/python scripts/onnxruntime_agrees.py target/ort-gelu/gelu.onnx fixtures/sample.csv target/ort-gelu/logits.json
	@rm -f target/ort-six/six.ckpt.*
	$(TRAIN) train --arch six --act gelu --flip-average --data fixtures/sample.csv --epochs 1 --batch-size 32 --out target/ort-six/six.onnx --quiet
	$(TRAIN) eval --model target/ort-six/six.onnx --data fixtures/sample.csv --logits-out target/ort-six/logits.json \
	  | grep -q '^engine planned' || { echo "the six-conv network did not run on the planned executor" >&2; exit 1; }
	$(VENV)/bin/python scripts/onnxruntime_agrees.py target/ort-six/six.onnx fixtures/sample.csv target/ort-six/logits.json

# Real third-party Open Inference Protocol clients (tritonclient[http,grpc] and kserve from
# PyPI, in the project's venv) against a live server with its gRPC listener, compared with
# `fmnist-train eval` on the fixture images; then a bounded fmnist-load run of the three
# encodings at 32 and 1 connections that must see 0 errors.
OIP_ADDR ?= 127.0.0.1:18083
OIP_GRPC_ADDR ?= 127.0.0.1:18084
$(VENV)/.clients-ok: scripts/requirements-clients.txt $(VENV)/.ok
	$(VENV)/bin/pip install -q -r scripts/requirements-clients.txt
	touch $@
oip-clients: build $(VENV)/.clients-ok
	@bash scripts/oip_clients.sh $(RELEASE) $(MODEL) $(OIP_ADDR) $(OIP_GRPC_ADDR) $(VENV)/bin/python

# The web page in Debian's chromium (playwright-core, axe-core from npm), against a fresh
# server; screenshots in target/browser/.
BROWSER_ADDR ?= 127.0.0.1:18091
browser-test: build report
	$(call need_pkg,chromium fonts-liberation2,test -x /usr/bin/chromium)
	$(call need_pkg,npm,command -v npm)
	@FMNIST_REPORT=target/report/index.html bash scripts/browser.sh $(RELEASE)/fmnist-serve $(MODEL) $(BROWSER_ADDR)

# ---- benchmarks --------------------------------------------------------------------------
# The Postman collection, run by newman against a freshly started server.
postman: build
	@bash scripts/postman.sh $(RELEASE)/fmnist-serve $(MODEL) 127.0.0.1:18081

bench: bench-kernels bench-train bench-serve bench-vgg

# One run, same machine and threads: candle's stock paths against fmnist's kernels (training
# step, inference at batch 64 and 1, VGG16 at 224 and 64), then onnxruntime on the same model.
# PyTorch's training step on the same network follows when TORCH_PY can import torch (not
# installed by CI: `pip install torch` into any venv and point TORCH_PY at its python).
TORCH_PY ?= $(VENV)/bin/python
bench-kernels: build $(VENV)/.ok
	$(TRAIN) bench-kernels --model $(MODEL)
	$(VENV)/bin/python scripts/bench_onnxruntime.py $(MODEL) fixtures/sample.csv
	@if $(TORCH_PY) -c "import torch" 2>/dev/null; then \
	  for net in cnn six six-relu; do for flags in "" "--channels-last" "--channels-last --bf16"; do \
	    $(TORCH_PY) scripts/bench_pytorch.py --seconds 5 --net $$net $$flags 2>/dev/null; \
	  done; done; \
	else echo "PyTorch row skipped: $(TORCH_PY) cannot import torch (set TORCH_PY)"; fi

BENCH_ADDR ?= 127.0.0.1:18080
BENCH_GRPC_ADDR ?= 127.0.0.1:18079
BENCH_SECONDS ?= 10
BENCH_ROUNDS ?= 5
bench-serve: build
	$(call need_pkg,wrk,command -v wrk)
	@bash scripts/bench_serve.sh $(RELEASE)/fmnist-serve $(MODEL) $(BENCH_ADDR) $(BENCH_GRPC_ADDR) \
	  $(RELEASE)/fmnist-load $(BENCH_SECONDS) $(BENCH_ROUNDS)

# Uses $(VGG16_WEIGHTS) when present, else formula weights of the same shapes (speed does
# not depend on the values).
bench-vgg: build
	$(TRAIN) bench-vgg $(if $(wildcard $(VGG16_WEIGHTS)),--weights $(VGG16_WEIGHTS),)

bench-train: build data
	$(TRAIN) train --data data/fashion-mnist_train.csv --test data/fashion-mnist_test.csv \
	  --out target/bench/fmnist-cnn.onnx --track-test
	@python3 scripts/bench_train_summary.py target/bench/fmnist-cnn.json

# ---- container and Kubernetes -------------------------------------------------------------
# The image needs no base image and no network at build time: the static binary is built
# here, then the Containerfile only copies it and the model into a scratch image.
# CONTAINER is the engine command (podman, else docker) with any global flags; CI sets
# CONTAINER and CONTAINER_RUN_FLAGS for its sandbox (.ci/run).
MUSL := x86_64-unknown-linux-musl
IMAGE ?= fmnist-serve:0.1.0
CONTAINER ?= $(shell command -v podman >/dev/null 2>&1 && echo podman || echo docker)
CONTAINER_RUN_FLAGS ?=
# HEALTHCHECK is part of the Docker image format; podman's default (OCI) would drop it.
BUILD_FORMAT = $(if $(findstring podman,$(CONTAINER)),--format docker,)

image: deps
	$(call need_pkg,musl-tools,command -v musl-gcc)
	@command -v $(firstword $(CONTAINER)) >/dev/null || \
	  { echo "no container engine: install podman (apt-get install podman runc) or docker"; exit 1; }
	@rustup target list --installed 2>/dev/null | grep -qx $(MUSL) || rustup target add $(MUSL)
	# No line tables: the binary is stripped for the image anyway, and they cost build time.
	CARGO_PROFILE_RELEASE_DEBUG=false $(CARGO) build --release --target $(MUSL) -p fmnist --bin fmnist-serve
	@mkdir -p target/image
	strip -o target/image/fmnist-serve target/$(MUSL)/release/fmnist-serve
	$(CONTAINER) build $(BUILD_FORMAT) -f Containerfile -t $(IMAGE) .

image-run: image
	@echo "fmnist-serve (container): development credentials admin / password123; do not use them in production"
	$(CONTAINER) run --rm $(CONTAINER_RUN_FLAGS) -p 8080:8080 -p 8081:8081 -e FMNIST_BASIC_AUTH=admin:password123 $(IMAGE)

IMAGE_TEST_ADDR ?= 127.0.0.1:18082
IMAGE_TEST_GRPC_ADDR ?= 127.0.0.1:18085
image-test: image build
	@CONTAINER="$(CONTAINER)" CONTAINER_RUN_FLAGS="$(CONTAINER_RUN_FLAGS)" \
	  bash scripts/image_test.sh $(IMAGE) $(IMAGE_TEST_ADDR) $(IMAGE_TEST_GRPC_ADDR) $(RELEASE)/fmnist-load

# Schema validation of the manifests (kubernetes-validate from PyPI bundles the schemas:
# no cluster and no network needed once installed).
k8s-validate: $(VENV)/.ok
	$(VENV)/bin/kubernetes-validate --strict deploy/k8s/deployment.yaml deploy/k8s/service.yaml \
	  deploy/k8s/secret.yaml deploy/k8s/hpa.yaml deploy/k8s/pdb.yaml

# ---- housekeeping ------------------------------------------------------------------------
fmt:
	$(CARGO) fmt --all

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

clean:
	$(CARGO) clean
