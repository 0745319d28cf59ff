# Shared tail of the sbatch scripts (sourced from the repository root): run the launcher with a
# stop file for SIGUSR1, keep the job's output in the run directory, requeue a clean stop up to
# a cap. Not a script of its own.
#
# lanton_run DESCRIPTION -- OVERRIDES...   (needs LAUNCH (array), OUT_DIR, JOB_ID; exits)
#
# * Output: after one line in Slurm's --output file naming it, everything the job prints (this
#   script, srun, torchrun, the trainers) is appended to $OUT_DIR/slurm-$JOB_ID.out, one file
#   per job id across its requeues, next to metrics.jsonl and the checkpoints.
# * Requeue cap: a job restarted more than LANTON_MAX_REQUEUES times (default 20; Slurm's
#   SLURM_RESTART_COUNT counts requeues, by this script or by pre-emption) does not start, and
#   a clean stop at the cap is not requeued: one line says so and the job exits with status 4.
#   Resubmitting (a new job id) resumes from the latest checkpoint with the count at 0.
# * Requeue rule: only a clean stop on request (exit 0 after SIGUSR1) is requeued; a completed
#   run, a config error (2), a divergence (3) or a crash is not.

LANTON_MAX_REQUEUES=${LANTON_MAX_REQUEUES:-20}
LANTON_REQUEUE_CAP_EXIT=4

lanton_run() {
    local description=$1
    shift
    [[ "${1:-}" == "--" ]] && shift
    local log="$OUT_DIR/slurm-$JOB_ID.out"
    local restarts=${SLURM_RESTART_COUNT:-0}
    if ! [[ "$LANTON_MAX_REQUEUES" =~ ^[0-9]+$ ]]; then
        echo "LANTON_MAX_REQUEUES must be a whole number, got '$LANTON_MAX_REQUEUES'" >&2
        exit 2
    fi
    echo "$(date -Is) job $JOB_ID restart $restarts: output continues in $log"
    exec >>"$log" 2>&1
    if (( restarts > LANTON_MAX_REQUEUES )); then
        echo "$(date -Is) job $JOB_ID: restart $restarts is past the cap LANTON_MAX_REQUEUES=$LANTON_MAX_REQUEUES: not starting (resubmit to resume from the latest checkpoint)" >&2
        exit "$LANTON_REQUEUE_CAP_EXIT"
    fi
    export LANTON_STOP_FILE="$OUT_DIR/.stop-$JOB_ID"
    rm -f "$LANTON_STOP_FILE"
    # Time limit near (--signal=B:USR1@600) or `scancel --batch --signal=USR1 JOB`: ask the training
    # processes to checkpoint and exit; the job is then requeued below. (Slurm pre-emption with
    # PreemptMode=REQUEUE requeues the job by itself because of --requeue; its SIGTERM also makes
    # the training processes checkpoint at the end of the step when GraceTime allows.)
    trap 'echo "$(date -Is) USR1: requesting checkpoint + exit"; touch "$LANTON_STOP_FILE"' USR1

    echo "$(date -Is) job $JOB_ID restart $restarts of at most $LANTON_MAX_REQUEUES: $description, out_dir $OUT_DIR"
    "${LAUNCH[@]}" -- "$@" &
    local pid=$! rc=0
    while true; do
        set +e
        wait "$pid"
        rc=$?
        set -e
        # wait returns early when a trapped signal arrives; keep waiting while the step runs
        if kill -0 "$pid" 2>/dev/null; then continue; fi
        break
    done

    if [[ -f "$OUT_DIR/COMPLETED" ]]; then
        echo "$(date -Is) training completed"
        rm -f "$LANTON_STOP_FILE"
        exit 0
    fi
    if [[ -f "$LANTON_STOP_FILE" && "$rc" -eq 0 ]]; then
        rm -f "$LANTON_STOP_FILE"
        if [[ -z "${SLURM_JOB_ID:-}" ]]; then
            echo "$(date -Is) stopped on request (exit $rc); rerun this script to resume"
            exit 0
        fi
        if (( restarts >= LANTON_MAX_REQUEUES )); then
            echo "$(date -Is) stopped on request; requeue cap reached ($restarts restarts, LANTON_MAX_REQUEUES=$LANTON_MAX_REQUEUES): not requeued, resubmit to resume from the latest checkpoint" >&2
            exit "$LANTON_REQUEUE_CAP_EXIT"
        fi
        echo "$(date -Is) stopped on request (exit $rc); requeueing job $SLURM_JOB_ID to resume from the latest checkpoint"
        scontrol requeue "$SLURM_JOB_ID"
        exit 0
    fi
    rm -f "$LANTON_STOP_FILE"
    echo "$(date -Is) training exited with status $rc before completing (not requeued)" >&2
    exit "$rc"
}
