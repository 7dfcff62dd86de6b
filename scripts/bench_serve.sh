#!/usr/bin/env bash
# Load test of POST /predict: starts fmnist-serve, warms up, then drives single-image requests
# with Basic auth over keep-alive connections with wrk, at 32 connections and at 1.
# usage: bench_serve.sh SERVE_BINARY MODEL ADDR
set -euo pipefail
bin=$1 model=$2 addr=$3
source "$(dirname "$0")/server.sh"
dir=$(mktemp -d)
trap 'stop_server; rm -rf "$dir"' EXIT
start_server "$bin" "$model" "$addr" bench "$dir"

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
run 32 10s | tee "$dir/c32"
run 1 10s | tee "$dir/c1"
echo
echo "== POST /predict, single image, Basic auth, keep-alive, model $model"
summary "32 connections" "$dir/c32"
summary "1 connection" "$dir/c1"
echo "memory idle:       $rss_idle"
echo "memory after load: $(rss)"
