#!/usr/bin/env bash
# make gpu-check: mpilm's GPU path on one GPU machine, in one go, within 8 minutes.
#
#   tools/gpu-check.sh [OUT_DIR]        (default: $OUT if set, else runs/gpu-check)
#   DRY=1 tools/gpu-check.sh [OUT_DIR]  the same stages on the CPU at toy sizes (no GPU needed)
#
# Stages, in this order, each bounded by what is left of the 8 minutes (GPU_CHECK_SECONDS), each
# logged to OUT_DIR/<stage>.txt; a failing stage does not stop the later ones (a lent GPU's minutes
# are scarce: every table that can be had is written), the exit status is 1 if any stage failed:
#   kernels    build the C++ and CUDA kernels (nvcc) into the cache: python -m mpilm.kernels -v
#   train      200 steps of a GPT of the GPT-2 small shape (12 layers, 12 heads, 768 wide, 1024
#              context; 85M parameters with the byte vocabulary) on one GPU in bf16 autocast
#   allreduce  bench allreduce --device cuda at -np 1 and -np 2 (tables, JSON, PNG)
#   tests      tests/gpu at -np 2 (ranks share the GPU), then tests/test_kernels.py's CUDA checks
#   report     bench report of the run, and the figures (tokens/s, MFU, busbw) in figures.txt
# DRY=1 runs exactly these stages with --device cpu, a toy model, few steps and small messages:
# it checks the plumbing (commands, options, files written), never the GPU.
#
# Environment: VENV (default .venv; PYTHON and MPIRUN default to its python and mpirun),
# GPU_CHECK_SECONDS (default 480), DRY.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=${DRY:-0}
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-$VENV/bin/python}
MPIRUN=${MPIRUN:-$VENV/bin/mpirun}
OUT_DIR=${1:-${OUT:-runs/gpu-check}}
BUDGET=${GPU_CHECK_SECONDS:-480}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT_DIR" || exit 1

if [ "$DRY" = 1 ]; then
  DEVICE=cpu
  MODEL=(--n-layer 1 --n-head 2 --n-embd 16 --block-size 16 --batch-size 2)
  STEPS=(--steps 4 --log-every 2 --eval-every 4 --eval-batches 1)
  SIZES=(--min-bytes 4K --max-bytes 64K --factor 16 --iters 2 --warmup 1)
  # a small corpus keeps the dry run off the standard library's tokenization
  CORPUS=(--data "$($PYTHON -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')/argparse.py"
          --cache-dir "$OUT_DIR/cache")
  # without a GPU every module of tests/gpu skips itself, which pytest reports as "no tests ran"
  # (exit 5): the expected outcome here, taken as success; on a GPU machine it is a failure
  ALL_SKIPPED_OK=(bash -c '"$@"; rc=$?; if [ "$rc" = 5 ]; then echo "(no GPU: every test skipped, as a dry run expects)"; exit 0; fi; exit "$rc"' all-skipped-ok)
else
  DEVICE=cuda
  if ! $PYTHON -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "error: no CUDA GPU visible to torch ($PYTHON); make gpu-check DRY=1 runs the plumbing on the CPU" >&2
    exit 2
  fi
  MODEL=(--n-layer 12 --n-head 12 --n-embd 768 --block-size 1024 --batch-size 16 --lr 6e-4)
  STEPS=(--steps 200 --log-every 20 --eval-every 100 --eval-batches 4)
  SIZES=(--min-bytes 4K --max-bytes 256M --factor 4 --iters 20 --warmup 5)
  CORPUS=()
  ALL_SKIPPED_OK=()
fi

STATUS=()   # "stage seconds status" per stage
FAILED=0
left() { echo $((BUDGET - SECONDS)); }

# stage NAME BUDGET_S COMMAND...: run COMMAND under the smaller of its budget and what is left,
# its output shown and kept in OUT_DIR/NAME.txt (appended: a stage may run several commands)
stage() {
  local name=$1 budget=$2; shift 2
  local limit start rc
  limit=$(left)
  [ "$limit" -gt "$budget" ] && limit=$budget
  start=$SECONDS
  if [ "$limit" -le 0 ]; then
    echo "== $name: skipped, the ${BUDGET}s budget is spent" | tee -a "$OUT_DIR/$name.txt"
    rc=124
  else
    echo "== $name (at most ${limit}s): $*" | tee -a "$OUT_DIR/$name.txt"
    timeout --signal=TERM --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$OUT_DIR/$name.txt"
    rc=${PIPESTATUS[0]}
    [ "$rc" = 124 ] && echo "== $name: stopped after ${limit}s" | tee -a "$OUT_DIR/$name.txt"
  fi
  STATUS+=("$name $((SECONDS - start)) $([ "$rc" = 0 ] && echo ok || echo "FAILED (exit $rc)")")
  [ "$rc" = 0 ] || FAILED=1
  return 0
}

: > "$OUT_DIR/kernels.txt"; : > "$OUT_DIR/tests.txt"; : > "$OUT_DIR/allreduce.txt"; : > "$OUT_DIR/train.txt"
: > "$OUT_DIR/report.txt"
echo "== mpilm gpu-check$([ "$DRY" = 1 ] && echo ' (DRY: CPU plumbing at toy sizes)') -> $OUT_DIR, budget ${BUDGET}s"

stage kernels 150 $PYTHON -m mpilm.kernels -v

# the figures first: if a slow stage spends the budget, the tests are what is cut short
stage train 150 $PYTHON -m mpilm.train --device $DEVICE "${MODEL[@]}" "${STEPS[@]}" "${CORPUS[@]}" \
  --out "$OUT_DIR/train"

for n in 1 2; do
  stage allreduce 60 $MPIRUN -np $n $PYTHON -m mpilm.bench allreduce --device $DEVICE \
    --algorithms ring,rhd,tree,mpi,auto "${SIZES[@]}" \
    --json "$OUT_DIR/allreduce-np$n.json" --plot "$OUT_DIR/allreduce-np$n.png"
done

stage tests 120 "${ALL_SKIPPED_OK[@]}" $MPIRUN -np 2 $PYTHON -m pytest -q -p no:cacheprovider --with-mpi -m mpi tests/gpu
stage tests 45 $PYTHON -m pytest -q -p no:cacheprovider tests/test_kernels.py -k cuda

stage report 30 $PYTHON -m mpilm.bench report "$OUT_DIR/train" --json "$OUT_DIR/report.json" \
  --plot "$OUT_DIR/report.png"
stage report 15 $PYTHON - "$OUT_DIR" <<'EOF'
"""The figures the README quotes: the training run's throughput and MFU, busbw at the largest size."""
import json
import sys
from pathlib import Path

out = Path(sys.argv[1])
lines = []
summary = json.loads((out / "train" / "summary.json").read_text())
mfu = "-" if summary["mfu"] is None else f"{summary['mfu']:.1%}"
lines.append(f"train: {summary['tokens_per_s']:,.0f} tok/s | MFU {mfu} | {summary['step_s_mean'] * 1e3:.1f} ms/step | "
             f"val loss {summary['initial_val_loss']:.3f} -> {summary['final_val_loss']:.3f} after {summary['steps']} steps")
for n in (1, 2):
    rows = json.loads((out / f"allreduce-np{n}.json").read_text())
    for size in sorted({min(r["size_bytes"] for r in rows), max(r["size_bytes"] for r in rows)}):
        at = [r for r in rows if r["size_bytes"] == size]
        if n == 1:  # nothing moves: the time is the call's overhead, and busbw has no meaning
            figures = ", ".join(f"{r['algorithm']} {r['time_us']:.1f} us" for r in at)
        else:
            figures = ", ".join(f"{r['algorithm']} {r['busbw_gbps']:.2f} GB/s busbw ({r['time_us']:.0f} us)" for r in at)
        lines.append(f"allreduce np {n} at {size / 2**10:g} KiB: {figures}")
(out / "figures.txt").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF

echo "== gpu-check: $SECONDS s of ${BUDGET}s -> $OUT_DIR" | tee "$OUT_DIR/stages.txt"
printf '%-10s %8s  %s\n' stage seconds status | tee -a "$OUT_DIR/stages.txt"
for row in "${STATUS[@]}"; do
  set -- $row
  printf '%-10s %8s  %s\n' "$1" "$2" "${*:3}" | tee -a "$OUT_DIR/stages.txt"
done
exit $FAILED
