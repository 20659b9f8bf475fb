#!/usr/bin/env bash
# The project's test command (CI runs exactly this through .ci/run): sets up .venv if needed and
# runs the whole suite. Extra arguments go to pytest, e.g. `bash tests/run.sh -x -k config`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. tools/setup_env.sh
echo "[test] python -m pytest -q -p no:cacheprovider tests $*"
rc=0
python -m pytest -q -p no:cacheprovider tests "$@" || rc=$?
if [ "$rc" -eq 5 ]; then
    echo "[test] FAILED: pytest collected no tests (exit 5); a test run that tests nothing is a failure" >&2
    exit 1
fi
exit "$rc"
