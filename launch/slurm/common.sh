# Sourced by the sbatch templates in this directory: what every rank needs, one log per rank, a node-local
# offload directory, and stop-signal forwarding with requeue. Expects to run inside a SLURM batch job.
set -euo pipefail

# sbatch runs a copy of the template from its spool directory: the repository is where the job was
# submitted from, unless SIDE4VIDEO_ROOT says otherwise.
ROOT=${SIDE4VIDEO_ROOT:-$SLURM_SUBMIT_DIR}
cd "$ROOT"
PYTHON=${SIDE4VIDEO_PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=$(command -v python3)
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}

# Rendezvous on the first node. Its NodeAddr, not its name: node names need not resolve.
first_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
node_addr=$(scontrol show node "$first_node" -o | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)
export MASTER_ADDR=${MASTER_ADDR:-${node_addr:-$first_node}}
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}

# One log per rank (appended across requeues) beside the hostfile and environment file of this job.
LOG_DIR=${SIDE4VIDEO_LOG_DIR:-$ROOT/logs/$SLURM_JOB_NAME-$SLURM_JOB_ID}
mkdir -p "$LOG_DIR"

# NVMe parameter offload wants each node's own local disk: the same path on every node, created there.
OFFLOAD_DIR=${SIDE4VIDEO_OFFLOAD_DIR:-${TMPDIR:-/tmp}/side4video-offload-$SLURM_JOB_ID}

echo "$(date '+%F %T') job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST;" \
     "rendezvous $MASTER_ADDR:$MASTER_PORT; rank logs in $LOG_DIR"

# A stop signal to this script (sbatch --signal=B:USR1@SECONDS before the time limit) goes to every rank:
# they checkpoint at the next step boundary and exit with code 3.
trap 'echo "$(date "+%F %T") stop signal: forwarding SIGUSR1 to the ranks"; scancel --signal=USR1 "$SLURM_JOB_ID"' USR1

# run_and_requeue COMMAND...: run it in the background (so the trap fires while it runs) and wait for it;
# exit code 3 (stopped with a checkpoint) requeues the job, which then resumes from that checkpoint.
# The templates give srun --wait=120 rather than --kill-on-bad-exit: ranks that stop with a checkpoint exit
# with 3 a moment apart and must not be killed mid-exit; a rank that crashes takes the others down 120 s
# later at most, when they would otherwise hang in a collective.
run_and_requeue() {
    "$@" &
    local pid=$! status
    while :; do
        wait "$pid" && status=0 || status=$?
        kill -0 "$pid" 2>/dev/null || break  # a trapped signal interrupts wait; the command still runs
    done
    wait "$pid" && status=0 || status=$?
    if [ "$status" -eq 3 ]; then
        echo "$(date '+%F %T') stopped with a checkpoint: requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID"
        exit 0
    fi
    echo "$(date '+%F %T') training exited with status $status"
    exit "$status"
}
