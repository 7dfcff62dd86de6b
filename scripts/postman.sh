#!/usr/bin/env bash
# Runs the Postman collection with newman against a freshly started fmnist-serve, with the
# cli and junit reporters, then prints a pass/fail summary line (newman prints none of its own).
# usage: postman.sh SERVE_BINARY MODEL ADDR     (starts a server with per-run credentials)
#        postman.sh --url BASE_URL USER PASSWORD  (a server already running, e.g. the container)
set -euo pipefail
newman=target/newman/node_modules/.bin/newman
if [ ! -x "$newman" ]; then
  echo "installing newman (npm)"
  npm install --prefix target/newman --no-save --no-audit --no-fund newman@6 >/dev/null
fi
if [ "$1" = --url ]; then
  base=$2 user=$3 pass=$4
else
  bin=$1 model=$2 addr=$3
  source "$(dirname "$0")/server.sh"
  dir=$(mktemp -d)
  trap 'stop_server; rm -rf "$dir"' EXIT
  user=postman
  start_server "$bin" "$model" "$addr" "$user" "$dir"
  base=http://$addr pass=$server_pass
fi
junit=${NEWMAN_JUNIT:-target/newman-junit.xml}
mkdir -p "$(dirname "$junit")"
status=0
"$newman" run fixtures/fmnist.postman_collection.json \
  --env-var "baseUrl=$base" --env-var "username=$user" --env-var "password=$pass" \
  --reporters cli,junit --reporter-junit-export "$junit" --color off || status=$?
tests=$( (grep -o '<testcase ' "$junit" || true) | wc -l)
failed=$( (grep -o '<failure' "$junit" || true) | wc -l)
echo "newman: $((tests - failed)) passed, $failed failed"
exit $status
