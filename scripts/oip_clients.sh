#!/usr/bin/env bash
# Real third-party clients against a live fmnist-serve (HTTP and gRPC listeners, per-run
# credentials): tritonclient.http/grpc and kserve's REST and gRPC clients must reproduce
# `fmnist-train eval`'s predictions on the fixture images (scripts/oip_clients.py), then
# fmnist-load drives JSON, binary and gRPC at 32 and 1 connections and must see 0 errors.
# usage: oip_clients.sh RELEASE_DIR MODEL HTTP_ADDR GRPC_ADDR PYTHON
set -euo pipefail
release=$1 model=$2 addr=$3 grpc_addr=$4 python=$5
source "$(dirname "$0")/server.sh"
dir=$(mktemp -d)
trap 'stop_server; rm -rf "$dir"' EXIT
name=$(basename "$model" .onnx)
"$release/fmnist-train" eval --model "$model" --data fixtures/sample.csv --logits-out "$dir/logits.json" >/dev/null
SERVER_ARGS="--grpc-listen $grpc_addr" start_server "$release/fmnist-serve" "$model" "$addr" oip "$dir"
status=0
for family in triton kserve; do
  FMNIST_TEST_USER=oip FMNIST_TEST_PASSWORD=$server_pass PYTHONUNBUFFERED=1 \
    timeout 120 "$python" scripts/oip_clients.py "$family" "$addr" "$grpc_addr" "$name" \
    fixtures/sample.csv "$dir/logits.json" || status=1
done
echo "== bounded load: JSON, binary and gRPC at 32 and 1 connections (0 errors required)"
FMNIST_LOAD_PASSWORD=$server_pass timeout 60 "$release/fmnist-load" --http "$addr" --grpc "$grpc_addr" \
  --model "$name" --user oip --seconds 3 --warmup-secs 1 || status=1
exit $status
