#!/usr/bin/env bash
# The benchmark, from a fresh clone, in one command: builds the release
# binary, finds (or starts) Postgres, starts `billing serve` on a fresh
# database, runs every `billing bench` scenario, then the baselines in the
# same run — pgbench on the product's one-debit SQL (spread and hot, on the
# product's tables), pgbench on the *bare* debit of issue 18 (a minimal
# schema with no triggers, over the unix socket), the no-op gRPC call — and
# prints every figure, each target as MET or not met. See BENCHMARKS.md.
#
# The machine's load average is printed at the start; a run started with a
# load above 1 is flagged BUSY in the report (BENCH_REFUSE_BUSY=1 refuses it).
#
# The server reaches Postgres the way the bare debit's pgbench does: over
# the unix socket when the server has one (else over TCP, as BENCH_PG_URL).
#
# Environment: BENCH_SECONDS (10), BENCH_CONCURRENCY (64), BENCH_ACCOUNTS
# (10000), BENCH_STREAMS (10000), BENCH_TOPUP_SAMPLES (30), BENCH_PORT (50151),
# BENCH_OUT (bench-results), BENCH_AB (0; 1 adds the A/B runs: the product SQL
# with the per-transaction NOTIFY trigger put back, spread debits with one
# account per transaction, with the batch pipeline off
# (--debit-batch-patience-ms 0), and with the server on TCP, TLS when the
# server offers it), BENCH_REFUSE_BUSY (0), BENCH_PG_URL, BENCH_DB
# (billing_bench; the bare debit uses <BENCH_DB>_bare).
set -euo pipefail
cd "$(dirname "$0")/.."

SECONDS_EACH="${BENCH_SECONDS:-10}"
CALLERS="${BENCH_CONCURRENCY:-64}"
ACCOUNTS="${BENCH_ACCOUNTS:-10000}"
STREAMS="${BENCH_STREAMS:-10000}"
SAMPLES="${BENCH_TOPUP_SAMPLES:-30}"
PORT="${BENCH_PORT:-50151}"
OUT="${BENCH_OUT:-bench-results}"
AB="${BENCH_AB:-0}"
mkdir -p "$OUT"
log() { printf '\n==> %s\n' "$*" >&2; }

LOAD_AT_START="$(cut -d' ' -f1 /proc/loadavg)"
BUSY="$(python3 -c "print(1 if float('$LOAD_AT_START') > 1.0 else 0)")"
log "load average at start: $LOAD_AT_START ($(nproc) cores)"
if [[ "$BUSY" == 1 ]]; then
  if [[ "${BENCH_REFUSE_BUSY:-0}" == 1 ]]; then
    echo "refusing to benchmark: load average $LOAD_AT_START > 1 (stop other builds and tests first)" >&2
    exit 2
  fi
  log "WARNING: load average $LOAD_AT_START > 1: this run is flagged BUSY; its figures are pessimistic and noisy"
fi

log "cargo build --release"
cargo build --release --locked
BILLING="${CARGO_TARGET_DIR:-$PWD/target}/release/billing"

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

PGBIN="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)"
if [[ -z "${BENCH_PG_URL:-}" ]]; then
  if [[ "$(pg_answers 127.0.0.1 5432)" == yes ]]; then
    BENCH_PG_URL="postgres://postgres@127.0.0.1:5432"
  else
    [[ -x "$PGBIN/initdb" ]] || { echo "PostgreSQL is not installed: apt-get install postgresql" >&2; exit 1; }
    PGDATA_DIR="/tmp/billing-bench-pg"
    RUN=()
    if [[ "$(id -u)" == 0 ]]; then RUN=(runuser -u postgres --); fi
    if [[ ! -f "$PGDATA_DIR/PG_VERSION" ]]; then
      log "creating a cluster in $PGDATA_DIR"
      mkdir -p "$PGDATA_DIR"; [[ "$(id -u)" == 0 ]] && chown postgres "$PGDATA_DIR"
      "${RUN[@]}" "$PGBIN/initdb" -D "$PGDATA_DIR" -U postgres --auth=trust -E UTF8 >/dev/null
    fi
    if [[ "$(pg_answers 127.0.0.1 54330)" != yes ]]; then
      log "starting the cluster on 127.0.0.1:54330"
      "${RUN[@]}" "$PGBIN/pg_ctl" -D "$PGDATA_DIR" -l "$PGDATA_DIR/server.log" -w \
        -o "-c listen_addresses=127.0.0.1 -p 54330 -k $PGDATA_DIR -c max_connections=300" start >/dev/null
    fi
    BENCH_PG_URL="postgres://postgres@127.0.0.1:54330"
  fi
fi
PGBENCH="$(command -v pgbench || echo "$PGBIN/pgbench")"
DB="${BENCH_DB:-billing_bench}"
BARE_DB="${DB}_bare"
# The bench scrapes no metrics: any free port, so another server's 9090 is no obstacle.
export BILLING_METRICS_LISTEN="${BILLING_METRICS_LISTEN:-127.0.0.1:0}"
log "fresh database $DB on $BENCH_PG_URL"
psql "$BENCH_PG_URL/postgres" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null
psql "$BENCH_PG_URL/postgres" -qc "CREATE DATABASE $DB" >/dev/null
TCP_DATABASE_URL="$BENCH_PG_URL/$DB"
read -r PG_HOST PG_PORT < <(python3 - "$BENCH_PG_URL" <<'PY'
import sys, urllib.parse
u = urllib.parse.urlparse(sys.argv[1])
print(u.hostname or "127.0.0.1", u.port or 5432)
PY
)
SOCKET_DIR="$(psql "$BENCH_PG_URL/postgres" -Atc "SHOW unix_socket_directories" | cut -d, -f1 | xargs)"
if [[ -S "$SOCKET_DIR/.s.PGSQL.$PG_PORT" ]]; then
  SOCKET_URL="$TCP_DATABASE_URL?host=$SOCKET_DIR"; SERVER_VIA="unix socket"
else
  SOCKET_URL="$TCP_DATABASE_URL"; SERVER_VIA="TCP (no unix socket found)"
fi
export DATABASE_URL="$SOCKET_URL"
log "billing serve reaches Postgres over the $SERVER_VIA"
export BILLING_JWT_SECRET="bench-secret-at-least-16-bytes-long"
export BILLING_DATA_DIR="$OUT/data"
"$BILLING" migrate >/dev/null 2>&1

SERVER_PID=""
stop_server() {
  if [[ -n "$SERVER_PID" ]]; then
    kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=""
  fi
}
trap stop_server EXIT
# Start → the health check answers SERVING (grpcurl), or → the port accepts.
serving() {
  if command -v grpcurl >/dev/null; then
    grpcurl -plaintext -max-time 1 "127.0.0.1:$PORT" grpc.health.v1.Health/Check 2>/dev/null | grep -q '"SERVING"'
  else
    [[ "$(pg_answers 127.0.0.1 "$PORT")" == yes ]]
  fi
}
start_server() { # extra serve args...
  log "billing serve on 127.0.0.1:$PORT $*"
  START_NS=$(date +%s%N)
  "$BILLING" serve --listen "127.0.0.1:$PORT" "$@" >>"$OUT/server.log" 2>&1 &
  SERVER_PID=$!
  until serving; do sleep 0.01; done
  SERVING_MS=$(( ($(date +%s%N) - START_NS) / 1000000 ))
}
: >"$OUT/server.log"
start_server
FIRST_SERVING_MS="$SERVING_MS"
bench() { "$BILLING" bench --target "http://127.0.0.1:$PORT" --json "$@"; }
sleep 1
IDLE_RSS_KB=$(awk '/VmRSS/ {print $2}' "/proc/$SERVER_PID/status")

run() { # name, bench args...
  local name="$1"; shift
  log "bench $name"
  bench "$@" | tee "$OUT/$name.json"
}
COMMON=(--concurrency "$CALLERS" --duration-secs "$SECONDS_EACH")
log "load average before measuring: $(cut -d' ' -f1-3 /proc/loadavg)"
run noop noop "${COMMON[@]}"
run spread debit-spread "${COMMON[@]}" --accounts "$ACCOUNTS"
run hot debit-hot "${COMMON[@]}"
HALF=$(python3 -c "import json;print(json.load(open('$OUT/spread.json'))['throughput_per_s']/2)")
run spread_half debit-spread "${COMMON[@]}" --accounts "$ACCOUNTS" --rate "$HALF"
run events events --concurrency 4 --rate 200 --duration-secs "$SECONDS_EACH"
run topup top-up-reaction --samples "$SAMPLES"
run idle_streams idle-streams --streams "$STREAMS" --server-pid "$SERVER_PID" --duration-secs 3
run stream_flood stream-flood --streams "$STREAMS" "${COMMON[@]}"
stop_server

if [[ "$AB" == 1 ]]; then
  # Cross-account batching off: each transaction holds one account's debits.
  start_server --debit-batch-accounts 1
  run ab_spread_one_account debit-spread "${COMMON[@]}" --accounts "$ACCOUNTS"
  stop_server
  # The batch pipeline off (on by default): every free debit starts a batch.
  start_server --debit-batch-patience-ms 0
  run ab_spread_no_pipeline debit-spread "${COMMON[@]}" --accounts "$ACCOUNTS"
  stop_server
  # The server on TCP (TLS when Postgres offers it), like the product-SQL pgbench.
  DATABASE_URL="$TCP_DATABASE_URL" start_server
  run ab_spread_tcp debit-spread "${COMMON[@]}" --accounts "$ACCOUNTS"
  stop_server
fi
trap - EXIT

pgbench_tps() { # script, connection args...
  local script="$1"; shift
  "$PGBENCH" -n -M prepared -c "$CALLERS" -j 2 -T "$SECONDS_EACH" -f "$script" "$@" 2>&1 \
    | tee -a "$OUT/pgbench.txt" | awk '/^tps = / {print $3; exit}'
}
: >"$OUT/pgbench.txt"
log "pgbench, the product's one-debit SQL, spread over $ACCOUNTS accounts (TCP)"
PG_SPREAD=$(pgbench_tps scripts/bench/debit_spread.sql "$TCP_DATABASE_URL")
log "pgbench, the product's one-debit SQL, one hot row (TCP)"
PG_HOT=$(pgbench_tps scripts/bench/debit_hot.sql "$TCP_DATABASE_URL")
PG_NOTIFY_SPREAD=""
if [[ "$AB" == 1 ]]; then
  log "pgbench, the product's one-debit SQL with the per-transaction NOTIFY trigger put back (A/B)"
  psql "$TCP_DATABASE_URL" -q -f scripts/bench/notify_trigger.sql >/dev/null
  PG_NOTIFY_SPREAD=$(pgbench_tps scripts/bench/debit_spread.sql "$TCP_DATABASE_URL")
  psql "$TCP_DATABASE_URL" -qc "DROP TRIGGER bench_balance_events_notify ON balance_events; DROP FUNCTION bench_notify_balance_events()" >/dev/null
fi

# The bare debit: its own database, over the unix socket.
if [[ -S "$SOCKET_DIR/.s.PGSQL.$PG_PORT" ]]; then
  BARE_HOST="$SOCKET_DIR"; BARE_VIA="unix socket"
else
  BARE_HOST="$PG_HOST"; BARE_VIA="TCP (no unix socket found)"
fi
psql "$BENCH_PG_URL/postgres" -qc "DROP DATABASE IF EXISTS $BARE_DB WITH (FORCE)" >/dev/null
psql "$BENCH_PG_URL/postgres" -qc "CREATE DATABASE $BARE_DB" >/dev/null
psql "$BENCH_PG_URL/$BARE_DB" -q -f scripts/bench/bare_schema.sql >/dev/null
BARE_ARGS=(-h "$BARE_HOST" -p "$PG_PORT" -U postgres "$BARE_DB")
log "pgbench, the bare debit, spread over 10000 accounts ($BARE_VIA)"
BARE_SPREAD=$(pgbench_tps scripts/bench/bare_spread.sql "${BARE_ARGS[@]}")
log "pgbench, the bare debit, one hot row ($BARE_VIA)"
BARE_HOT=$(pgbench_tps scripts/bench/bare_hot.sql "${BARE_ARGS[@]}")
LOAD_AT_END="$(cut -d' ' -f1-3 /proc/loadavg)"

python3 - "$OUT" <<PY
import json, os, sys
out = sys.argv[1]
names = ["noop", "spread", "hot", "spread_half", "events", "topup", "idle_streams", "stream_flood"]
if "$AB" == "1":
    names += ["ab_spread_one_account", "ab_spread_no_pipeline", "ab_spread_tcp"]
r = {n: json.load(open(f"{out}/{n}.json")) for n in names}
pg = {"product_spread": float("$PG_SPREAD"), "product_hot": float("$PG_HOT"),
      "bare_spread": float("$BARE_SPREAD"), "bare_hot": float("$BARE_HOT")}
if "$PG_NOTIFY_SPREAD":
    pg["product_spread_with_notify"] = float("$PG_NOTIFY_SPREAD")
busy, load_start, load_end = "$BUSY" == "1", "$LOAD_AT_START", "$LOAD_AT_END"
t = lambda n: r[n]["throughput_per_s"]
p99 = lambda n: r[n]["latency_ms"]["p99"]
def line(label, value, target, ok):
    print(f"{label:<46} {value:<30} target {target:<12} {'MET' if ok else 'not met'}")
flag = "  ** BUSY MACHINE: figures are pessimistic and noisy **" if busy else ""
print(f"\n=== billing benchmark: $CALLERS callers, $SECONDS_EACH s each; load average at start {load_start}, at end {load_end}{flag} ===")
print(f"no-op gRPC (Health/Check)                {t('noop'):10.0f}/s  p99 {p99('noop'):.2f} ms")
print(f"billing debits, spread                   {t('spread'):10.0f}/s  p99 {p99('spread'):.2f} ms  errors {r['spread']['errors']}  (server to Postgres: $SERVER_VIA)")
print(f"billing debits, hot                      {t('hot'):10.0f}/s  p99 {p99('hot'):.2f} ms  errors {r['hot']['errors']}")
print(f"pgbench bare debit, spread ($BARE_VIA)   {pg['bare_spread']:10.0f} tps")
print(f"pgbench bare debit, hot ($BARE_VIA)      {pg['bare_hot']:10.0f} tps")
print(f"pgbench product one-debit SQL, spread    {pg['product_spread']:10.0f} tps   (the old baseline, TCP)")
print(f"pgbench product one-debit SQL, hot       {pg['product_hot']:10.0f} tps   (the old baseline, TCP)")
print(f"debits / no-op RPC (spread)              {t('spread')/t('noop'):10.2f}x")
ev = r["events"]["extra"]["from_answer_ms"]
print(f"event delivery, from the Debit answer    p50 {ev['p50']:.2f} ms  p99 {ev['p99']:.2f} ms  (lower bound of commit -> subscriber)")
if "$AB" == "1":
    print("\nA/B, each a ratio within this run:")
    print(f"  NOTIFY removal: product SQL spread without / with the per-transaction NOTIFY   "
          f"{pg['product_spread']:.0f} / {pg['product_spread_with_notify']:.0f} tps = {pg['product_spread']/pg['product_spread_with_notify']:.2f}x")
    print(f"  cross-account batching: spread debits, many / one account per transaction  "
          f"{t('spread'):.0f} / {t('ab_spread_one_account'):.0f} /s = {t('spread')/t('ab_spread_one_account'):.2f}x")
    print(f"  batch pipeline: spread debits, one batch forming at a time (default) / every free debit starting one (--debit-batch-patience-ms 0)  "
          f"{t('spread'):.0f} / {t('ab_spread_no_pipeline'):.0f} /s = {t('spread')/t('ab_spread_no_pipeline'):.2f}x")
    print(f"  transport: spread debits, server over the $SERVER_VIA / over TCP (TLS when offered)  "
          f"{t('spread'):.0f} / {t('ab_spread_tcp'):.0f} /s = {t('spread')/t('ab_spread_tcp'):.2f}x")
    print("  shared event reader: not measured by this script")
print()
line("spread debits / pgbench bare spread", f"{t('spread')/pg['bare_spread']:.2f}x", ">= 1.0x", t('spread')/pg['bare_spread'] >= 1.0)
line("hot debits / pgbench product-SQL hot", f"{t('hot')/pg['product_hot']:.2f}x (bare hot: {t('hot')/pg['bare_hot']:.2f}x)", ">= 5x", t('hot')/pg['product_hot'] >= 5.0)
line(f"debit p99 at half max ({t('spread_half'):.0f}/s)", f"{p99('spread_half'):.2f} ms", "<= 10 ms", p99('spread_half') <= 10)
line("event delivery p99, commit -> subscriber", f"<= {p99('events'):.2f} ms, >= {ev['p99']:.2f} ms", "<= 10 ms", p99('events') <= 10)
line("top-up reaction p99", f"{p99('topup'):.2f} ms", "<= 30 ms", p99('topup') <= 30 and r["topup"]["errors"] == 0)
e = r["idle_streams"]["extra"]
held, rss = e["streams_held"], e["server_rss_mib_held"] or 0
line(f"{held} idle streams: server RSS", f"{rss:.1f} MiB", "<= 256 MiB", rss <= 256 and r["idle_streams"]["errors"] == 0)
f = r["stream_flood"]["extra"]
line(f"other tenant's debit p99, {f['streams_open']} idle streams open",
     f"{f['with_flood_ms']['p99']:.2f} vs {f['without_flood_ms']['p99']:.2f} ms", "<= 2x without",
     f["p99_within_2x"] and f["streams_refused"] == 0)
line("idle RSS", f"{int('$IDLE_RSS_KB')/1024:.1f} MiB", "<= 50 MiB", int('$IDLE_RSS_KB')/1024 <= 50)
line("start to SERVING (migrated)", "$FIRST_SERVING_MS ms", "<= 1000 ms", int("$FIRST_SERVING_MS") <= 1000)
print("(event delivery: the upper bound is from the debit transaction's start, the lower from its answer; MET only when the upper bound is)")
json.dump({"load_average_at_start": float(load_start), "busy": busy, "pgbench_tps": pg,
           "bare_via": "$BARE_VIA", "server_via": "$SERVER_VIA", "serving_ms": int("$FIRST_SERVING_MS"), "idle_rss_kib": int("$IDLE_RSS_KB"), **r},
          open(f"{out}/summary.json", "w"), indent=1)
PY
