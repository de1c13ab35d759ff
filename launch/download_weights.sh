#!/usr/bin/env bash
# Download what HiAR needs from the Hugging Face Hub (needs internet; never run by the tests).
#
#   bash launch/download_weights.sh              # everything the full recipe needs (~95 GB)
#   bash launch/download_weights.sh inference    # only what inference needs: Wan2.1-T2V-1.3B and hiar.pt
#
# Sources are the ones the HiAR README (github.com/Jacky-hate/HiAR) and the Self-Forcing README
# (github.com/guandeh17/Self-Forcing) name; sizes are approximate. Layout afterwards:
#   wan_models/Wan2.1-T2V-1.3B/   Wan-AI/Wan2.1-T2V-1.3B (~17 GB): the student's base model and the
#                                 fake score's start (configs/hiar.yaml distill.critic), the ODE-pair
#                                 teacher (configs/ode_pairs.yaml), and the umT5 text encoder and VAE
#                                 every program uses (runtime.base_model)
#   ckpts/hiar.pt                 jackyhate/HiAR hiar.pt (a few GB): the released HiAR student
#                                 ({'generator', 'generator_ema', ...}; inference --use_ema)
#   wan_models/Wan2.1-T2V-14B/    Wan-AI/Wan2.1-T2V-14B (~70 GB): the DMD real score (distill.teacher)
#   ckpts/self_forcing/checkpoints/ode_init.pt
#                                 gdhe17/Self-Forcing checkpoints/ode_init.pt (a few GB, a 1.3B state
#                                 dict under 'generator'): the generator's start (distill.generator),
#                                 as in the reference; train/ode_init.py makes our own instead
#   data/vidprom_filtered_extended.txt
#                                 gdhe17/Self-Forcing vidprom_filtered_extended.txt (~100 MB of text):
#                                 the training prompts (distill.prompts, ode.prompts). The HiAR README's
#                                 URL puts it under prompts/ of that repo; the Self-Forcing README (the
#                                 repo's owner) downloads it from the top level, as here.
# The diffusers layout (Wan-AI/Wan2.1-T2V-1.3B-Diffusers: transformer/, vae/, text_encoder/,
# tokenizer/) works too: point runtime.base_model (text encoder, VAE) or --checkpoint_path at it.
set -euo pipefail
cd "$(dirname "$0")/.."

what="${1:-all}"
if [[ "$what" != all && "$what" != inference ]]; then
    echo "usage: bash launch/download_weights.sh [all|inference]" >&2
    exit 2
fi
# The Hugging Face CLI: `hf` (huggingface_hub >= 0.34; `hf download REPO [FILE] --local-dir DIR`), from
# PATH or from .venv (transformers and diffusers of requirements.txt bring huggingface_hub); else the
# older `huggingface-cli`, whose `download` takes the same arguments.
if ! command -v hf >/dev/null 2>&1; then
    if [[ -x .venv/bin/hf ]]; then
        hf() { .venv/bin/hf "$@"; }
    elif command -v huggingface-cli >/dev/null 2>&1; then
        echo "note: 'hf' not found, using the older 'huggingface-cli'" >&2
        hf() { huggingface-cli "$@"; }
    elif [[ -x .venv/bin/huggingface-cli ]]; then
        echo "note: 'hf' not found, using the older .venv/bin/huggingface-cli" >&2
        hf() { .venv/bin/huggingface-cli "$@"; }
    else
        echo "error: no Hugging Face CLI: neither 'hf' nor 'huggingface-cli' is on PATH or in .venv/bin." >&2
        echo "Install it with:  python3 -m pip install -U huggingface_hub   (it ships the 'hf' command)," >&2
        echo "or set up .venv first:  bash launch/demo.sh   (its transformers and diffusers bring huggingface_hub)." >&2
        exit 1
    fi
fi

hf download Wan-AI/Wan2.1-T2V-1.3B --local-dir wan_models/Wan2.1-T2V-1.3B
hf download jackyhate/HiAR hiar.pt --local-dir ckpts
if [[ "$what" == all ]]; then
    hf download Wan-AI/Wan2.1-T2V-14B --local-dir wan_models/Wan2.1-T2V-14B
    hf download gdhe17/Self-Forcing checkpoints/ode_init.pt --local-dir ckpts/self_forcing
    hf download gdhe17/Self-Forcing vidprom_filtered_extended.txt --local-dir data
fi
