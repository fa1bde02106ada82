#!/usr/bin/env bash
# The GPU path proven in one command, within 8 minutes on one H100/H200 (issue 16):
#   1. environment facts (lmforge env --json)                       -> env.json
#   2. pytest -m cuda (tests/test_cuda.py), capped                    -> pytest_cuda.xml
#   3. benchmarks/gpu_mfu.py with the time left (variants in priority order, the rest skipped and named)
#   4. benchmarks/gpu_memory.py: the estimator vs max_memory_allocated at the benchmark shape
#   5. one summary table (benchmarks/gpu_summary.py)                   -> summary.txt
# Results go to $OUT (the device machine's result folder) or runs/gpu/; the log to suite.log there.
#
#   bash benchmarks/gpu_suite.sh                  on the GPU machine
#   bash benchmarks/gpu_suite.sh --dry-run        on a CPU: every stage at its tiny CPU shape (tests skip)
#   bash benchmarks/gpu_suite.sh --prepare-wheels on a machine with pip access: the wheels the GPU image
#                                                 lacks (pydantic and its parts, Python 3.12) into .whl/
# The GPU image (device README / KINDS.md) has torch, transformers, pytest, numpy, pyyaml, tokenizers,
# safetensors, rich, tensorboard, matplotlib and pyarrow, but not pydantic: a run there needs .whl/ carried
# (device tool: carry [".whl"]). lmforge itself is used from the checkout (PYTHONPATH), never installed.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
TOTAL=${LMFORGE_SUITE_BUDGET_S:-450}   # + at most 20 s of stage overrun (hard caps) + the summary: <= 8 minutes
WHEELS="pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0"
DRY=""

if [[ "${1:-}" == "--prepare-wheels" ]]; then
  mkdir -p .whl
  plat=""
  for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
    plat="$plat --platform $p"
  done
  # shellcheck disable=SC2086
  exec python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    $plat -d .whl $WHEELS
fi
[[ "${1:-}" == "--dry-run" ]] && DRY="--dry-run"

OUT=${OUT:-$REPO/runs/gpu}
mkdir -p "$OUT"
: > "$OUT/stages.tsv"
exec > >(tee "$OUT/suite.log") 2>&1
START=$(date +%s)
left() { echo $(( TOTAL - ($(date +%s) - START) )); }

PY=python3
[[ -x .venv/bin/python ]] && PY=.venv/bin/python
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if ! $PY -c "import pydantic" 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/lmforge-site \
      .whl/*.whl || exit 2
    export PYTHONPATH="/tmp/lmforge-site:$PYTHONPATH"
  else
    echo "gpu_suite: pydantic is missing and .whl/ holds no wheels: run 'bash benchmarks/gpu_suite.sh" \
         "--prepare-wheels' where pip works, then carry .whl" >&2
    exit 2
  fi
fi

stage() {  # stage NAME CAP_S COMMAND...: run with a hard time cap, record rc and seconds
  local name=$1 cap=$2; shift 2
  local t0; t0=$(date +%s)
  echo "=== $name (cap ${cap}s, $(left)s of ${TOTAL}s left) ==="
  timeout --kill-after=10 "$cap" "$@"
  local rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" "$cap" >> "$OUT/stages.tsv"
}

stage env 60 $PY -m lmforge env --json --out "$OUT/env.json"
PYTEST_CAP=$(( $(left) - 150 )); (( PYTEST_CAP > 200 )) && PYTEST_CAP=200
stage pytest_cuda "$PYTEST_CAP" $PY -m pytest -m cuda tests/test_cuda.py -q -rs -p no:cacheprovider \
  --junitxml="$OUT/pytest_cuda.xml"
MEM_RESERVE=55
MFU_BUDGET=$(( $(left) - MEM_RESERVE - 25 ))
(( MFU_BUDGET < 30 )) && MFU_BUDGET=30
stage gpu_mfu $(( MFU_BUDGET + 10 )) $PY benchmarks/gpu_mfu.py --budget-s "$MFU_BUDGET" $DRY
MEM_BUDGET=$(( $(left) - 10 ))
(( MEM_BUDGET > 60 )) && MEM_BUDGET=60
(( MEM_BUDGET < 15 )) && MEM_BUDGET=15
stage gpu_memory $(( MEM_BUDGET + 10 )) $PY benchmarks/gpu_memory.py --budget-s "$MEM_BUDGET" $DRY
echo "=== summary ($(( $(date +%s) - START ))s) ==="
$PY benchmarks/gpu_summary.py "$OUT" $DRY
rc=$?
echo "gpu_suite: $(( $(date +%s) - START ))s in all; results in $OUT"
exit $rc
