#!/usr/bin/env bash
# The README's test: runs every shell block of README.md marked runnable, in
# order, against a fresh `billing serve` (free gRPC and metrics ports, a fresh
# database, its own data directory), and fails when a command fails or a
# shown output differs from what the service printed.
#
# Markers (in the fence's info string, so GitHub still highlights the block):
#   ```sh readme-check          run this block
#   ```sh readme-check retry    run it again (up to 30 s) until its output matches
#   ```sh readme-check fails    the block must exit non-zero (an error is the point)
#   ```json output              directly after a runnable block: what it prints
#                               (stdout and stderr). `...` inside a line matches
#                               anything; a line of only `...` matches any lines.
# Blocks share shell variables (each block's assignments are carried to the
# next). `127.0.0.1:50051` / `localhost:50051` (and `:9090` for metrics) are
# rewritten to the fresh server's ports.
#
# Usage: scripts/readme-check.sh            (builds the debug binary if needed)
#   BILLING_BIN=path/to/billing             use that binary instead
#   TEST_DATABASE_URL=postgres://…/postgres the server the fresh database goes on
#   README_CHECK_KEEP=1                     keep the work directory (logs, outputs)
#   README_CHECK_SHOW=1                     print every block's output, compare nothing
#                                           (for writing the README's shown outputs)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"

for tool in grpcurl jq python3; do
  command -v "$tool" >/dev/null || { echo "readme-check: $tool is not installed (scripts/test.sh installs it)" >&2; exit 1; }
done

if [[ -z "${BILLING_BIN:-}" ]]; then
  cargo build --locked --quiet --bin billing
  BILLING_BIN="${CARGO_TARGET_DIR:-$ROOT/target}/debug/billing"
fi
[[ -x "$BILLING_BIN" ]] || { echo "readme-check: no billing binary at $BILLING_BIN" >&2; exit 1; }

WORK="$(mktemp -d /tmp/readme-check.XXXXXX)"
chmod 755 "$WORK"
mkdir "$WORK/bin"
ln -s "$(readlink -f "$BILLING_BIN")" "$WORK/bin/billing"

SERVER_URL="${TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
RUN="${BILLING_TEST_RUN:-$(date +%s)_$$}"
DB="billing_test_${RUN}_readme"
SERVE_PID=""

cleanup() {
  local status=$?
  if [[ -n "$SERVE_PID" ]]; then
    kill "$SERVE_PID" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$SERVE_PID" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$SERVE_PID" 2>/dev/null || true
  fi
  psql "$SERVER_URL" -qc "DROP DATABASE IF EXISTS \"$DB\" WITH (FORCE)" >/dev/null 2>&1 || true
  if [[ $status -ne 0 && -f "$WORK/serve.log" ]]; then
    echo "--- last lines of the server log ($WORK/serve.log):" >&2
    tail -n 20 "$WORK/serve.log" >&2
  fi
  if [[ -z "${README_CHECK_KEEP:-}" && $status -eq 0 ]]; then rm -rf "$WORK"; else echo "readme-check: work directory kept: $WORK" >&2; fi
  exit $status
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
GRPC_PORT="$(free_port)"
METRICS_PORT="$(free_port)"

psql "$SERVER_URL" -qc "CREATE DATABASE \"$DB\"" >/dev/null
DATABASE_URL_FOR_TEST="${SERVER_URL%/*}/$DB"

# The user's environment must not leak into the walk-through.
while IFS= read -r name; do unset "$name"; done < <(env | sed -n 's/^\(BILLING_[A-Z_]*\)=.*/\1/p')
unset DATABASE_URL OTEL_EXPORTER_OTLP_ENDPOINT OTEL_EXPORTER_OTLP_TRACES_ENDPOINT

(
  cd "$WORK"
  exec "$WORK/bin/billing" serve --listen "127.0.0.1:$GRPC_PORT" --metrics-listen "127.0.0.1:$METRICS_PORT" \
    --database-url "$DATABASE_URL_FOR_TEST" >"$WORK/serve.log" 2>&1
) &
SERVE_PID=$!
for i in $(seq 600); do
  if grpcurl -plaintext -max-time 2 "127.0.0.1:$GRPC_PORT" grpc.health.v1.Health/Check >/dev/null 2>&1; then break; fi
  kill -0 "$SERVE_PID" 2>/dev/null || { echo "readme-check: billing serve exited:" >&2; cat "$WORK/serve.log" >&2; exit 1; }
  [[ $i -lt 600 ]] || { echo "readme-check: billing serve did not answer health checks within 60 s" >&2; exit 1; }
  sleep 0.1
done

PATH="$WORK/bin:$PATH" WORK="$WORK" README_CHECK_SHOW="${README_CHECK_SHOW:-}" GRPC_PORT="$GRPC_PORT" METRICS_PORT="$METRICS_PORT" \
  python3 - "$ROOT/README.md" <<'PY'
import os, re, subprocess, sys, time

readme, work = sys.argv[1], os.environ["WORK"]
grpc, metrics = os.environ["GRPC_PORT"], os.environ["METRICS_PORT"]

def ports(text):
    for host in ("127.0.0.1", "localhost"):
        text = text.replace(f"{host}:50051", f"127.0.0.1:{grpc}").replace(f"{host}:9090", f"127.0.0.1:{metrics}")
    return text

# Fenced blocks: (info words, body, line number).
blocks, lines, i = [], open(readme, encoding="utf-8").read().split("\n"), 0
while i < len(lines):
    fence = re.match(r"^(`{3,})(.*)$", lines[i])
    if fence:
        start, body, i = i + 1, [], i + 1
        while i < len(lines) and not lines[i].startswith(fence.group(1)):
            body.append(lines[i]); i += 1
        blocks.append((fence.group(2).split(), "\n".join(body), start))
    i += 1

steps = []  # [block, expected output or None]
for index, (words, body, line) in enumerate(blocks):
    if "readme-check" in words:
        steps.append([(words, body, line), None])
    elif "output" in words and steps and blocks[index - 1][0] == steps[-1][0][0] and blocks[index - 1][2] == steps[-1][0][2]:
        steps[-1][1] = body
if not steps:
    sys.exit("readme-check: no block of README.md is marked runnable")

assigned = sorted({m.group(2) for (_, body, _), _ in steps
                   for m in re.finditer(r"^\s*(export\s+)?([A-Za-z_][A-Za-z0-9_]*)=", body, re.M)})
state = os.path.join(work, "state.sh")
open(state, "w").close()

def pattern(expected):
    parts = []
    for line in ports(expected).rstrip("\n").split("\n"):
        if line.strip() == "...":
            parts.append(r"(?:[^\n]*\n)*?")
        else:
            parts.append(".*?".join(re.escape(p) for p in line.rstrip().split("...")) + r"[ \t]*\n")
    return re.compile("".join(parts))

def matches(expected, actual):
    text = "\n".join(l.rstrip() for l in actual.rstrip("\n").split("\n")) + "\n"
    return pattern(expected).fullmatch(text) is not None

def run(body):
    script = f"set -eo pipefail\nsource {state}\n{ports(body)}\ndeclare -p {' '.join(assigned)} >{state} 2>/dev/null || true\n"
    done = subprocess.run(["bash", "-c", script], cwd=work, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=120)
    return done.returncode, done.stdout

started = time.monotonic()
for (words, body, line), expected in steps:
    deadline = time.monotonic() + (30 if "retry" in words else 0)
    while True:
        code, output = run(body)
        failed = (code == 0) if "fails" in words else (code != 0)
        mismatch = expected is not None and not matches(expected, output)
        if not (failed or mismatch) or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    if os.environ.get("README_CHECK_SHOW"):
        print(f"=== line {line} exit {code}\n{output.rstrip()}")
        continue
    if failed or mismatch:
        print(f"readme-check: README.md block at line {line}: "
              + ("exit status " + str(code) + (" (expected a failure)" if "fails" in words else "") if failed else "the output differs from the one shown"),
              file=sys.stderr)
        print("--- block:\n" + body.strip(), file=sys.stderr)
        if expected is not None:
            print("--- shown in README.md:\n" + expected.rstrip(), file=sys.stderr)
        print("--- printed:\n" + output.rstrip(), file=sys.stderr)
        sys.exit(1)
checked = sum(1 for _, e in steps if e is not None)
print(f"readme-check: {len(steps)} blocks of README.md ran, {checked} shown outputs matched ({time.monotonic() - started:.1f} s)")
PY
