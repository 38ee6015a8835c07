#!/usr/bin/env bash
# Source me: makes (once) and activates a virtualenv outside the clone, keyed on a hash of the
# dependency spec, so CI and fresh clones reuse the ~5 GB torch install instead of redoing it.
# Leaves the caller's shell options alone.
_rscir_env() {
  local root key venvs venv
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  key="$(cat "$root/pyproject.toml" "$root/scripts/env.sh" | sha256sum | cut -c1-16)"
  venvs="${RSCIR_VENV_ROOT:-$HOME/.cache/rscir/venvs}"
  venv="$venvs/$key"
  if [ ! -f "$venv/.complete" ]; then
    echo "[rscir] creating virtualenv $venv (first run only; torch is large)" >&2
    rm -rf "$venv" && mkdir -p "$venvs" && python3 -m venv "$venv" || return 1
    "$venv/bin/python" -m pip install -q --upgrade pip "setuptools>=77" wheel || return 1
    "$venv/bin/python" -m pip install -q -e "$root[all,test]" || return 1
    touch "$venv/.complete"
  fi
  # Re-point the editable install at this clone (seconds; the venv may have been built by another).
  "$venv/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$root" >/dev/null 2>&1 \
    || "$venv/bin/python" -m pip install -q --no-deps -e "$root" >/dev/null || return 1
  _RSCIR_VENV="$venv"
}
if _rscir_env; then
  # shellcheck disable=SC1091
  source "$_RSCIR_VENV/bin/activate"
  export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" TRANSFORMERS_OFFLINE="${TRANSFORMERS_OFFLINE:-1}"
else
  echo "[rscir] could not set up the virtualenv" >&2
  false
fi
