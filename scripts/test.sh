#!/usr/bin/env bash
# Installs (first run only; the virtualenv lives outside the clone, keyed on the dependency spec)
# and runs the linter, the type checker and the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh || exit 1
bash scripts/system_deps.sh
ruff check src tests benchmarks
mypy  # src/rscir, configured in pyproject.toml
python -m pytest -q -p no:cacheprovider "$@"
