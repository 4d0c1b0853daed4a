#!/usr/bin/env bash
# CPU time per spread debit, for A/B comparisons that one run's throughput
# is too noisy to settle (BENCHMARKS.md, "Second session"). Starts
# `billing serve` on a fresh database, runs 64 closed-loop callers over
# 10,000 accounts, and over a 6 s window of the run reads the CPU time
# (utime + stime, /proc/<pid>/stat) of the server, of the load generator
# and of every Postgres process, divided by the debits the server committed
# in that window (its billing_debit_batch_debits_sum metric).
#
# Usage: scripts/bench-cpu.sh [extra `billing serve` arguments]
# Environment: BILLING_BIN (target/release/billing), BENCH_PG_URL
# (postgres://postgres@127.0.0.1:5432), BENCH_DB (billing_bench_cpu),
# BENCH_DATABASE_URL (the server's own URL for that database, e.g. over the
# unix socket: postgres://postgres@%2Fvar%2Frun%2Fpostgresql/billing_bench_cpu;
# default $BENCH_PG_URL/$BENCH_DB).
# For an A/B, alternate two binaries several times on a quiet machine:
#   for i in 1 2; do BILLING_BIN=a/billing scripts/bench-cpu.sh; BILLING_BIN=b/billing scripts/bench-cpu.sh; done
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${BILLING_BIN:-$PWD/target/release/billing}"
PG_URL="${BENCH_PG_URL:-postgres://postgres@127.0.0.1:5432}"
DB="${BENCH_DB:-billing_bench_cpu}"
PORT=50162
METRICS=127.0.0.1:19098
psql "$PG_URL/postgres" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null
psql "$PG_URL/postgres" -qc "CREATE DATABASE $DB" >/dev/null
export DATABASE_URL="${BENCH_DATABASE_URL:-$PG_URL/$DB}"
export BILLING_JWT_SECRET="bench-secret-at-least-16-bytes-long"
export BILLING_DATA_DIR="${TMPDIR:-/tmp}/billing-bench-cpu"
export BILLING_METRICS_LISTEN="$METRICS"
"$BIN" migrate >/dev/null 2>&1
"$BIN" serve --listen "127.0.0.1:$PORT" "$@" >"$BILLING_DATA_DIR.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
until curl -sf "$METRICS/metrics" >/dev/null; do sleep 0.1; done

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
snapshot() { # server-ticks client-ticks postgres-ticks debits seconds
  local client pg=0 p
  client=$(pgrep -f "bench --target http://127.0.0.1:$PORT" | head -1)
  for p in $(pgrep -u postgres); do pg=$((pg + $(cpu_ticks "$p"))); done
  echo "$(cpu_ticks "$SERVER") $(cpu_ticks "$client") $pg" \
    "$(curl -s "$METRICS/metrics" | awk '/^billing_debit_batch_debits_sum/ {print $2}')" \
    "$(date +%s.%N)"
}
window() {
  until [[ "$(psql "$DATABASE_URL" -Atqc "SELECT count(*) FROM ledger_entries WHERE kind = 'usage'")" -gt 1000 ]]; do
    sleep 0.2
  done
  sleep 1
  snapshot >"$BILLING_DATA_DIR.first"
  sleep 6
  snapshot >"$BILLING_DATA_DIR.last"
}
window &
WINDOW=$!
"$BIN" bench --target "http://127.0.0.1:$PORT" --json debit-spread --concurrency 64 \
  --duration-secs 12 --accounts 10000 >/dev/null
wait "$WINDOW"
python3 - "$BILLING_DATA_DIR" "$(getconf CLK_TCK)" <<'PY'
import sys
base, hz = sys.argv[1], int(sys.argv[2])
a = [float(x) for x in open(base + ".first").read().split()]
b = [float(x) for x in open(base + ".last").read().split()]
debits, seconds = b[3] - a[3], b[4] - a[4]
us = [(b[i] - a[i]) * 1e6 / hz / debits for i in range(3)]
print(f"{debits:.0f} debits in {seconds:.1f} s ({debits / seconds:.0f}/s); CPU per debit: "
      f"server {us[0]:.0f} us, load generator {us[1]:.0f} us, Postgres {us[2]:.0f} us, total {sum(us):.0f} us")
PY
