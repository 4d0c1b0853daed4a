#!/usr/bin/env python3
"""Every test RELIABILITY.md and BENCHMARKS.md cite exists.

A cited test is a backticked path such as `api::top_ups::reaction::name` or
`…name` (the path of the one before it); its last segment must be the name
of a function somewhere under tests/ or src/. Prints each one that is not
and exits 1. Run from the repository root (`./scripts/test.sh` does).
"""

import pathlib
import re
import sys

DOCS = ["RELIABILITY.md", "BENCHMARKS.md"]
# Explanations of the notation, not citations.
NOT_CITATIONS = {"file::test_name"}

root = pathlib.Path(__file__).resolve().parent.parent
sources = "\n".join(
    path.read_text() for folder in ("tests", "src") for path in (root / folder).glob("**/*.rs")
)
functions = set(re.findall(r"\bfn\s+([a-z_][a-z0-9_]*)", sources))
missing = []
for doc in DOCS:
    for code in re.findall(r"`([^`\n]+)`", (root / doc).read_text()):
        code = code.strip()
        if code in NOT_CITATIONS or not re.fullmatch(r"(…|[a-z_][a-z0-9_]*::)[a-z0-9_:…]*[a-z0-9_]", code):
            continue
        name = re.split(r"::|…", code)[-1]
        # Module paths (`ledger::batch`) have no underscore-free test names to check.
        if "_" in name and name not in functions:
            missing.append(f"{doc}: `{code}` names no test")
if missing:
    print("\n".join(missing))
    sys.exit(1)
print(f"cited tests: all found ({', '.join(DOCS)})")
