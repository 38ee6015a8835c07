#!/usr/bin/env bash
# Source me: makes (once) and activates a virtualenv outside the clone, keyed on a hash of the
# dependency spec, so CI and fresh clones reuse the ~5 GB torch install instead of redoing it.
set -euo pipefail
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_key="$(cat "$_root/pyproject.toml" "$_root/scripts/env.sh" | sha256sum | cut -c1-16)"
_venvs="${RSCIR_VENV_ROOT:-$HOME/.cache/rscir/venvs}"
_venv="$_venvs/$_key"
if [ ! -f "$_venv/.complete" ]; then
  echo "[rscir] creating virtualenv $_venv (first run only; torch is large)" >&2
  rm -rf "$_venv"
  mkdir -p "$_venvs"
  python3 -m venv "$_venv"
  "$_venv/bin/python" -m pip install -q --upgrade pip
  "$_venv/bin/python" -m pip install -q -e "$_root[all,test]"
  touch "$_venv/.complete"
fi
# Re-point the editable install at this clone (seconds; the venv may have been built by another).
"$_venv/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$_root" >/dev/null 2>&1 \
  || "$_venv/bin/python" -m pip install -q --no-deps -e "$_root"
# shellcheck disable=SC1091
source "$_venv/bin/activate"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" TRANSFORMERS_OFFLINE="${TRANSFORMERS_OFFLINE:-1}"
