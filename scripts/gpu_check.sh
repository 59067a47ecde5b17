#!/usr/bin/env bash
# The GPU self-check, prepared for one run on a lent NVIDIA machine (at most 5 minutes).
# Installs nothing: it uses the machine's python3 (with a CUDA build of torch) and this
# checkout on PYTHONPATH. Prints one table; exit 0 all checks passed, 1 a check failed,
# 2 no GPU visible, 124 it ran out of time. The table also goes to $OUT/gpu_check.txt
# when OUT is set (the device tool's output folder).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"

nvidia-smi --query-gpu=index,name,driver_version,memory.used,memory.total --format=csv || true
"$PY" - <<'PYEOF' || { echo "gpu_check: python packages missing (see above); nothing was run" >&2; exit 2; }
import importlib, sys
missing = [m for m in ("torch", "pynvml", "prometheus_client", "yaml", "numpy") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing: {', '.join(missing)}")
import torch
print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
PYEOF

# 290 s leaves the 5-minute slot some room for start-up; --kill-after stops a wedged child.
log="${OUT:-/tmp}/gpu_check.txt"
timeout --kill-after=10 290 "$PY" -m sentinel.gpu.selfcheck --json "$@" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
echo "gpu_check: exit $rc (table in $log)"
exit "$rc"
