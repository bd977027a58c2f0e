#!/usr/bin/env bash
# Creates .venv in the repository root (once) and installs the project into it.
# torch==2.13.0 goes in first, alone: every later requirement is then satisfied by it, so pip never pulls a
# CUDA build of torch. A stamp keyed on pyproject.toml makes a second run take a second.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
python="${PYTHON:-python3}"
stamp="$venv/.lightning-gns-installed"
want="$(cat "$root/pyproject.toml" "$root/scripts/setup.sh" | sha256sum | cut -d' ' -f1)"

if [ ! -x "$venv/bin/python" ]; then
  echo "setup: creating $venv" >&2
  "$python" -m venv "$venv"
fi
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
  echo "setup: installing torch==2.13.0, then lightning-gns[dev,models] (editable)" >&2
  "${pip[@]}" --upgrade pip
  "${pip[@]}" "torch==2.13.0"
  # The models extra lets the tests cover Hugging Face models too; the pins keep torch and the tested transformers.
  "${pip[@]}" -e "$root[dev,models]" "torch==2.13.0" "transformers==5.3.0"
  echo "$want" >"$stamp"
fi
