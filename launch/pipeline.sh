#!/usr/bin/env bash
# Pipelined parallel inference (the seed README's command): one process per group of denoising steps.
#   NPROC=4 bash launch/pipeline.sh --prompt "A cat sitting on a windowsill watching the rain fall outside"
# Defaults below (configs/hiar.yaml, ckpts/hiar.pt, 81 latent frames) can be overridden by passing the
# same flag again; any inference.py flag or section.key=value override is passed through.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/env.sh
exec .venv/bin/python -m torch.distributed.run --standalone --nproc_per_node="${NPROC:-4}" inference.py \
  --parallel pipeline --inference_method timestep_first --config_path configs/hiar.yaml \
  --checkpoint_path ckpts/hiar.pt --output_folder outputs/ --num_output_frames 81 "$@"
