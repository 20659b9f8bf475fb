# The body of examples/run_prism_8b.sh and run_prism_4b.sh (sourced by them, never run alone).
# Stages, in order:  convert (HF -> megatron)  sft  warmup  align  rlvr  export (megatron -> HF)  eval
# Each is skipped when its output is complete, so a requeued job continues where it stopped:
#   convert: <out>/init/prism_checkpoint.json     sft..eval: <out>/run/<stage>/result.json
#   export:  <out>/hf_final/.prism_export_complete   benchmarks: <out>/benchmarks/eval_report.json
# An interrupted training stage resumes from <out>/run/<stage>/checkpoints/latest (prism run does it).
#
# Preemption: sbatch's --signal=B:USR1@N reaches this shell; the trap touches $PRISM_STOP_FILE, the
# trainer (megatron_prism.training.preemption) checkpoints after its current step and exits, and this
# script requeues the job (scontrol requeue). `scontrol requeue` from outside also works: the stage
# restarts from its last complete checkpoint.

usage() {
  cat <<EOF
usage: sbatch $RECIPE_NAME [--stage NAME]      (on a login node: bash $RECIPE_NAME --dry-run)
  --dry-run      print every command with resolved paths and the planned layout; needs no Slurm or GPU
  --stage NAME   run only NAME (one of: $ALL_STAGES); the stages before it must be complete
Environment (required):
  PRISM_POLICY_HF_DIR  Hugging Face Qwen3-VL directory of the policy (e.g. Qwen3-VL-8B-Instruct)
  PRISM_DISC_HF_DIR    the discriminator's base Qwen3-VL (PRISM: Qwen3-VL-2B-Instruct); only if warmup/align run
  PRISM_DATA_ROOT      data directory with sft/, align/, rl/, eval/ record splits
  PRISM_OUTPUT_DIR     where everything is written (shared filesystem)
  PRISM_VENV or PRISM_CONTAINER   a virtualenv to activate, or a container image for srun --container-image
Environment (optional):
  PRISM_CONFIG ($PRISM_CONFIG)   PRISM_OVERRIDES (dotted key=value, space-separated)
  PRISM_GPUS_PER_NODE (8: processes per node)   PRISM_GPU_MEM (80 GiB, for the planner)
  PRISM_RL_ALGO (grpo | dapo | gspo)   PRISM_STAGES (default: all, "$ALL_STAGES")
  PRISM_BENCHMARKS ("mathvista=/data/MathVista mmmu=/data/MMMU ...")  PRISM_EVAL_K (8)  PRISM_EVAL_TEMPERATURE (1.0)
  PRISM_REPO (the checkout; default: the directory sbatch was run from)  MASTER_PORT (from the job id)
  NCCL_* (the site's NCCL settings, e.g. NCCL_SOCKET_IFNAME, NCCL_IB_HCA): exported ones reach every rank
Container: PRISM_CONTAINER is an image with the package's GPU environment (docker/Dockerfile); the model
  dirs, data, output dir and repo are mounted at the same paths.
EOF
}

ALL_STAGES="convert sft warmup align rlvr export eval"
DRY_RUN=0
ONLY_STAGE=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1; shift ;;
    --stage) ONLY_STAGE="${2:?--stage needs a name: $ALL_STAGES}"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "error: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
  esac
done
if [[ -n "$ONLY_STAGE" && " $ALL_STAGES " != *" $ONLY_STAGE "* ]]; then
  echo "error: --stage $ONLY_STAGE: not a stage; choose one of: $ALL_STAGES" >&2; exit 2
fi

need() {  # need VAR "what it is": a clear error when a required variable is unset
  if [[ -z "${!1:-}" ]]; then
    echo "error: $1 is not set: $2. Export it before sbatch (see: bash $RECIPE_NAME --help)." >&2; exit 2
  fi
}
need_path() {  # need_path VAR: set, and the path exists (only warned about in --dry-run)
  need "$1" "$2"
  if [[ ! -e "${!1}" ]]; then
    if [[ $DRY_RUN == 1 ]]; then echo "warning: $1=${!1} does not exist (yet)" >&2
    else echo "error: $1=${!1} does not exist: $2" >&2; exit 2; fi
  fi
}

PRISM_STAGES="${PRISM_STAGES:-$ALL_STAGES}"
want() { [[ " $PRISM_STAGES " == *" $1 "* ]]; }
need_path PRISM_POLICY_HF_DIR "the policy's Hugging Face Qwen3-VL directory"
need_path PRISM_DATA_ROOT "the data directory (sft/, align/, rl/, eval/)"
need PRISM_OUTPUT_DIR "the output directory"
if want warmup || want align; then need_path PRISM_DISC_HF_DIR "the discriminator's base Qwen3-VL directory"; fi
if [[ -z "${PRISM_VENV:-}" && -z "${PRISM_CONTAINER:-}" ]]; then
  echo "error: set PRISM_VENV (a virtualenv with megatron_prism installed) or PRISM_CONTAINER (an image for srun --container-image)" >&2
  exit 2
fi
[[ -f "$PRISM_CONFIG" ]] || { echo "error: PRISM_CONFIG=$PRISM_CONFIG does not exist" >&2; exit 2; }

OUT="$PRISM_OUTPUT_DIR"
RUN_DIR="$OUT/run"
GPN="${PRISM_GPUS_PER_NODE:-8}"
NNODES="${SLURM_NNODES:-${PRISM_NODES:-1}}"
JOB="${SLURM_JOB_ID:-dry-run}"
export PRISM_STOP_FILE="$OUT/.stop_requested.$JOB"
if [[ -n "${SLURM_JOB_NODELIST:-}" ]]; then
  MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"  # first host of the allocation
else
  MASTER_ADDR="localhost"
fi
MASTER_PORT="${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}"

# RLVR variant: PRISM's scripts/train/experiment/qwen3_vl_{grpo,dapo,gspo}_after_prism.sh. It reaches the
# RLVR stage only (stages.rlvr.*): SFT and ALIGN keep their settings, as in PRISM, where one ALIGN
# checkpoint (PPO clip 0.2) feeds all three RL algorithms.
R=stages.rlvr
case "${PRISM_RL_ALGO:-grpo}" in
  grpo) ALGO=() ;;  # the config's values (qwen3_vl_grpo_after_prism*.sh)
  dapo) ALGO=($R.algorithm.loss=dapo $R.algorithm.clip_low=0.2 $R.algorithm.clip_high=0.28 $R.algorithm.dual_clip=10.0
              $R.algorithm.reward_shaping=dapo_overlong $R.algorithm.overlong_buffer=4096 $R.algorithm.overlong_penalty_factor=1.0
              $R.algorithm.sampling_filter=dapo_dynamic $R.algorithm.max_sampling_rounds=10 $R.algorithm.loss_agg=token-mean
              $R.optim.weight_decay=0.1 $R.optim.warmup_steps=10) ;;  # dapo script: clip 0.2/0.28, clip_ratio_c 10, overlong 4096, filter_groups, max_num_gen_batches 10, lr_warmup_steps 10, wd 0.1
  gspo) ALGO=($R.algorithm.loss=gspo $R.algorithm.clip_low=0.0003 $R.algorithm.clip_high=0.0004 $R.algorithm.loss_agg=seq-mean-token-mean
              $R.optim.weight_decay=0.1 $R.optim.warmup_steps=75) ;;  # gspo script: clip 3e-4/4e-4, seq-mean-token-mean, wd 0.1, warm-up ratio 0.05 x 1500
  *) echo "error: PRISM_RL_ALGO=${PRISM_RL_ALGO} must be grpo, dapo or gspo" >&2; exit 2 ;;
esac
read -r -a EXTRA <<< "${PRISM_OVERRIDES:-}"

# Where each process runs: the venv activated here (srun inherits the environment), or a container.
# In a container (pyxis/enroot), every path a command names is mounted at the same place: the policy
# and discriminator model dirs, the data, the output dir and the repo (the workdir, on PYTHONPATH).
# Each rank's rollout engine binds to its own GPU from torchrun's LOCAL_RANK (rollout.client), so no
# CUDA_VISIBLE_DEVICES juggling is needed. NCCL knobs a site sets (NCCL_SOCKET_IFNAME, NCCL_IB_HCA,
# NCCL_IB_GID_INDEX, NCCL_DEBUG=WARN, NCCL_NVLS_ENABLE, ...) pass through: export them before sbatch.
if [[ -n "${PRISM_CONTAINER:-}" ]]; then
  MOUNTS="$OUT:$OUT,$PRISM_DATA_ROOT:$PRISM_DATA_ROOT,$PRISM_POLICY_HF_DIR:$PRISM_POLICY_HF_DIR,$PRISM_REPO:$PRISM_REPO"
  if want warmup || want align; then MOUNTS+=",$PRISM_DISC_HF_DIR:$PRISM_DISC_HF_DIR"; fi
  SRUN_IMAGE=(--container-image="$PRISM_CONTAINER" --container-mounts="$MOUNTS" --container-workdir="$PRISM_REPO")
else
  SRUN_IMAGE=()
  # shellcheck disable=SC1091
  source "$PRISM_VENV/bin/activate" || { echo "error: PRISM_VENV=$PRISM_VENV has no bin/activate" >&2; exit 2; }
fi
export PYTHONPATH="$PRISM_REPO${PYTHONPATH:+:$PYTHONPATH}"
cd "$PRISM_REPO"

show() { printf '%q ' "$@"; echo; }
CHILD=""
run_step() {  # run_step CMD...: print it; run it (in the background, so the signal traps run at once)
  echo "[recipe] $(show "$@")"
  [[ $DRY_RUN == 1 ]] && return 0
  "$@" &
  CHILD=$!
  local rc=0
  while true; do  # `wait` returns early when a trapped signal arrives; wait again until the step ends
    wait "$CHILD" && rc=0 || rc=$?
    kill -0 "$CHILD" 2>/dev/null || break
  done
  CHILD=""
  return "$rc"
}
requeue_if_asked() {
  if [[ -e "$PRISM_STOP_FILE" ]]; then
    echo "[recipe] stop requested: the trainer checkpointed; requeueing job $JOB"
    rm -f "$PRISM_STOP_FILE"
    scontrol requeue "$JOB"
    exit 0
  fi
}
on_usr1() { echo "[recipe] SIGUSR1 (time limit near): asking the trainer to checkpoint and stop"; touch "$PRISM_STOP_FILE"; }
on_term() { echo "[recipe] SIGTERM: job ending (Slurm requeues it if it was requeued)"; exit 143; }
trap on_usr1 USR1
trap on_term TERM

one_task=(srun --nodes=1 --ntasks=1 "${SRUN_IMAGE[@]}")
torchrun_all=(srun --nodes="$NNODES" --ntasks-per-node=1 "${SRUN_IMAGE[@]}"
              torchrun --nnodes="$NNODES" --nproc-per-node="$GPN" --rdzv-id="$JOB" --rdzv-backend=c10d
              --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT")
if [[ $DRY_RUN == 1 ]]; then one_task=(); fi

echo "[recipe] $RECIPE_NAME job $JOB restart ${SLURM_RESTART_COUNT:-0}: $NNODES node(s) x $GPN, config $PRISM_CONFIG, rl ${PRISM_RL_ALGO:-grpo}"
PLAN_JSON="$OUT/plan.json"
if [[ $DRY_RUN == 1 ]]; then PLAN_JSON="$(mktemp)"; else mkdir -p "$OUT"; fi  # a dry run writes nothing under $OUT
# The layout must fit before anything runs: `prism plan` exits non-zero with the reason otherwise.
BASE=(model.megatron_dir="$OUT/init" model.hf_dir=null data.root="$PRISM_DATA_ROOT" run.output_dir="$RUN_DIR"
      "${ALGO[@]}")
if want warmup || want align; then BASE+=(discriminator.hf_dir="$PRISM_DISC_HF_DIR"); fi
BASE+=("${EXTRA[@]}")
PLAN=(prism plan "$PRISM_CONFIG" model.hf_dir="$PRISM_POLICY_HF_DIR" "${BASE[@]:2}" --nodes "$NNODES"
      --gpus-per-node "$GPN" --gpu-mem "${PRISM_GPU_MEM:-80}" --json "$PLAN_JSON")
echo "[recipe] $(show "${PLAN[@]}")"
if [[ -z "${PRISM_CONTAINER:-}" ]]; then
  "${PLAN[@]}" || { echo "error: the layout does not fit (above); change parallel.* in PRISM_OVERRIDES" >&2; exit 1; }
  read -r TP PP < <(python -c "import json,sys; l=json.load(open(sys.argv[1]))['layout']; print(l['tp'], l['pp'])" "$PLAN_JSON")
else
  TP=1; PP=1  # any saved layout loads into any training layout (resharded on read)
fi

stage_done() {  # the completion marker of each stage
  case "$1" in
    convert) [[ -f "$OUT/init/prism_checkpoint.json" ]] ;;
    export) [[ -f "$OUT/hf_final/.prism_export_complete" ]] ;;
    eval) [[ -f "$RUN_DIR/eval/result.json" ]] && { [[ -z "${PRISM_BENCHMARKS:-}" ]] || [[ -f "$OUT/benchmarks/eval_report.json" ]]; } ;;
    *) [[ -f "$RUN_DIR/$1/result.json" ]] ;;
  esac
}
stage_switches() {  # stages.<s>.enabled for one `prism run`: this stage and the wanted ones before it
  local upto="$1" s on=true
  for s in sft warmup align rlvr eval; do
    if want "$s" && [[ $on == true ]]; then echo "stages.$s.enabled=true"; else echo "stages.$s.enabled=false"; fi
    [[ $s == "$upto" ]] && on=false
  done
}
final_checkpoint() {  # the policy's last checkpoint: from the last training stage that finished
  local s
  if [[ $DRY_RUN == 1 ]]; then  # nothing has run: name where the path will come from
    for s in rlvr align sft; do if want "$s"; then echo "<checkpoint in $RUN_DIR/$s/result.json>"; return; fi; done
  fi
  for s in rlvr align sft; do
    if want "$s" && [[ -f "$RUN_DIR/$s/result.json" ]]; then
      python -c "import json,sys; print(json.load(open(sys.argv[1]))['checkpoint'])" "$RUN_DIR/$s/result.json"; return
    fi
  done
  echo "$OUT/init"
}

run_stage() {  # note: called under `if !`, where set -e is off, so each step ends in `|| return`
  local stage="$1"
  case "$stage" in
    convert)
      run_step "${one_task[@]}" prism convert hf-to-megatron --hf-dir "$PRISM_POLICY_HF_DIR" --out "$OUT/init" --tp "$TP" --pp "$PP" || return ;;
    sft|warmup|align|rlvr|eval)
      mapfile -t switches < <(stage_switches "$stage")
      run_step "${torchrun_all[@]}" -m megatron_prism.cli run "$PRISM_CONFIG" "${BASE[@]}" "${switches[@]}" || return
      if [[ $stage == eval && -n "${PRISM_BENCHMARKS:-}" ]]; then
        local bench=() b
        for b in $PRISM_BENCHMARKS; do bench+=(--benchmark "$b"); done
        run_step "${one_task[@]}" prism eval "$PRISM_CONFIG" "${BASE[@]}" --checkpoint "$OUT/hf_final" "${bench[@]}" \
          --k "${PRISM_EVAL_K:-8}" --temperature "${PRISM_EVAL_TEMPERATURE:-1.0}" --out "$OUT/benchmarks/eval_report.json" || return
      fi ;;
    export)
      local src; src="$(final_checkpoint)"
      rm -rf "$OUT/hf_final.tmp"
      run_step "${one_task[@]}" prism convert megatron-to-hf --megatron-dir "$src" --out "$OUT/hf_final.tmp" || return
      if [[ $DRY_RUN == 0 ]]; then echo "$src" > "$OUT/hf_final.tmp/.prism_export_complete"; rm -rf "$OUT/hf_final"; mv "$OUT/hf_final.tmp" "$OUT/hf_final"; fi ;;
  esac
}

for stage in $ALL_STAGES; do
  if [[ -n "$ONLY_STAGE" ]]; then
    if [[ $stage != "$ONLY_STAGE" ]]; then
      if [[ $DRY_RUN == 0 ]] && want "$stage" && [[ " ${ALL_STAGES%%"$ONLY_STAGE"*} " == *" $stage "* ]] && ! stage_done "$stage"; then
        echo "error: --stage $ONLY_STAGE needs '$stage' complete first (run: sbatch $RECIPE_NAME --stage $stage)" >&2; exit 2
      fi
      continue
    fi
  elif ! want "$stage"; then
    echo "[recipe] $stage: not in PRISM_STAGES, skipped"; continue
  fi
  if [[ $DRY_RUN == 0 ]] && stage_done "$stage"; then
    echo "[recipe] $stage: complete, skipped"; continue
  fi
  echo "[recipe] $stage: running"
  if ! run_stage "$stage"; then
    requeue_if_asked
    echo "error: stage $stage failed; fix the cause and resubmit (finished stages will be skipped)" >&2; exit 1
  fi
  requeue_if_asked
done
echo "[recipe] done: report $RUN_DIR/report.md"
