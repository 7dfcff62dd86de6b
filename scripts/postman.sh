#!/usr/bin/env bash
# Runs the Postman collection with newman against a freshly started fmnist-serve, with the
# cli and junit reporters, then prints a pass/fail summary line (newman prints none of its own).
# usage: postman.sh SERVE_BINARY MODEL ADDR
set -euo pipefail
bin=$1 model=$2 addr=$3
newman=target/newman/node_modules/.bin/newman
if [ ! -x "$newman" ]; then
  echo "installing newman (npm)"
  npm install --prefix target/newman --no-save --no-audit --no-fund newman@6 >/dev/null
fi
dir=$(mktemp -d)
trap 'kill $pid 2>/dev/null || true; wait $pid 2>/dev/null || true; rm -rf "$dir"' EXIT
# Per-run credentials: nothing fixed is baked into scripts.
user=postman pass="pm-$RANDOM-$RANDOM-$RANDOM"
FMNIST_BASIC_AUTH="$user:$pass" FMNIST_LOG=warn "$bin" --model "$model" --listen "$addr" >"$dir/out" 2>"$dir/err" &
pid=$!
for _ in $(seq 1 300); do
  curl -fs "http://$addr/v2/health/ready" >/dev/null 2>&1 && break
  sleep 0.1
done
mkdir -p target
status=0
"$newman" run fixtures/fmnist.postman_collection.json \
  --env-var "baseUrl=http://$addr" --env-var "username=$user" --env-var "password=$pass" \
  --reporters cli,junit --reporter-junit-export target/newman-junit.xml --color off || status=$?
tests=$( (grep -o '<testcase ' target/newman-junit.xml || true) | wc -l)
failed=$( (grep -o '<failure' target/newman-junit.xml || true) | wc -l)
echo "newman: $((tests - failed)) passed, $failed failed"
exit $status
