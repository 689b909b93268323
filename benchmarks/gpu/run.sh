#!/usr/bin/env bash
# keyedge's prepared GPU check for an NVIDIA H100 / H200 machine with Python, PyTorch (CUDA), CMake and nvcc
# and no network: installs the wheels it lacks from --wheels DIR (wheels.txt lists them), then runs
# check.py (the GPU tests, the kernel's bandwidth, keyed ViT-B/16 training and inference) within the budget.
#
#   benchmarks/gpu/run.sh OUT [--wheels DIR] [--budget-s 480]
#
# Writes OUT/gpu_check.json and OUT/check.log. Exit 0: passed; 1: a step failed; 2: bad arguments;
# 3: no CUDA GPU here (nothing measured). PYTHON picks the interpreter (default python3).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
py=${PYTHON:-python3}
wheels=""
args=()
while [ $# -gt 0 ]; do
  case $1 in
    --wheels)
      [ $# -ge 2 ] || { echo "run.sh: --wheels needs a directory" >&2; exit 2; }
      wheels=$2; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
if [ -n "$wheels" ]; then
  [ -d "$wheels" ] || { echo "run.sh: --wheels $wheels is not a directory" >&2; exit 2; }
  compgen -G "$wheels/*.whl" >/dev/null || { echo "run.sh: no wheels in $wheels" >&2; exit 2; }
  site=$(mktemp -d "${TMPDIR:-/tmp}/keyedge-site.XXXXXX")
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$wheels"/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$py" "$here/check.py" ${args[@]+"${args[@]}"}
