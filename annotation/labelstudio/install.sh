#!/usr/bin/env bash
# Installs the Label Studio server into its own virtual environment.
# Why a separate venv: label-studio 1.23 pins python-json-logger 2.x, prefect >= 3.6 needs 3.x,
# so the server cannot share the project's .venv (which holds only the client SDK).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${LABEL_STUDIO_VENV:-$ROOT/.venv-labelstudio}"
PYTHON="${PYTHON:-python3}"
if [ -x "$VENV/bin/label-studio" ]; then
  echo "label-studio already installed in $VENV"
  exit 0
fi
"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install --quiet --upgrade pip
"$VENV/bin/pip" install --quiet 'label-studio==1.23.*'
# (not `label-studio --version`: it asks PyPI for the latest release and can hang without network)
echo "label-studio $("$VENV/bin/python" -c "import importlib.metadata as m; print(m.version('label-studio'))") installed in $VENV"
