#!/usr/bin/env bash
# Load test: starts fmnist-serve (HTTP and gRPC), warms up, then drives single-image requests
# with Basic auth over keep-alive connections at 32 connections and at 1: POST /predict with
# wrk, then the Open Inference Protocol's three encodings (JSON, binary, gRPC) with
# fmnist-load, one client for all three, in rounds that alternate the encodings (this VM's
# speed drifts over minutes). Beside each fmnist-load row: the server's own CPU time per
# request (from /proc), which the client's share of the machine does not move.
# usage: bench_serve.sh SERVE_BINARY MODEL ADDR GRPC_ADDR LOAD_BINARY [SECONDS] [ROUNDS]
set -euo pipefail
bin=$1 model=$2 addr=$3 grpc_addr=$4 load=$5 secs=${6:-10} rounds=${7:-5}
round_secs=$(awk -v s="$secs" -v r="$rounds" 'BEGIN {printf "%.1f", s / r}')
source "$(dirname "$0")/server.sh"
dir=$(mktemp -d)
trap 'stop_server; rm -rf "$dir"' EXIT
SERVER_ARGS="--grpc-listen $grpc_addr" start_server "$bin" "$model" "$addr" bench "$dir"

# The request body: the first fixture image.
single_image_body "$dir/body.json"
wrk_post_lua "$dir/body.json" bench "$dir/post.lua"
# The answer must be a real prediction before anything is measured.
curl -fs -u "bench:$server_pass" -H 'Content-Type: application/json' -d @"$dir/body.json" \
  "http://$addr/predict" | grep -q '"class"'

run() { # connections duration (wrk needs at least as many connections as threads)
  local threads=2
  [ "$1" -lt 2 ] && threads=1
  wrk -t"$threads" -c"$1" -d"$2" --latency -s "$dir/post.lua" "http://$addr/predict"
}
summary() { # label file
  awk -v label="$1" '
    /Requests\/sec/ {rps=$2}
    /^ +50%/ {p50=$2} /^ +99%/ {p99=$2}
    /Non-2xx/ {non2xx=$5}
    /Socket errors/ {sock=$0}
    END {printf "%-16s %10.0f req/s   p50 %-9s p99 %-9s errors %d%s\n", label, rps, p50, p99, non2xx+0, (sock ? " (" sock ")" : "")}' "$2"
}
# Resident memory of the server process (kB): now, and its peak so far.
rss() { awk '/^VmRSS|^VmHWM/ {printf "%s %s kB  ", $1, $2}' "/proc/$server_pid/status"; }
rss_idle=$(rss)
echo "warm-up (3 s, 32 connections)"; run 32 3s >/dev/null
run 32 "${secs}s" | tee "$dir/c32"
run 1 "${secs}s" | tee "$dir/c1"
echo
echo "== POST /predict, single image, Basic auth, keep-alive, model $model"
summary "32 connections" "$dir/c32"
summary "1 connection" "$dir/c1"
echo "memory idle:       $rss_idle"
echo "memory after load: $(rss)"

echo
echo "== POST /v2/models/NAME/infer and gRPC ModelInfer, single image (fmnist-load; output: logits)"
echo "   $rounds rounds alternating the encodings, ${round_secs} s each; server us/req: its CPU time per request"
FMNIST_LOAD_PASSWORD=$server_pass "$load" --http "$addr" --grpc "$grpc_addr" --model "$(basename "$model" .onnx)" \
  --user bench --concurrency 32,1 --rounds "$rounds" --seconds "$round_secs" --warmup-secs 0.5 \
  --server-pid "$server_pid"
