#!/usr/bin/env bash
# The web page in a real browser: starts fmnist-serve with per-run credentials, installs the
# pinned playwright-core and axe-core (tests/browser/package-lock.json) with npm, and runs
# tests/browser/page.test.mjs in Debian's chromium. Screenshots land in target/browser/.
# usage: browser.sh SERVE_BINARY MODEL ADDR
set -euo pipefail
bin=$1 model=$2 addr=$3
if [ ! -d tests/browser/node_modules/playwright-core ] || [ ! -d tests/browser/node_modules/axe-core ]; then
  echo "installing playwright-core and axe-core (npm ci)"
  npm ci --prefix tests/browser --no-audit --no-fund >/dev/null
fi
source "$(dirname "$0")/server.sh"
dir=$(mktemp -d)
trap 'stop_server; rm -rf "$dir"' EXIT
# A lame-duck delay, so that the last step sees the page report a draining server.
FMNIST_DRAIN_DELAY_SECS=8 start_server "$bin" "$model" "$addr" browser "$dir"
FMNIST_URL=http://$addr FMNIST_USER=browser FMNIST_PASSWORD=$server_pass FMNIST_PID=$server_pid \
  OUT=target/browser node tests/browser/page.test.mjs
