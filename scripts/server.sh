# Sourced by the scripts that drive a live fmnist-serve (bench_serve.sh, bench_batch_memory.sh,
# postman.sh, schemathesis.sh, soak.sh).
#
# start_server BIN MODEL ADDR USER DIR: starts fmnist-serve in the background with per-run
# credentials (USER and a random password, left in $server_pass), logs in DIR, pid in
# $server_pid, and waits until /v2/health/ready answers. Nothing fixed is baked into scripts.
# Extra server flags (e.g. --grpc-listen ADDR) come from $SERVER_ARGS.
server_pid=""
server_pass=""

start_server() {
  local bin=$1 model=$2 addr=$3 user=$4 dir=$5
  server_pass="run-$RANDOM-$RANDOM-$RANDOM"
  # No lame-duck delay for these short-lived servers (FMNIST_DRAIN_DELAY_SECS overrides).
  # shellcheck disable=SC2086 # SERVER_ARGS is a list of flags
  FMNIST_DRAIN_DELAY_SECS=${FMNIST_DRAIN_DELAY_SECS:-0} FMNIST_BASIC_AUTH="$user:$server_pass" FMNIST_LOG=warn \
    "$bin" --model "$model" --listen "$addr" \
    ${SERVER_ARGS:-} >"$dir/server.out" 2>"$dir/server.err" &
  server_pid=$!
  for _ in $(seq 1 300); do
    curl -fs "http://$addr/v2/health/ready" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "fmnist-serve did not become ready on $addr:" >&2
  cat "$dir/server.err" >&2
  return 1
}

# stop_server: SIGTERM, then wait for the exit.
stop_server() {
  [ -n "$server_pid" ] || return 0
  kill "$server_pid" 2>/dev/null || true
  wait "$server_pid" 2>/dev/null || true
}

# single_image_body FILE: {"image":[...]} for the first fixture image (an ankle boot).
single_image_body() {
  sed -n 2p fixtures/sample.csv | cut -d, -f2- | sed 's/^/{"image":[/; s/$/]}/' >"$1"
}

# wrk_post_lua BODY_FILE USER OUT: a wrk script that POSTs BODY_FILE to the server as JSON
# with Basic auth for USER and the per-run $server_pass.
wrk_post_lua() {
  local auth
  auth=$(printf '%s:%s' "$2" "$server_pass" | base64 -w0)
  cat >"$3" <<LUA
wrk.method = "POST"
local f = io.open("$1"); wrk.body = f:read("*a"); f:close()
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Basic $auth"
LUA
}
