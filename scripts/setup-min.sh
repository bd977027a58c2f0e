#!/usr/bin/env bash
# Creates .venv-min (once) with the lowest torch, lightning and torchmetrics that pyproject.toml allows
# (scripts/min-versions.txt), then lightning-gns[dev] (editable) on top, constrained to them.
# torch goes in first, alone, pinned. PyPI has only CUDA builds of torch 2.5 for linux x86_64: about 2.5 GB of
# wheels with the nvidia-* libraries, 2-4 minutes to fetch and unpack, 6 GB on disk; they run on CPU as well.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv-min"
python="${PYTHON:-python3}"
pins="$root/scripts/min-versions.txt"
stamp="$venv/.lightning-gns-installed"
want="$(cat "$root/pyproject.toml" "$pins" "$root/scripts/setup-min.sh" | sha256sum | cut -d' ' -f1)"

if [ ! -x "$venv/bin/python" ]; then
  echo "setup-min: creating $venv" >&2
  "$python" -m venv "$venv"
fi
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
  torch_pin="$(grep '^torch==' "$pins")"
  echo "setup-min: installing $torch_pin, then lightning-gns[dev] constrained to $pins" >&2
  "${pip[@]}" --upgrade pip
  "${pip[@]}" "$torch_pin"
  "${pip[@]}" -c "$pins" -e "$root[dev]"
  echo "$want" >"$stamp"
fi
