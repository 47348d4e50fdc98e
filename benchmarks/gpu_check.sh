#!/usr/bin/env bash
# One-GPU check of fgdistill, at most 8 minutes: run it from the repository root on a machine
# with one CUDA device and the package installed (or PYTHON pointing at a venv that has it).
#
#   bash benchmarks/gpu_check.sh            # writes work_dirs/gpu_check/, prints one summary
#   PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh
#
# Steps, each under its own time limit (seconds, together 450 at most):
#   1. cuda_tests   the CUDA tests: pytest -m cuda                                  (150)
#   2. amp_teacher  AMP training of a synthetic RetinaNet-R50 teacher, 200 iterations (90)
#   3. amp_distill  AMP FGD distillation of a RetinaNet-R18 student, 300 iterations  (90)
#   4. loss_bench   benchmarks/loss_speed.py --device cuda                           (60)
#   5. torchrun     the distillation under torchrun with one process, 50 iterations  (60)
# A step that fails or runs out of time is marked FAIL and the others still run. The exit code
# is the number of failed steps (0: all passed).
set -u -o pipefail

PYTHON=${PYTHON:-python}
OUT=${OUT:-work_dirs/gpu_check}
DATA="$OUT/synth_data"
mkdir -p "$OUT"
export PYTHONPATH="${PWD}/src${PYTHONPATH:+:$PYTHONPATH}"

declare -a NAMES=() RESULTS=() TIMES=()
FAILED=0

step() {  # step NAME LIMIT_S COMMAND...: run COMMAND with a limit, log to $OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS status
    echo "== $name (limit ${limit}s): $*"
    if timeout --signal=TERM --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1; then
        status=ok
    else
        local rc=$?
        status="FAIL (exit $rc$([ "$rc" -eq 124 ] && echo ', timed out'))"
        FAILED=$((FAILED + 1))
        tail -n 5 "$OUT/$name.log" | sed 's/^/   | /'
    fi
    NAMES+=("$name")
    RESULTS+=("$status")
    TIMES+=($((SECONDS - start)))
}

if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "error: no CUDA device visible to $PYTHON" >&2
    exit 100
fi
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'on', torch.cuda.get_device_name(0))"

# Synthetic data (seconds): 256 training and 32 validation images of 96 px.
"$PYTHON" -m fgdistill.cli.main synth "$DATA" --train 256 --val 32 --image-size 96 --difficulty 0 \
    >"$OUT/synth.log" 2>&1 || { echo "error: fgdistill synth failed, see $OUT/synth.log" >&2; exit 100; }

COMMON=(--set "data.root=$DATA" --set device=cuda --set amp=true --set data.num_workers=2
        --set eval_interval=0 --set log_interval=50 --no-progress)

step cuda_tests 150 "$PYTHON" -m pytest -o addopts= -q -m cuda tests -p no:cacheprovider

step amp_teacher 90 "$PYTHON" -m fgdistill.cli.main train synth/retinanet_r50_teacher \
    "${COMMON[@]}" --set max_iters=200 --work-dir "$OUT/teacher"

step amp_distill 90 "$PYTHON" -m fgdistill.cli.main distill synth/fgd_retinanet_r50_r18 \
    "${COMMON[@]}" --set max_iters=300 --teacher "$OUT/teacher/model.pt" --work-dir "$OUT/fgd"

step loss_bench 60 "$PYTHON" benchmarks/loss_speed.py --device cuda --repeats 5 --no-compile

step torchrun 60 "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node=1 \
    -m fgdistill.cli.main distill synth/fgd_retinanet_r50_r18 \
    "${COMMON[@]}" --set max_iters=50 --teacher "$OUT/teacher/model.pt" --work-dir "$OUT/fgd_ddp"

echo
echo "== summary ($(date -u +%Y-%m-%dT%H:%M:%SZ))"
for i in "${!NAMES[@]}"; do
    printf '  %-12s %-28s %4ss\n' "${NAMES[$i]}" "${RESULTS[$i]}" "${TIMES[$i]}"
done
for run in teacher fgd fgd_ddp; do
    if [ -f "$OUT/$run/metrics.json" ]; then
        "$PYTHON" - "$OUT/$run/metrics.json" "$run" <<'EOF'
import json, sys
m = json.load(open(sys.argv[1]))
ap = (m.get("metrics") or {}).get("bbox", {}).get("AP")
print(f"  {sys.argv[2]:12s} {m['iterations']} iterations, {m['images_per_s']} images/s, "
      f"bbox AP {ap if ap is None else round(ap, 2)}")
EOF
    fi
done
grep -E "^(mse|fgd|loop) |faster than|compiled FGD" "$OUT/loss_bench.log" 2>/dev/null \
    | sed 's/^/  loss_bench   /'
grep -E "passed|failed|skipped" "$OUT/cuda_tests.log" 2>/dev/null | tail -n 1 | sed 's/^/  cuda_tests   /'
echo "  logs in $OUT/"
exit "$FAILED"
