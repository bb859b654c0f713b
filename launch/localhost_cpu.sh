#!/usr/bin/env bash
# N processes x D fake CPU devices on this machine, talking over gloo: the multi-host code path without a cluster.
#
#   launch/localhost_cpu.sh N D TRAIN_FLAGS...
#   e.g. launch/localhost_cpu.sh 2 2 --config=configs/scan.py:shapes_tiny --workdir=runs/scan_2x2 --config.max_steps=20
#
# Every process runs `python -m $MODULE TRAIN_FLAGS --coordinator=localhost:PORT --num_processes=N
# --process_id=i` with JAX_PLATFORMS=cpu, XLA_FLAGS=--xla_force_host_platform_device_count=D and
# XMATCH_CPU_COLLECTIVES=gloo; N = 1 runs one process without a coordinator. Each prints the device topology first.
# Process 0 prints here; process i > 0 writes $LOG_DIR/process_i.log (default: a new temporary directory).
# $PYTHON is the interpreter (default python), $PORT the coordinator's port (default: a free one), $MODULE the
# entry point (default xmatch_jax.train; MODULE=xmatch_jax.evaluate scores a split split over the processes, e.g.
# MODULE=xmatch_jax.evaluate launch/localhost_cpu.sh 2 2 --workdir=W). Installs nothing. When a process fails, the others are stopped and the script exits with its status.
set -euo pipefail

if [[ $# -lt 2 || ! $1 =~ ^[1-9][0-9]*$ || ! $2 =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 NUM_PROCESSES DEVICES_PER_PROCESS TRAIN_FLAGS... (e.g. $0 2 2 --config=configs/scan.py:shapes_tiny --workdir=W)" >&2
  exit 2
fi
N=$1
D=$2
shift 2
PYTHON=${PYTHON:-python}
MODULE=${MODULE:-xmatch_jax.train}
PORT=${PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')}
LOG_DIR=${LOG_DIR:-$(mktemp -d)}
mkdir -p "$LOG_DIR"
export JAX_PLATFORMS=cpu
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$D"
export XMATCH_CPU_COLLECTIVES=gloo

if [[ $N == 1 ]]; then
  echo "localhost_cpu: 1 process x $D CPU device(s)"
  exec "$PYTHON" -m "$MODULE" "$@"
fi
echo "localhost_cpu: $N processes x $D CPU device(s), coordinator localhost:$PORT, logs of processes 1-$((N - 1)) in $LOG_DIR"

pids=()
stop_all() {  # TERM, then KILL: jax catches SIGTERM (preemption notice), and a process stuck in a collective stays
  local pid alive=0
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null && alive=1; done
  ((alive)) || return 0
  sleep 2
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
}
trap stop_all EXIT INT TERM
for ((i = 0; i < N; i++)); do
  args=("$@" "--coordinator=localhost:$PORT" "--num_processes=$N" "--process_id=$i")
  if ((i == 0)); then
    "$PYTHON" -m "$MODULE" "${args[@]}" &
  else
    "$PYTHON" -m "$MODULE" "${args[@]}" >"$LOG_DIR/process_$i.log" 2>&1 &
  fi
  pids+=($!)
done

# Wait for all; the first failure stops the others (they would wait for it in a collective).
running=$N
status=0
while ((running > 0)); do
  for i in "${!pids[@]}"; do
    pid=${pids[$i]}
    [[ $pid == done ]] && continue
    kill -0 "$pid" 2>/dev/null && continue
    code=0
    wait "$pid" || code=$?
    pids[$i]=done
    running=$((running - 1))
    if ((code != 0 && status == 0)); then
      status=$code
      echo "localhost_cpu: process $i failed (exit $code)" >&2
      ((i > 0)) && tail -n 30 "$LOG_DIR/process_$i.log" >&2
      stop_all
    fi
  done
  ((running > 0)) && sleep 0.5
done
trap - EXIT INT TERM
exit $status
