#!/usr/bin/env bash
# API conformance: schemathesis (PyPI, in .venv) against GET /openapi.json of a live server with
# Basic auth, every check except positive_data_acceptance, a fixed seed and bounded examples.
# Fails on any server error, any response that breaks the schema, or any invalid request that
# is accepted. positive_data_acceptance is left out because the request rules that JSON Schema
# cannot state (v2 `data` must hold exactly N x 784 values for its `shape`; N at most
# --max-images) make schema-valid requests that the server rightly refuses with 422.
# usage: schemathesis.sh SERVE_BINARY MODEL ADDR MAX_EXAMPLES
set -euo pipefail
bin=$1 model=$2 addr=$3 examples=$4
source "$(dirname "$0")/server.sh"
dir=$(mktemp -d)
trap 'stop_server; rm -rf "$dir"' EXIT
# Schemathesis sends many wrong credentials on purpose: no lockout for this run.
FMNIST_AUTH_MAX_FAILURES=0 start_server "$bin" "$model" "$addr" st "$dir"
mkdir -p target
status=0
.venv/bin/st run "http://$addr/openapi.json" -a "st:$server_pass" \
  --checks all --exclude-checks positive_data_acceptance \
  -n "$examples" --seed 1 --request-timeout 10 \
  --report junit --report-junit-path target/schemathesis-junit.xml || status=$?
kill -0 "$server_pid" || { echo "schemathesis: the server died"; status=1; }
grep -q '"level":"ERROR"\|panicked' "$dir/server.err" && { echo "schemathesis: errors in the server log"; status=1; }
exit $status
