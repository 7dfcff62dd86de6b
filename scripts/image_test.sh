#!/usr/bin/env bash
# End-to-end check of the container image (what CI runs after `make image`):
#   the image is FROM scratch and at most 30 MB; it runs as a non-root user; it starts with a
#   mounted credentials file (nothing baked in) and becomes ready; its no-shell HEALTHCHECK
#   passes; an authenticated prediction is right and an unauthenticated one gets 401; the
#   Postman collection passes against it (newman); its gRPC listener answers ModelInfer
#   (fmnist-load, all three encodings, 0 errors); SIGTERM stops it cleanly with exit 0.
# usage: image_test.sh IMAGE ADDR GRPC_ADDR LOAD_BINARY
# Environment: CONTAINER (default podman) is the engine command with any global flags;
# CONTAINER_RUN_FLAGS are extra `run` flags (CI: rlimits and host networking, see .ci/run).
set -euo pipefail
image=$1 addr=$2 grpc_addr=$3 load=$4
engine=${CONTAINER:-podman}
run_flags=${CONTAINER_RUN_FLAGS:-}
name=fmnist-image-test-$$
dir=$(mktemp -d)
cleanup() { $engine rm -f "$name" >/dev/null 2>&1 || true; rm -rf "$dir"; }
trap cleanup EXIT
fail() { echo "image test FAILED: $*" >&2; $engine logs "$name" 2>&1 | tail -20 >&2 || true; exit 1; }

size=$($engine image inspect "$image" --format '{{.Size}}')
echo "image $image: $((size / 1024 / 1024)) MB ($size bytes)"
[ "$size" -le $((30 * 1024 * 1024)) ] || fail "image is larger than 30 MB"
user=$($engine image inspect "$image" --format '{{.Config.User}}')
[ -n "$user" ] && [ "${user%%:*}" != 0 ] && [ "${user%%:*}" != root ] || fail "image runs as root ($user)"

# A per-run credentials file made by the image itself, readable only by the image's user.
pass="ci-$RANDOM-$RANDOM-$RANDOM"
# shellcheck disable=SC2086
printf '%s\n' "$pass" | $engine run --rm -i --no-healthcheck $run_flags "$image" hash-password tester >"$dir/credentials" 2>/dev/null
grep -q '^tester:\$argon2id\$' "$dir/credentials" || fail "hash-password in the image gave: $(cat "$dir/credentials")"
chown "${user%%:*}" "$dir/credentials" 2>/dev/null || true
chmod 0400 "$dir/credentials"

# shellcheck disable=SC2086
$engine run -d --name "$name" $run_flags \
  -e FMNIST_LISTEN="$addr" -e FMNIST_GRPC_LISTEN="$grpc_addr" -e FMNIST_CREDENTIALS_FILE=/run/fmnist/credentials \
  -v "$dir/credentials:/run/fmnist/credentials:ro" "$image" >/dev/null
ready=
for _ in $(seq 1 100); do
  if curl -fs "http://$addr/v2/health/ready" >/dev/null 2>&1; then ready=1; break; fi
  sleep 0.2
done
[ -n "$ready" ] || fail "not ready on $addr"
echo "container ready on $addr"
$engine healthcheck run "$name" || fail "HEALTHCHECK failed"
echo "HEALTHCHECK (fmnist-serve healthcheck, no shell): healthy"

# Image 0 of the fixture is an ankle boot (class 9).
body=$(sed -n 2p fixtures/sample.csv | cut -d, -f2- | sed 's/^/{"image":[/; s/$/]}/')
label=$(sed -n 2p fixtures/sample.csv | cut -d, -f1)
code=$(curl -s -o "$dir/ok.json" -w '%{http_code}' -u "tester:$pass" -H 'Content-Type: application/json' \
  -d "$body" "http://$addr/predict")
[ "$code" = 200 ] || fail "authenticated prediction got $code: $(cat "$dir/ok.json")"
grep -q "\"label\":$label," "$dir/ok.json" || fail "wrong prediction for a class-$label image: $(cat "$dir/ok.json")"
echo "authenticated POST /predict: 200, class $label"
code=$(curl -s -o "$dir/no.json" -w '%{http_code}' -H 'Content-Type: application/json' -d "$body" "http://$addr/predict")
[ "$code" = 401 ] || fail "unauthenticated prediction got $code"
echo "unauthenticated POST /predict: 401"

NEWMAN_JUNIT=target/newman-image-junit.xml bash "$(dirname "$0")/postman.sh" --url "http://$addr" tester "$pass"

FMNIST_LOAD_PASSWORD=$pass timeout 30 "$load" --http "$addr" --grpc "$grpc_addr" --user tester \
  --concurrency 4 --seconds 1 --warmup-secs 0 || fail "v2 JSON / binary / gRPC load against the image failed"
echo "v2 JSON, binary and gRPC (fmnist-load): 0 errors"

$engine kill --signal TERM "$name" >/dev/null
status=$(timeout 60 $engine wait "$name") || fail "did not stop within 60 s of SIGTERM"
[ "$status" = 0 ] || fail "exit status $status after SIGTERM"
$engine logs "$name" 2>&1 | grep -q '"stopped"' || fail "no 'stopped' log line"
! $engine logs "$name" 2>&1 | grep -q "$pass" || fail "the password appears in the container's logs"
echo "SIGTERM: clean exit 0"
echo "image test passed"
