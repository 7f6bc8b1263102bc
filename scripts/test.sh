#!/usr/bin/env bash
# Set up and run the test suite CI runs: everything except tests marked slow,
# plus the slow ones marked ci. Fails when pytest collects no tests (exit 5). The 15
# slowest tests are listed at the end: the suite must stay under 20 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
set +e
.venv/bin/python -m pytest -m "not slow or ci" -p no:cacheprovider --durations=15 "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit "$rc"
