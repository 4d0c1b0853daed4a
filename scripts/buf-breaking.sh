#!/usr/bin/env bash
# `buf breaking`: fails when the protos break a client already deployed
# (the FILE rules of proto/buf.yaml: renumbered, retyped or removed fields,
# enum values, RPCs, renamed fields).
#
# Usage: scripts/buf-breaking.sh                 # proto/ against git's baseline
#        scripts/buf-breaking.sh PROTO AGAINST   # one proto tree against another
#
# The baseline is the merge base of HEAD with `main` (a branch's change);
# on main itself (CI runs on the merged main) it is the first parent of
# HEAD, the main before the last commit or merge landed. BUF_BREAKING_AGAINST
# names another git ref (e.g. the last release tag). Without a git history
# that has main, it says so and checks nothing (exit 0).
set -euo pipefail

if [[ $# -eq 2 ]]; then
  exec buf breaking "$1" --against "$2"
fi
cd "$(dirname "$0")/.."
[[ $# -eq 0 ]] || { echo "usage: $0 [PROTO_DIR AGAINST_DIR]" >&2; exit 2; }

skip() {
  echo "buf breaking: SKIPPED — $1; nothing was compared." >&2
  exit 0
}
git rev-parse --git-dir >/dev/null 2>&1 || skip "not a git checkout"
if [[ -n "${BUF_BREAKING_AGAINST:-}" ]]; then
  base="$(git rev-parse --verify --quiet "${BUF_BREAKING_AGAINST}^{commit}")" \
    || { echo "buf breaking: BUF_BREAKING_AGAINST=$BUF_BREAKING_AGAINST is not a commit" >&2; exit 2; }
  why="$BUF_BREAKING_AGAINST"
else
  main_ref=""
  for ref in main origin/main; do
    if git rev-parse --verify --quiet "$ref^{commit}" >/dev/null; then main_ref="$ref"; break; fi
  done
  [[ -n "$main_ref" ]] || skip "no branch main in this git history (a shallow or detached clone?)"
  base="$(git merge-base HEAD "$main_ref" 2>/dev/null)" || skip "HEAD shares no history with $main_ref"
  why="the merge base with $main_ref"
  if [[ "$base" == "$(git rev-parse HEAD)" ]]; then
    base="$(git rev-parse --verify --quiet 'HEAD^1^{commit}')" || skip "HEAD is main's first commit"
    why="HEAD^1 (main before its last commit)"
  fi
fi

baseline="$(mktemp -d)"
trap 'rm -rf "$baseline"' EXIT
if ! git archive "$base" proto | tar -x -C "$baseline" 2>/dev/null || [[ ! -d "$baseline/proto" ]]; then
  skip "$why ($base) has no proto/ directory"
fi
echo "buf breaking: proto/ against $why (${base:0:12})"
buf breaking proto --against "$baseline/proto"
