#!/usr/bin/env bash
# Build (once) the one shared environment that every tox env and .ci/run uses.
# tox 4 rebuilds an env_dir shared by two env names at every switch, so the heavy
# install (torch is ~6 GB) lives in .venv/, keyed by a hash of pyproject.toml's install tables.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$root/.venv"
stamp="$venv/.pagoda-stamp"
# Key on what decides the install (build system + [project] tables), not on tool settings.
want="$(sed -n '1,/^\[tool\./p' "$root/pyproject.toml" | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "[venv] building $venv (torch and every dependency from the package index; a few minutes, once)" >&2
python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q -e "$root[test]"
echo "$want" > "$stamp"
