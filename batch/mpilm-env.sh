# Sourced by mpilm's batch scripts (bash): where mpilm and its Python are, the training command
# line, the launch, and what to do after a pre-emption. Each MPILM_* value may be set in the
# environment at submission (sbatch passes the submitting environment on; qsub needs -V or -v);
# the defaults are a production run.
#   MPILM_ROOT        the mpilm checkout (default: the directory the job was submitted from)
#   MPILM_VENV        its virtual environment (default: $MPILM_ROOT/.venv)
#   MPILM_PYTHON      the Python that runs mpilm (default: $MPILM_VENV/bin/python)
#   MPILM_MPIEXEC     the mpiexec of the MPI that mpi4py was built against (default: the venv's,
#                     MPICH's Hydra from the mpich wheel; a site MPI brings its own)
#   MPILM_LAUNCH      srun (direct launch: srun --mpi=$MPILM_SRUN_MPI) or mpiexec (MPILM_MPIEXEC
#                     inside the allocation; Hydra and Open MPI read the nodes from Slurm)
#   MPILM_SRUN_MPI    the PMI srun offers the ranks: pmi2 (default; MPICH, Intel MPI) or pmix
#                     (Open MPI); `srun --mpi=list` shows what this Slurm has
#   MPILM_MODEL       model options (default: GPT-2 small, 124M parameters)
#   MPILM_BATCH_SIZE  sequences per rank per micro-step (default 8)
#   MPILM_STEPS       optimizer steps (default 5000)
#   MPILM_CKPT_EVERY  a checkpoint every N steps (default 500); a pre-emption signal writes one too
#   MPILM_OUT         the run directory (default: runs/<job name>-<job id>, unchanged by a requeue,
#                     so --resume auto finds the checkpoints of the previous attempt)
#   MPILM_ARGS        anything else for python -m mpilm.train (--data DIR, --allreduce ring, ...)

MPILM_ROOT=${MPILM_ROOT:-${SLURM_SUBMIT_DIR:-${PBS_O_WORKDIR:-$PWD}}}
MPILM_VENV=${MPILM_VENV:-$MPILM_ROOT/.venv}
MPILM_PYTHON=${MPILM_PYTHON:-$MPILM_VENV/bin/python}
MPILM_MPIEXEC=${MPILM_MPIEXEC:-$MPILM_VENV/bin/mpiexec}
MPILM_LAUNCH=${MPILM_LAUNCH:-srun}
MPILM_SRUN_MPI=${MPILM_SRUN_MPI:-pmi2}
MPILM_MODEL=${MPILM_MODEL:---model gpt --n-layer 12 --n-head 12 --n-embd 768 --block-size 1024}
MPILM_BATCH_SIZE=${MPILM_BATCH_SIZE:-8}
MPILM_STEPS=${MPILM_STEPS:-5000}
MPILM_CKPT_EVERY=${MPILM_CKPT_EVERY:-500}
MPILM_JOB_NAME=${SLURM_JOB_NAME:-${PBS_JOBNAME:-mpilm}}
MPILM_OUT=${MPILM_OUT:-$MPILM_ROOT/runs/${MPILM_JOB_NAME%.*}-${SLURM_JOB_ID:-${PBS_JOBID%%.*}}}
MPILM_ARGS=${MPILM_ARGS:-}
PREEMPTED_EXIT=75  # mpilm.train's status after a pre-emption checkpoint (mpilm/train.py)

cd "$MPILM_ROOT" || exit 1
# srun does not inherit sbatch's --cpus-per-task (Slurm >= 22.05); mpilm reads it for its threads
[ -n "${SLURM_CPUS_PER_TASK:-}" ] && export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK

# The training command, one array; MPILM_MODEL and MPILM_ARGS split into words on purpose.
# shellcheck disable=SC2206
MPILM_TRAIN=("$MPILM_PYTHON" -m mpilm.train $MPILM_MODEL --batch-size "$MPILM_BATCH_SIZE" --steps "$MPILM_STEPS"
             --ckpt-every "$MPILM_CKPT_EVERY" --resume auto --out "$MPILM_OUT" $MPILM_ARGS)

# mpilm_slurm_launch: one rank per Slurm task, started by srun itself or by mpiexec; returns the
# job's exit status. srun's tasks get --signal=USR1@T straight from Slurm; in the mpiexec form
# Slurm signals the processes of the step Hydra started its proxies in, and they pass it on.
mpilm_slurm_launch() {
    echo "mpilm: job ${SLURM_JOB_ID} attempt $((${SLURM_RESTART_COUNT:-0} + 1)): ${SLURM_NTASKS} rank(s) on" \
         "${SLURM_JOB_NUM_NODES} node(s) ($SLURM_JOB_NODELIST), launch $MPILM_LAUNCH, out $MPILM_OUT"
    case "$MPILM_LAUNCH" in
        srun) srun --mpi="$MPILM_SRUN_MPI" --kill-on-bad-exit=1 "${MPILM_TRAIN[@]}" ;;
        mpiexec) "$MPILM_MPIEXEC" -n "$SLURM_NTASKS" "${MPILM_TRAIN[@]}" ;;
        *) echo "error: MPILM_LAUNCH=$MPILM_LAUNCH: expected srun or mpiexec" >&2; return 2 ;;
    esac
}

# mpilm_slurm_finish STATUS: a pre-empted run (75: checkpoint written) goes back in the queue under
# the same job id, and the next attempt continues from its checkpoint (--resume auto); any other
# status is the job's.
mpilm_slurm_finish() {
    if [ "$1" = "$PREEMPTED_EXIT" ]; then
        echo "mpilm: pre-empted with a checkpoint in $MPILM_OUT: requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID" && exit 0
        echo "mpilm: scontrol requeue failed: resubmit this script with MPILM_OUT=$MPILM_OUT to continue" >&2
    fi
    exit "$1"
}
