"""umT5 and the Wan VAE from their published layouts, on tiny random models built in the test."""

import random

import pytest
import sentencepiece as spm
import torch
from diffusers import AutoencoderKLWan
from transformers import T5TokenizerFast, UMT5Config, UMT5EncoderModel

from hiar.codecs import WanVAE
from hiar.text import WAN_T5_FILE, WAN_TOKENIZER_DIR, UMT5Encoder, clean_prompt


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A sentencepiece tokenizer trained here (vocab 1000), saved as google/umt5-xxl ships."""
    root = tmp_path_factory.mktemp("tok")
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8))) for _ in range(3000)]
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choices(words, k=12)) for _ in range(2000)))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(root / "spiece"), vocab_size=1000,
                                   pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
    folder = root / "tokenizer"
    T5TokenizerFast(vocab_file=str(root / "spiece.model"), extra_ids=0).save_pretrained(folder)
    return folder


# transformers' UMT5 names -> Wan's T5 encoder names (models_t5_umt5-xxl-enc-bf16.pth)
def wan_t5_layout(hf_state, num_layers):
    wan = {"token_embedding.weight": hf_state["shared.weight"], "norm.weight": hf_state["encoder.final_layer_norm.weight"]}
    for i in range(num_layers):
        p = f"encoder.block.{i}.layer."
        wan.update({
            f"blocks.{i}.norm1.weight": hf_state[p + "0.layer_norm.weight"],
            f"blocks.{i}.attn.q.weight": hf_state[p + "0.SelfAttention.q.weight"],
            f"blocks.{i}.attn.k.weight": hf_state[p + "0.SelfAttention.k.weight"],
            f"blocks.{i}.attn.v.weight": hf_state[p + "0.SelfAttention.v.weight"],
            f"blocks.{i}.attn.o.weight": hf_state[p + "0.SelfAttention.o.weight"],
            f"blocks.{i}.pos_embedding.embedding.weight": hf_state[p + "0.SelfAttention.relative_attention_bias.weight"],
            f"blocks.{i}.norm2.weight": hf_state[p + "1.layer_norm.weight"],
            f"blocks.{i}.ffn.gate.0.weight": hf_state[p + "1.DenseReluDense.wi_0.weight"],
            f"blocks.{i}.ffn.fc1.weight": hf_state[p + "1.DenseReluDense.wi_1.weight"],
            f"blocks.{i}.ffn.fc2.weight": hf_state[p + "1.DenseReluDense.wo.weight"],
        })
    return wan


def test_umt5_from_both_layouts(tmp_path, tokenizer_dir):
    torch.manual_seed(0)
    model = UMT5EncoderModel(UMT5Config(vocab_size=1000, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                        feed_forward_proj="gated-gelu")).eval()
    diffusers_root = tmp_path / "diffusers"
    model.save_pretrained(diffusers_root / "text_encoder")
    T5TokenizerFast.from_pretrained(tokenizer_dir).save_pretrained(diffusers_root / "tokenizer")
    wan_root = tmp_path / "wan"
    T5TokenizerFast.from_pretrained(tokenizer_dir).save_pretrained(wan_root / WAN_TOKENIZER_DIR)
    torch.save(wan_t5_layout(model.state_dict(), 2), wan_root / WAN_T5_FILE)

    prompts = ["abc defg hij klmn", "a  much   longer prompt with many words to pad the other one out &amp; more"]
    states = [UMT5Encoder(root, text_len=24)(prompts) for root in (diffusers_root, wan_root)]
    torch.testing.assert_close(states[0], states[1], atol=1e-5, rtol=0)
    out = states[0]
    assert out.shape == (2, 24, 32)
    real = out.abs().sum(-1) > 0
    n0, n1 = int(real[0].sum()), int(real[1].sum())
    assert 0 < n0 < n1 <= 24 and real[0, :n0].all() and not real[0, n0:].any()  # zero padding after the prompt


def test_prompts_are_cleaned_as_wan_does():
    assert clean_prompt("  a  cat\n on &amp;amp; a mat ") == "a cat on & a mat"


def test_umt5_missing_folder_says_what_it_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no umT5 text encoder .*models_t5_umt5-xxl-enc-bf16.pth"):
        UMT5Encoder(tmp_path)


def tiny_vae():
    torch.manual_seed(0)
    return AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                            temperal_downsample=[False, True, True])


def test_wan_vae_streaming_decode_equals_full_decode(tmp_path):
    tiny_vae().save_pretrained(tmp_path / "vae")  # diffusers layout
    codec = WanVAE.from_folder(tmp_path)
    z = torch.randn(1, 9, 16, 4, 4)
    full = codec.decode(z)
    assert full.shape == (1, 1 + 4 * 8, 3, 32, 32)  # the first latent frame is one frame, the rest four each
    stream = codec.stream_decoder()
    blocks = torch.cat([stream.decode(z[:, i:i + 3]) for i in range(0, 9, 3)], dim=1)
    assert torch.equal(blocks, full)
    video = torch.rand(1, 9, 3, 32, 32) * 2 - 1
    assert codec.encode(video).shape == (1, 3, 16, 4, 4)


def test_wan_vae_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no Wan VAE"):
        WanVAE.from_folder(tmp_path)
