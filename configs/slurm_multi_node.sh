#!/bin/bash
# SLURM: one `accelerate launch` per node (srun starts one task per node), each starting GPUS_PER_NODE processes;
# node 0 (the first host of the allocation) is the rendezvous. Arguments go to scripts/train.py:
#   sbatch configs/slurm_multi_node.sh --config configs/ddpm_cifar10.yaml --train_batch_size 8 --output_dir /shared/run
# --output_dir must be on a file system every node sees; the decoded dataset cache is built once if --cache_dir
# is shared, else once per node (the log says which); --streaming needs no cache at all.
#SBATCH --job-name=hf_ddpm
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=48:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail
export GPUS_PER_NODE=${GPUS_PER_NODE:-8}
export MAIN_PROCESS_IP=${MAIN_PROCESS_IP:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
export MAIN_PROCESS_PORT=${MAIN_PROCESS_PORT:-29500}
export ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-configs/accelerate_multi_node.yaml}
# single quotes: SLURM_PROCID is each task's own, read on its node
srun --kill-on-bad-exit=1 bash -c 'exec accelerate launch --config_file "$ACCELERATE_CONFIG" \
    --num_machines "$SLURM_NNODES" --num_processes $((SLURM_NNODES * GPUS_PER_NODE)) \
    --machine_rank "$SLURM_PROCID" --main_process_ip "$MAIN_PROCESS_IP" --main_process_port "$MAIN_PROCESS_PORT" \
    scripts/train.py "$@"' slurm_multi_node "$@"
