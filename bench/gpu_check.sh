#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py says what it measures): one table, exit status 1 if any check FAILED.
#   bash bench/gpu_check.sh [--out DIR]     # on one CUDA GPU, about 5 minutes on an H200
#   bash bench/gpu_check.sh --dry_run       # (or SMALL=1) the same script on the CPU at shrunken shapes
# The GPU machine has no `datasets` package: the dry run hides it too, so no import path can lean on it.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
export PYTHONUNBUFFERED=1
if [[ " $* " == *" --dry_run "* || "${SMALL:-0}" == 1 ]]; then
  shim=$(mktemp -d)
  trap 'rm -rf "$shim"' EXIT
  cat >"$shim/sitecustomize.py" <<'PY'
"""gpu_check dry run: `datasets` is not found, as on the GPU machine (the path finder no longer sees it)."""
import importlib.machinery

_find_spec = importlib.machinery.PathFinder.find_spec


def _without_datasets(cls, name, path=None, target=None):
    return None if name.split(".")[0] == "datasets" else _find_spec(name, path, target)


importlib.machinery.PathFinder.find_spec = classmethod(_without_datasets)
PY
  export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
  if "$py" -c "import datasets" 2>/dev/null; then
    echo "gpu_check dry run: could not hide the datasets package" >&2
    exit 1
  fi
fi
"$py" bench/gpu_check.py "$@"
