#!/usr/bin/env bash
# Create .venv with the project and its test dependencies (idempotent; quick when done already).
# torch is installed first and pinned, so nothing later can swap it for another build:
# DLRL_TORCH overrides the version (default 2.13.0, a CPU build on the project's machines).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH=${DLRL_TORCH:-2.13.0}
stamp=.venv/.dlrl-installed
# The tests and the distributed job talk to a real redis-server (Debian package; not started here).
# Code rewards (HumanEval / MBPP) run model-written programs under bubblewrap (dlrl/sandbox.py).
missing=""
command -v redis-server >/dev/null || missing="$missing redis-server"
command -v bwrap >/dev/null || missing="$missing bubblewrap"
if [ -n "$missing" ]; then
  SUDO=$([ "$(id -u)" -eq 0 ] && echo "" || echo sudo)
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq $missing >/dev/null
fi
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then exit 0; fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q "torch==$TORCH" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip freeze | grep -i '^torch==' > .venv/torch-constraint.txt
.venv/bin/python -m pip install -q -c .venv/torch-constraint.txt -e '.[dev]' 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import torch, transformers, ray, dlrl" 
touch "$stamp"
