#!/usr/bin/env bash
# PRISM on Qwen3-VL-4B-Instruct, on Slurm: convert -> SFT -> WARMUP -> ALIGN -> RLVR -> export -> EVAL.
#
#   export PRISM_POLICY_HF_DIR=/models/Qwen3-VL-4B-Instruct PRISM_DISC_HF_DIR=/models/Qwen3-VL-2B-Instruct
#   export PRISM_DATA_ROOT=/data/prism PRISM_OUTPUT_DIR=/scratch/$USER/prism_4b PRISM_VENV=$PWD/.venv
#   bash examples/run_prism_4b.sh --dry-run      # on the login node: every command, the planned layout
#   sbatch examples/run_prism_4b.sh              # from the repository root (or set PRISM_REPO)
#   sbatch examples/run_prism_4b.sh --stage rlvr # one stage; PRISM_RL_ALGO=dapo|gspo picks the RLVR variant
#
# Requeue-safe: a stage whose output is complete is skipped, an interrupted one resumes from its
# last checkpoint; USR1 five minutes before the time limit makes the trainer checkpoint and the job
# requeue itself. Everything else: examples/prism_recipe.sh (bash examples/run_prism_4b.sh --help).
#SBATCH --job-name=prism-4b
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --output=prism-4b-%j.log
set -euo pipefail

# sbatch runs a copy of this file from Slurm's spool directory: find the checkout from where sbatch ran.
PRISM_REPO="${PRISM_REPO:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}"
if [[ ! -f "$PRISM_REPO/examples/prism_recipe.sh" ]]; then
  echo "error: PRISM_REPO=$PRISM_REPO is not the megatron_prism checkout; run sbatch from it or export PRISM_REPO" >&2
  exit 2
fi
RECIPE_NAME="examples/run_prism_4b.sh"
PRISM_CONFIG="${PRISM_CONFIG:-$PRISM_REPO/examples/configs/prism_4b.yaml}"
# shellcheck source=examples/prism_recipe.sh
source "$PRISM_REPO/examples/prism_recipe.sh"
