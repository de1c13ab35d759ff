#!/usr/bin/env bash
# Download the published weights (needs internet and huggingface-cli; never run by the tests).
# Layout afterwards, as the HiAR README expects:
#   wan_models/Wan2.1-T2V-1.3B/   config.json, diffusion_pytorch_model.safetensors, Wan2.1_VAE.pth,
#                                 models_t5_umt5-xxl-enc-bf16.pth, google/umt5-xxl/ (tokenizer)
#   ckpts/hiar.pt                 the HiAR student ({'generator', 'generator_ema', ...})
# The diffusers layout (Wan-AI/Wan2.1-T2V-1.3B-Diffusers: transformer/, vae/, text_encoder/,
# tokenizer/) works too: point runtime.base_model (text encoder, VAE) or --checkpoint_path at it.
set -euo pipefail
cd "$(dirname "$0")/.."
huggingface-cli download Wan-AI/Wan2.1-T2V-1.3B --local-dir wan_models/Wan2.1-T2V-1.3B
mkdir -p ckpts
wget -O ckpts/hiar.pt https://huggingface.co/jackyhate/HiAR/resolve/main/hiar.pt
