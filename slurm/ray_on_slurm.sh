# shellcheck shell=bash
# Ray on a Slurm allocation: sourced by slurm/train_*.sh (not run on its own).
#
#   ray_cluster_up      head on the first node, workers on the others (each a `ray start --block` job
#                       step), then waits until every node has joined; sets RAY_ADDRESS
#   on_head CMD...      runs CMD on the head node, in the container when CONTAINER_IMAGE is set
#   ray_cluster_down    TERMs the job steps started above (only those: `ray start --block` stops its
#                       own Ray processes on TERM) and waits for them; installed as the EXIT trap
#
# Environment (defaults in brackets): CONTAINER_IMAGE [none: the host's python3], CONTAINER_MOUNTS
# [REPO_DIR], REPO_DIR [SLURM_SUBMIT_DIR], RAY_PORT [6379], RAY_DASHBOARD_PORT [8265],
# RAY_CLIENT_PORT [10001], RAY_NUM_CPUS [SLURM_CPUS_ON_NODE], RAY_NUM_GPUS [SLURM_GPUS_ON_NODE or 0],
# RAY_TMPDIR [/tmp/ray-$SLURM_JOB_ID], RAY_START_TIMEOUT [600 s].

REPO_DIR=${REPO_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}
RAY_PORT=${RAY_PORT:-6379}
RAY_DASHBOARD_PORT=${RAY_DASHBOARD_PORT:-8265}
RAY_CLIENT_PORT=${RAY_CLIENT_PORT:-10001}
RAY_TMPDIR=${RAY_TMPDIR:-/tmp/ray-${SLURM_JOB_ID:-0}}
RAY_START_TIMEOUT=${RAY_START_TIMEOUT:-600}
STARTED_STEPS=()

container_args() {
  if [[ -n "${CONTAINER_IMAGE:-}" ]]; then  # pyxis/enroot
    printf '%s\n' "--container-image=${CONTAINER_IMAGE}" "--container-mounts=${CONTAINER_MOUNTS:-$REPO_DIR:$REPO_DIR}" \
      "--container-workdir=${REPO_DIR}"
  fi
}

ray_nodes() {  # the allocation's node names, one per line, head first
  scontrol show hostnames "${SLURM_JOB_NODELIST}"
}

head_ip() {  # the head node's first address, as its own `hostname -I` reports it
  srun --overlap --nodes=1 --ntasks=1 -w "$1" hostname -I | awk '{print $1}'
}

ray_start_args() {
  printf '%s\n' --block --disable-usage-stats "--temp-dir=${RAY_TMPDIR}" \
    "--num-cpus=${RAY_NUM_CPUS:-${SLURM_CPUS_ON_NODE:-1}}" "--num-gpus=${RAY_NUM_GPUS:-${SLURM_GPUS_ON_NODE:-0}}"
}

ray_cluster_up() {
  local nodes head ip
  mapfile -t nodes < <(ray_nodes)
  head=${nodes[0]}
  ip=$(head_ip "$head")
  RAY_ADDRESS="${ip}:${RAY_PORT}"
  export RAY_ADDRESS
  local container start
  mapfile -t container < <(container_args)
  mapfile -t start < <(ray_start_args)
  echo "ray: head ${head} at ${RAY_ADDRESS}, ${#nodes[@]} node(s): ${nodes[*]}"
  srun --overlap --nodes=1 --ntasks=1 -w "$head" "${container[@]}" \
    ray start --head "--node-ip-address=${ip}" "--port=${RAY_PORT}" --include-dashboard=false \
    "--dashboard-port=${RAY_DASHBOARD_PORT}" "--ray-client-server-port=${RAY_CLIENT_PORT}" "${start[@]}" &
  STARTED_STEPS+=("$!")
  if (( ${#nodes[@]} > 1 )); then
    srun --overlap --nodes=$(( ${#nodes[@]} - 1 )) --ntasks=$(( ${#nodes[@]} - 1 )) --ntasks-per-node=1 \
      --exclude="$head" "${container[@]}" ray start "--address=${RAY_ADDRESS}" "${start[@]}" &
    STARTED_STEPS+=("$!")
  fi
  on_head python3 -m megatron_guided.launch.wait_for_ray --address "${RAY_ADDRESS}" --nodes "${#nodes[@]}" \
    --timeout "${RAY_START_TIMEOUT}"
}

on_head() {
  local container
  mapfile -t container < <(container_args)
  srun --overlap --nodes=1 --ntasks=1 -w "$(ray_nodes | head -n 1)" "${container[@]}" \
    --chdir="${REPO_DIR}" --export=ALL "$@"
}

ray_cluster_down() {
  local pid
  for pid in "${STARTED_STEPS[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in "${STARTED_STEPS[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  STARTED_STEPS=()
  echo "ray: stopped"
}

train_on_ray() {  # train_on_ray DEFAULT_CONFIG: Ray up, `python -m megatron_guided.train` on the head, Ray down
  CONFIG=${CONFIG:-$1}
  local args=("config=${CONFIG}" "cluster.nodes=${SLURM_JOB_NUM_NODES}") extra
  [[ -n "${MODEL_PATH:-}" ]] && args+=("worker.actor.model.model_path=${MODEL_PATH}")
  [[ -n "${VERIFIER_PATH:-}" ]] && args+=("worker.rollout.verifier.model_path=${VERIFIER_PATH}")
  [[ -n "${DATA_DIR:-}" ]] && args+=("data.train_files=${DATA_DIR}/train.jsonl" "data.val_files=${DATA_DIR}/test.jsonl")
  [[ -n "${CKPT_DIR:-}" ]] && args+=("trainer.save_checkpoint_path=${CKPT_DIR}")
  read -r -a extra <<< "${TRAIN_ARGS:-}"
  args+=("${extra[@]}")
  trap ray_cluster_down EXIT
  ray_cluster_up
  echo "train: ${args[*]}"
  on_head python3 -m megatron_guided.train "${args[@]}" "cluster.ray_address=${RAY_ADDRESS}"
  echo "train: done"
}
