#!/usr/bin/env bash
# Install what the tests need (only what is missing), then run them all.
# Extra arguments go to pytest, e.g. ./test.sh -k bundle
set -euo pipefail
cd "$(dirname "$0")"
scripts/install-deps
.venv/bin/ruff check vml tests bench scripts
.venv/bin/ruff format --check vml tests bench scripts
exec .venv/bin/pytest "$@"
