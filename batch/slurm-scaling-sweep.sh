#!/bin/bash
# Weak and strong scaling sweeps of mpilm under Slurm, one table and PNG each. Run it where you
# run sbatch (a login node), from the mpilm checkout:
#   batch/slurm-scaling-sweep.sh                                        # 1, 2, 4, 8 ranks
#   MPILM_SWEEP_RANKS="4 8 16 32" MPILM_SWEEP_SBATCH="--partition=gpu" batch/slurm-scaling-sweep.sh
# It submits batch/slurm-multi-node.sbatch once per kind and rank count, one rank per GPU
# (MPILM_GPUS_PER_NODE a node, so 8 ranks at 4 a node are 2 nodes):
#   weak    every rank keeps MPILM_BATCH_SIZE sequences a step: the global batch grows with N
#   strong  the global batch stays MPILM_BATCH_SIZE x the largest N: N ranks accumulate gradients
#           over (largest N / N) micro-steps (--grad-accum), so memory per GPU does not change
# At the largest N both kinds are the same run, submitted once. Then a report job, started when
# they have all ended (--dependency=afterany), runs `python -m mpilm.bench report` on each kind:
# its tables are in $MPILM_SWEEP_DIR/report.out, with {weak,strong}-report.{json,png} beside it.
# Prints one line per job submitted; the last line is the report job's id alone.
# Settings (environment): MPILM_SWEEP_RANKS (powers of two: "1 2 4 8"), MPILM_GPUS_PER_NODE (4),
# MPILM_SWEEP_DIR (runs/sweep-<date-time>), MPILM_SWEEP_SBATCH (more sbatch options for every job:
# --partition, --account, --time, --cpus-per-task), and the MPILM_* of batch/mpilm-env.sh; the
# sweep's own defaults are MPILM_STEPS=300 and MPILM_CKPT_EVERY=0 (a pre-emption still writes one).
set -euo pipefail
MPILM_ROOT=${MPILM_ROOT:-$PWD}
cd "$MPILM_ROOT"
MPILM_PYTHON=${MPILM_PYTHON:-${MPILM_VENV:-$MPILM_ROOT/.venv}/bin/python}
RANKS=${MPILM_SWEEP_RANKS:-1 2 4 8}
GPUS_PER_NODE=${MPILM_GPUS_PER_NODE:-4}
SWEEP=${MPILM_SWEEP_DIR:-$MPILM_ROOT/runs/sweep-$(date +%Y%m%d-%H%M%S)}
read -r -a EXTRA <<< "${MPILM_SWEEP_SBATCH:-}"
export MPILM_ROOT MPILM_PYTHON MPILM_STEPS=${MPILM_STEPS:-300} MPILM_CKPT_EVERY=${MPILM_CKPT_EVERY:-0}
BASE_ARGS=${MPILM_ARGS:-}

largest=0
for n in $RANKS; do
    if ! [[ $n =~ ^[1-9][0-9]*$ ]]; then echo "error: MPILM_SWEEP_RANKS: $n is not a rank count" >&2; exit 2; fi
    (( n > largest )) && largest=$n
done
for n in $RANKS; do
    if (( largest % n )); then
        echo "error: MPILM_SWEEP_RANKS: strong scaling keeps the global batch of $largest ranks; $n does not divide it" >&2
        exit 2
    fi
done
mkdir -p "$SWEEP/logs"

# submit KIND N ACCUM: one training job; prints its id
submit() {
    local kind=$1 n=$2 accum=$3
    local per_node=$(( n < GPUS_PER_NODE ? n : GPUS_PER_NODE ))
    local nodes=$(( (n + GPUS_PER_NODE - 1) / GPUS_PER_NODE ))
    MPILM_OUT="$SWEEP/$kind/n$n" MPILM_ARGS="$BASE_ARGS --grad-accum $accum" \
        sbatch --parsable --job-name="mpilm-$kind-n$n" --output="$SWEEP/logs/%x-%j.out" \
        --nodes="$nodes" --ntasks="$n" --ntasks-per-node="$per_node" --gpus-per-node="$per_node" \
        "${EXTRA[@]}" batch/slurm-multi-node.sbatch | cut -d';' -f1
}

jobs=() weak_dirs=() strong_dirs=()
for n in $RANKS; do
    id=$(submit weak "$n" 1)
    jobs+=("$id") weak_dirs+=("$SWEEP/weak/n$n")
    echo "weak   n=$n: job $id -> $SWEEP/weak/n$n"
    if (( n == largest )); then
        strong_dirs+=("$SWEEP/weak/n$n")  # the same configuration: one run serves both sweeps
        continue
    fi
    id=$(submit strong "$n" $(( largest / n )))
    jobs+=("$id") strong_dirs+=("$SWEEP/strong/n$n")
    echo "strong n=$n: job $id -> $SWEEP/strong/n$n"
done

report() {  # report KIND DIRS...: the bench report command line for one sweep, quoted for sh
    local kind=$1; shift
    printf '%q ' "$MPILM_PYTHON" -m mpilm.bench report "$@" --json "$SWEEP/$kind-report.json" --plot "$SWEEP/$kind-report.png"
}
wrap="echo '== weak scaling'; $(report weak "${weak_dirs[@]}"); weak=\$?; echo '== strong scaling'; "
wrap+="$(report strong "${strong_dirs[@]}"); strong=\$?; exit \$(( weak || strong ))"
deps=$(IFS=:; echo "${jobs[*]}")
id=$(sbatch --parsable --job-name=mpilm-sweep-report --output="$SWEEP/report.out" --ntasks=1 \
    --dependency="afterany:$deps" "${EXTRA[@]}" --wrap="$wrap" | cut -d';' -f1)
echo "report: job $id -> $SWEEP/report.out (after jobs ${jobs[*]})"
echo "$id"
