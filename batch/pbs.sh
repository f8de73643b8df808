#!/bin/bash
# mpilm under PBS (PBS Pro / OpenPBS, Torque): one rank per line of $PBS_NODEFILE (one per GPU
# with mpiprocs = ngpus), started by mpiexec from that file:
#   qsub batch/pbs.sh                                           # from the mpilm checkout
#   qsub -v MPILM_ARGS="--data /path/to/corpus" batch/pbs.sh
# PBS has no --signal=USR1@60: this script sends SIGUSR1 to mpiexec itself MPILM_SIGNAL_BEFORE_S
# (60) seconds before the walltime ends (PBS_WALLTIME, else qstat's Resource_List.walltime), and
# also passes on a SIGUSR1 or SIGTERM sent to the script (qsig -s USR1 JOB); mpiexec hands it to
# every rank, which finish the step, write a checkpoint and exit 75. The script then submits
# itself again with the same MPILM_* settings and run directory, and the new job continues from
# the checkpoint (--resume auto). (A qdel or pre-emption that sends SIGTERM to every process of
# the job ends mpiexec at once: rely on the walltime signal and the periodic checkpoints.)
# Settings: MPILM_* in batch/mpilm-env.sh; MPILM_MPIEXEC must be the mpiexec of the MPI that
# mpi4py uses (Hydra and Open MPI both read -machinefile).
#PBS -N mpilm
#PBS -l select=2:ncpus=32:ngpus=4:mpiprocs=4
#PBS -l walltime=04:00:00
#PBS -j oe
source "${MPILM_ROOT:-$PBS_O_WORKDIR}/batch/mpilm-env.sh" || exit 1
MPILM_SIGNAL_BEFORE_S=${MPILM_SIGNAL_BEFORE_S:-60}
ranks=$(grep -cv '^[[:space:]]*\(#\|$\)' "$PBS_NODEFILE")
echo "mpilm: PBS job $PBS_JOBID: $ranks rank(s) on $(sort -u "$PBS_NODEFILE" | paste -sd, -), out $MPILM_OUT"

# the job's walltime in seconds, or nothing when PBS does not say
walltime_s() {
    local hms=${PBS_WALLTIME:-}
    if [ -z "$hms" ] && command -v qstat >/dev/null; then
        hms=$(qstat -f "$PBS_JOBID" 2>/dev/null | sed -n 's/^ *Resource_List.walltime = //p')
    fi
    [ -n "$hms" ] || return 0
    IFS=: read -r -a parts <<< "$hms"
    local s=0 p
    for p in "${parts[@]}"; do s=$(( s * 60 + 10#$p )); done
    echo "$s"
}

"$MPILM_MPIEXEC" -machinefile "$PBS_NODEFILE" -n "$ranks" "${MPILM_TRAIN[@]}" &
mpiexec_pid=$!
trap 'kill -USR1 "$mpiexec_pid" 2>/dev/null' USR1 TERM
limit=$(walltime_s)
if [ -n "$limit" ] && (( limit > MPILM_SIGNAL_BEFORE_S )); then
    ( sleep $(( limit - MPILM_SIGNAL_BEFORE_S )) && kill -USR1 "$mpiexec_pid" 2>/dev/null ) &
    timer_pid=$!
fi
# SYNC: blocks on mpiexec; a trapped signal interrupts `wait`, so wait again until it has ended
while true; do
    wait "$mpiexec_pid"
    status=$?
    kill -0 "$mpiexec_pid" 2>/dev/null || break
done
[ -n "${timer_pid:-}" ] && kill "$timer_pid" 2>/dev/null

if [ "$status" = "$PREEMPTED_EXIT" ]; then
    # the settings this job was given (exported MPILM_*), and its run directory, for the next one
    settings="MPILM_OUT='$MPILM_OUT'"
    while IFS='=' read -r name value; do
        [ "$name" = MPILM_OUT ] || settings+=",$name='$value'"
    done < <(env | grep '^MPILM_[A-Z_]*=')
    echo "mpilm: pre-empted with a checkpoint in $MPILM_OUT: submitting the next job"
    qsub -v "$settings" "$MPILM_ROOT/batch/pbs.sh" && exit 0
    echo "mpilm: qsub failed: submit batch/pbs.sh again with MPILM_OUT=$MPILM_OUT to continue" >&2
fi
exit "$status"
