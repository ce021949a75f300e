#!/usr/bin/env bash
# Launch ssd-train on one node with torchrun.
#   launch/torchrun.sh NUM_GPUS CONFIG [overrides...]
# Example: launch/torchrun.sh 8 configs/gpt_base_ssd.yaml train.micro_batch_size=16
set -euo pipefail
nproc=${1:?usage: launch/torchrun.sh NUM_GPUS CONFIG [overrides...]}; shift
exec torchrun --standalone --nproc_per_node "$nproc" -m ssd_megatron.cli train "$@"
