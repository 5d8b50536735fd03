# Sourced by the sbatch scripts here: rendezvous from the SLURM environment, optional pyxis
# container, and `salm_srun`, which starts one task per GPU (or per CPU slot) and requeues the job
# when training stopped on the time-limit signal after a checkpoint.
#
# Settings (environment variables, all optional):
#   SALM            how to start the CLI (default: salm; e.g. "python -m salm_megatron.cli")
#   SALM_CONTAINER_IMAGE, SALM_CONTAINER_MOUNTS   pyxis --container-image / --container-mounts
#   MASTER_PORT     rendezvous port (default: 20000 + job id % 20000)

set -uo pipefail

# Rank 0 runs on the first host of the allocation.
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export MASTER_ADDR MASTER_PORT
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# One hardware queue per GPU: kernels launch in issue order, so Megatron's TP/SP communication
# overlaps the GEMM it was issued beside instead of queueing behind it.
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
read -r -a SALM_COMMAND <<< "${SALM:-salm}"  # words: "python -m salm_megatron.cli" works

CONTAINER_ARGS=()
if [ -n "${SALM_CONTAINER_IMAGE:-}" ]; then
  CONTAINER_ARGS+=(--container-image="$SALM_CONTAINER_IMAGE")
  [ -n "${SALM_CONTAINER_MOUNTS:-}" ] && CONTAINER_ARGS+=(--container-mounts="$SALM_CONTAINER_MOUNTS")
fi

echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $SLURM_NTASKS tasks on" \
  "$SLURM_JOB_NUM_NODES node(s), rendezvous $MASTER_ADDR:$MASTER_PORT"

# SIGUSR1 to the batch shell (#SBATCH --signal=B:USR1@SECONDS, or scancel --batch -s USR1):
# passed on to every task through srun; training saves a checkpoint and exits with 75.
STOP_SIGNALED=0
SRUN_PID=
_salm_forward_stop() {
  STOP_SIGNALED=1
  echo "SIGUSR1: asking the tasks to save a checkpoint and stop"
  [ -n "$SRUN_PID" ] && kill -USR1 "$SRUN_PID"
}
trap _salm_forward_stop USR1

# salm_srun SUBCOMMAND ARGS...: `salm SUBCOMMAND ARGS` in every task, each with its rank.
salm_srun() {
  # shellcheck disable=SC2016  # expanded in each task, not here
  srun --kill-on-bad-exit=1 "${CONTAINER_ARGS[@]}" bash -c \
    'export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID; exec "$@"' \
    salm-task "${SALM_COMMAND[@]}" "$@" &
  SRUN_PID=$!
  local status
  wait "$SRUN_PID"
  status=$?
  while kill -0 "$SRUN_PID" 2>/dev/null; do  # a trapped signal interrupted `wait`
    wait "$SRUN_PID"
    status=$?
  done
  SRUN_PID=
  # After the signal the tasks exit with 75 once the checkpoint is written; srun's status may
  # still differ (--kill-on-bad-exit ends the slower tasks when the first one exits). Any
  # unfinished run requeues: it resumes from the newest complete checkpoint.
  if [ "$STOP_SIGNALED" -eq 1 ] && [ "$status" -ne 0 ]; then
    echo "srun ended with $status after SIGUSR1; requeueing job $SLURM_JOB_ID to resume"
    scontrol requeue "$SLURM_JOB_ID"
  fi
  return "$status"
}
