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
exec .venv/bin/python -m pytest --durations=30 "$@"
