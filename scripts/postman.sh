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
source "$(dirname "$0")/server.sh"
dir=$(mktemp -d)
trap 'stop_server; rm -rf "$dir"' EXIT
user=postman
start_server "$bin" "$model" "$addr" "$user" "$dir"
pass=$server_pass
mkdir -p target
status=0
"$newman" run fixtures/fmnist.postman_collection.json \
  --env-var "baseUrl=http://$addr" --env-var "username=$user" --env-var "password=$pass" \
  --reporters cli,junit --reporter-junit-export target/newman-junit.xml --color off || status=$?
tests=$( (grep -o '<testcase ' target/newman-junit.xml || true) | wc -l)
failed=$( (grep -o '<failure' target/newman-junit.xml || true) | wc -l)
echo "newman: $((tests - failed)) passed, $failed failed"
exit $status
