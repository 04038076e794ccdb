#!/usr/bin/env bash
# The whole test suite, as CI runs it: install what is missing, check the
# generated code is fresh, lint, then every test (slow end-to-end ones included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/install.sh
echo "==> generated stubs are fresh"
.venv/bin/python scripts/gen_protos.py --check
echo "==> lint"
.venv/bin/ruff check .
echo "==> tests"
# Two xdist workers, one per core of the 2-core machines the project runs on: most
# tests wait on real daemons (heartbeats, fsyncs, start-up), so one process alone
# left the cores half idle. A file runs whole on one worker (its module fixtures,
# such as vcsim or the fuzz site, start once), in the order tests/conftest.py
# gives: the long files first. Pass -n 0 to run in one process.
exec .venv/bin/python -m pytest --durations=30 -n 2 --dist loadfile --no-loadscope-reorder "$@"
