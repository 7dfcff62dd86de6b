#!/usr/bin/env bash
# Peak memory and throughput under big batch requests: 64 connections each POSTing 256-image
# /predict bodies for 15 s (wrk), then the server's VmHWM/VmRSS.
# usage: bench_batch_memory.sh SERVE_BINARY MODEL ADDR
set -euo pipefail
bin=$1 model=$2 addr=$3
source "$(dirname "$0")/server.sh"
dir=$(mktemp -d)
trap 'stop_server; rm -rf "$dir"' EXIT
start_server "$bin" "$model" "$addr" bench "$dir"
python3 - "$dir/body.json" <<'PY'
import json, sys
rows = [l.strip().split(",") for l in open("fixtures/sample.csv").readlines()[1:257]]
body = {"images": [[int(x) for x in r[1:]] for r in rows]}
open(sys.argv[1], "w").write(json.dumps(body, separators=(",", ":")))
PY
wrk_post_lua "$dir/body.json" bench "$dir/post.lua"
echo "== POST /predict, 256 images per request, 64 connections, 15 s"
wrk -t2 -c64 -d15s --latency -s "$dir/post.lua" "http://$addr/predict" | grep -E "Requests/sec|  50%|  99%|Non-2xx|Socket errors" || true
awk '/^VmRSS|^VmHWM/ {printf "%s %s kB  ", $1, $2} END {print ""}' "/proc/$server_pid/status"
