#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py says what it measures): one table, exit status 1 if any check FAILED.
#   bash bench/gpu_check.sh [--out DIR]     # on one CUDA GPU, about 5 minutes on an H200
#   bash bench/gpu_check.sh --dry_run       # (or SMALL=1) the same script on the CPU at shrunken shapes
# Then on-policy generation (bench/generate_bench.py, goal >= 2x the previous path at micro-batch 8 on a GPU): eager,
# then compiled with CUDA graphs (generate_compile; the dry run: eager only, small); needs shared/realdata (SmolLM tokenizer, GSM8K) beside the checkout.
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
status=0
"$py" bench/gpu_check.py "$@" || status=$?
if [[ " $* " == *" --dry_run "* || "${SMALL:-0}" == 1 ]]; then
  "$py" bench/generate_bench.py --layers 2 --new_tokens 8 --steps 1 --prompts 2 --micro 1,2 || status=1
else
  "$py" bench/generate_bench.py || status=1
  "$py" bench/generate_bench.py --compile || status=1
fi
exit $status
