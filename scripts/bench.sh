#!/usr/bin/env bash
# The benchmark, from a fresh clone, in one command: builds the release
# binary, finds (or starts) Postgres, starts `billing serve` on a fresh
# database, runs every `billing bench` scenario, then the baselines (pgbench
# with the SQL of one debit, spread and hot, at the same concurrency; the
# no-op gRPC call), and prints the ratios. See BENCHMARKS.md.
# Environment: BENCH_SECONDS (10), BENCH_CONCURRENCY (64), BENCH_ACCOUNTS
# (10000), BENCH_STREAMS (10000), BENCH_PORT (50151), BENCH_OUT (bench-results).
set -euo pipefail
cd "$(dirname "$0")/.."

SECONDS_EACH="${BENCH_SECONDS:-10}"
CALLERS="${BENCH_CONCURRENCY:-64}"
ACCOUNTS="${BENCH_ACCOUNTS:-10000}"
STREAMS="${BENCH_STREAMS:-10000}"
PORT="${BENCH_PORT:-50151}"
OUT="${BENCH_OUT:-bench-results}"
mkdir -p "$OUT"
log() { printf '\n==> %s\n' "$*" >&2; }

log "cargo build --release"
cargo build --release --locked
BILLING="$PWD/target/release/billing"

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
DB=billing_bench
log "fresh database $DB on $BENCH_PG_URL"
psql "$BENCH_PG_URL/postgres" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null
psql "$BENCH_PG_URL/postgres" -qc "CREATE DATABASE $DB" >/dev/null
export DATABASE_URL="$BENCH_PG_URL/$DB"
export BILLING_JWT_SECRET="bench-secret-at-least-16-bytes-long"
export BILLING_DATA_DIR="$OUT/data"
"$BILLING" migrate >/dev/null 2>&1

log "billing serve on 127.0.0.1:$PORT"
START_NS=$(date +%s%N)
"$BILLING" serve --listen "127.0.0.1:$PORT" >"$OUT/server.log" 2>&1 &
SERVER_PID=$!
trap 'kill $SERVER_PID 2>/dev/null || true' EXIT
# Start → the health check answers SERVING (grpcurl), or → the port accepts.
serving() {
  if command -v grpcurl >/dev/null; then
    grpcurl -plaintext -max-time 1 "127.0.0.1:$PORT" grpc.health.v1.Health/Check 2>/dev/null | grep -q '"SERVING"'
  else
    [[ "$(pg_answers 127.0.0.1 "$PORT")" == yes ]]
  fi
}
until serving; do sleep 0.01; done
SERVING_MS=$(( ($(date +%s%N) - START_NS) / 1000000 ))
bench() { "$BILLING" bench --target "http://127.0.0.1:$PORT" --json "$@"; }
sleep 1
IDLE_RSS_KB=$(awk '/VmRSS/ {print $2}' "/proc/$SERVER_PID/status")

run() { # name, bench args...
  local name="$1"; shift
  log "bench $name"
  bench "$@" | tee "$OUT/$name.json"
}
COMMON=(--concurrency "$CALLERS" --duration-secs "$SECONDS_EACH")
run noop noop "${COMMON[@]}"
run spread debit-spread "${COMMON[@]}" --accounts "$ACCOUNTS"
run hot debit-hot "${COMMON[@]}"
HALF=$(python3 -c "import json;print(json.load(open('$OUT/spread.json'))['throughput_per_s']/2)")
run spread_half debit-spread "${COMMON[@]}" --accounts "$ACCOUNTS" --rate "$HALF"
run events events --concurrency 4 --rate 200 --duration-secs "$SECONDS_EACH"
run topup top-up-reaction --samples 30
run idle_streams idle-streams --streams "$STREAMS" --server-pid "$SERVER_PID" --duration-secs 3
run stream_flood stream-flood --streams "$STREAMS" "${COMMON[@]}"

kill $SERVER_PID; wait $SERVER_PID 2>/dev/null || true
trap - EXIT

pgbench_tps() { # script
  "$PGBIN/pgbench" -n -M prepared -c "$CALLERS" -j 2 -T "$SECONDS_EACH" -f "$1" "$DATABASE_URL" 2>&1 \
    | tee -a "$OUT/pgbench.txt" | awk '/^tps = / {print $3; exit}'
}
log "pgbench, the SQL of one debit, spread over $ACCOUNTS accounts"
PG_SPREAD=$(pgbench_tps scripts/bench/debit_spread.sql)
log "pgbench, the SQL of one debit, one hot row"
PG_HOT=$(pgbench_tps scripts/bench/debit_hot.sql)

python3 - "$OUT" "$PG_SPREAD" "$PG_HOT" "$SERVING_MS" "$IDLE_RSS_KB" "$CALLERS" <<'PY'
import json, sys
out, pg_spread, pg_hot, serving_ms, idle_kb, callers = sys.argv[1:]
r = {n: json.load(open(f"{out}/{n}.json")) for n in
     ["noop", "spread", "hot", "spread_half", "events", "topup", "idle_streams", "stream_flood"]}
pg_spread, pg_hot = float(pg_spread), float(pg_hot)
t = lambda n: r[n]["throughput_per_s"]
p99 = lambda n: r[n]["latency_ms"]["p99"]
def line(label, value, target, ok):
    print(f"{label:<44} {value:<28} target {target:<14} {'MET' if ok else 'not met'}")
print(f"\n=== billing benchmark ({callers} callers) ===")
print(f"no-op gRPC (Health/Check)          {t('noop'):10.0f}/s  p99 {p99('noop'):.2f} ms")
print(f"billing debits, spread             {t('spread'):10.0f}/s  p99 {p99('spread'):.2f} ms  errors {r['spread']['errors']}")
print(f"billing debits, hot                {t('hot'):10.0f}/s  p99 {p99('hot'):.2f} ms  errors {r['hot']['errors']}")
print(f"pgbench one-debit SQL, spread      {pg_spread:10.0f}/s")
print(f"pgbench one-debit SQL, hot         {pg_hot:10.0f}/s")
print(f"debits / no-op RPC (spread)        {t('spread')/t('noop'):10.2f}x")
print()
e = r["idle_streams"]["extra"]
line("spread debits / pgbench spread", f"{t('spread')/pg_spread:.2f}x", ">= 1.0x", t('spread')/pg_spread >= 1.0)
line("hot debits / pgbench hot", f"{t('hot')/pg_hot:.2f}x", ">= 3x", t('hot')/pg_hot >= 3.0)
line(f"debit p99 at half max ({t('spread_half'):.0f}/s)", f"{p99('spread_half'):.2f} ms", "<= 10 ms", p99('spread_half') <= 10)
line("event delivery p99", f"{p99('events'):.2f} ms", "<= 10 ms", p99('events') <= 10)
held, rss = e["streams_held"], e["server_rss_mib_held"] or 0
line(f"{held} idle streams: server RSS", f"{rss:.1f} MiB", "<= 256 MiB", rss <= 256 and r["idle_streams"]["errors"] == 0)
f = r["stream_flood"]["extra"]
line(f"other tenant's debit p99, {f['streams_open']} idle streams open",
     f"{f['with_flood_ms']['p99']:.2f} vs {f['without_flood_ms']['p99']:.2f} ms", "<= 2x without",
     f["p99_within_2x"] and f["streams_refused"] == 0)
line("top-up reaction p99", f"{p99('topup'):.2f} ms", "<= 50 ms", p99('topup') <= 50 and r["topup"]["errors"] == 0)
line("idle RSS", f"{int(idle_kb)/1024:.1f} MiB", "<= 50 MiB", int(idle_kb)/1024 <= 50)
line("start to SERVING (migrated)", f"{serving_ms} ms", "<= 1000 ms", int(serving_ms) <= 1000)
json.dump({"pgbench_spread_tps": pg_spread, "pgbench_hot_tps": pg_hot, "serving_ms": int(serving_ms),
           "idle_rss_kib": int(idle_kb), **r}, open(f"{out}/summary.json", "w"), indent=1)
PY
