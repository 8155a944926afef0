#!/bin/bash
# Two-tier SampleRNN on several nodes under Slurm: one torchrun agent per node (srun), one process per GPU.
# Requeued (preemption, a node failure) it runs the very same command, and --run_dir continues the run;
# torchrun --max_restarts restarts the workers after a lost process without giving up the allocation.
# Not run here (no cluster): the same torchrun command is tested with two agents on one machine
# (tests/test_nodes.py). The runs folder must be on a file system every node sees.
#
#   sbatch scripts/slurm_two_tier.sh
#
#SBATCH --job-name=twotier
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=16
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --output=slurm-%j.out
set -euo pipefail

HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
RUN_DIR=${RUN_DIR:-runs/twotier_ljspeech_slurm}  # one name for every attempt of this job
export OMP_NUM_THREADS=$SLURM_CPUS_PER_TASK
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1  # restarts between nodes (notes/faults.md: a lost node)

srun torchrun \
    --nnodes "$SLURM_NNODES" --nproc_per_node "$SLURM_GPUS_PER_NODE" \
    --rdzv_backend c10d --rdzv_endpoint "$HEAD:29500" --rdzv_id "$SLURM_JOB_ID" \
    --rdzv_conf join_timeout=600 --max_restarts 3 \
    two_tier.py --frame_size 2 --data data/ljspeech --run_dir "$RUN_DIR"
