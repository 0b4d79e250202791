#!/usr/bin/env bash
# One command from a fresh machine to VML's main job: install everything,
# then run the demo (save a VM disk, change it, save the change as an
# incremental entry, share it as a small bundle, rebuild it elsewhere).
set -euo pipefail
cd "$(dirname "$0")"
scripts/install-deps
exec .venv/bin/python scripts/demo.py "$@"
