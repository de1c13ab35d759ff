"""LoRA adapters on the Wan DiT, through peft (docs/lora.md).

An adapted linear layer computes W x + s B A x with W frozen, A [r, in], B [out, r] and s = alpha / r
(`LoraConfig`); peft's `inject_adapter_in_model` replaces the targeted `nn.Linear`s of a `WanModel` in
place, so the model keeps its class, forward and attention modes, and only A and B require grad: a
training program hands the model to the trainer as it is and the optimizer sees the adapters alone.
B starts at zero, so an adapted model computes exactly what its base does until it is trained.

State dicts: an adapted model's own has peft's names (`blocks.0.attn1.to_q.base_layer.weight`,
`...lora_A.<adapter>.weight`); `adapter_state` is the adapter alone under names without the adapter's
name (what adapter files hold), `merged_state` the weights W + s B A under the base model's names (what
a full checkpoint holds, so every loader of plain models reads an adapted one).

peft (which imports transformers: ~2 s) is imported by the functions that make or read adapters, so a
program that uses none does not wait for it.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch

from hiar.config import ConfigError, LoraConfig
from hiar.models import WanModel

if TYPE_CHECKING:
    import peft

ADAPTER = "default"  # the name a training run's adapter has inside the model


def peft_config(lora: LoraConfig) -> peft.LoraConfig:
    """peft's description of the adapters `lora` asks for (B zero-initialised: peft's default)."""
    import peft

    return peft.LoraConfig(r=lora.rank, lora_alpha=lora.alpha or lora.rank, lora_dropout=lora.dropout,
                           target_modules=list(lora.target_modules), bias="none")


def linear_names(model: torch.nn.Module) -> list[str]:
    """Paths of the model's nn.Linear layers, what `LoraConfig.target_modules` may name."""
    return [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]


def add_adapters(model: WanModel, lora: LoraConfig | peft.LoraConfig, name: str = ADAPTER, seed: int = 0) -> WanModel:
    """Inject a LoRA adapter called `name` into `model` (in place; returned for chaining). Afterwards only
    adapter parameters require grad. A's random start is drawn from `seed` (a run's train.seed), so a run
    starts from the same adapter on every rank and in every attempt, without touching the global RNG.
    A target that names no linear layer is a ConfigError listing them."""
    from peft.functional import inject_adapter_in_model

    config = peft_config(lora) if isinstance(lora, LoraConfig) else lora
    names = linear_names(model) + [n for n, _ in adapter_layers(model, named=True)]
    unmatched = [t for t in config.target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if unmatched:
        blocks = sorted({n.split(".", 2)[-1] for n in names if n.startswith("blocks.0.")})
        raise ConfigError(f"lora.target_modules {unmatched} name no linear layer of the Wan DiT; a transformer "
                          f"block's are {blocks} (others: {[n for n in names if not n.startswith('blocks.')]})")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inject_adapter_in_model(config, model, adapter_name=name)
    for n, p in model.named_parameters():  # the trainer's optimizer takes what requires grad: say it here
        p.requires_grad_(".lora_" in n)
    return model


def has_adapters(model: torch.nn.Module) -> bool:
    """Whether adapters are injected (peft keeps their configs on the model; `merge` removes them)."""
    return hasattr(model, "peft_config")


def adapter_layers(model: torch.nn.Module, named: bool = False) -> list:
    """The adapted layers (peft's LoraLayer), with `named` as (path, layer); none in a plain model."""
    if not has_adapters(model):
        return []
    from peft.tuners.lora import LoraLayer

    found = [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    return found if named else [m for _, m in found]


def adapter_config(model: torch.nn.Module, name: str = ADAPTER) -> peft.LoraConfig:
    """The peft config an adapter was injected with (peft keeps it on the model)."""
    return model.peft_config[name]


def adapter_state(model: torch.nn.Module, name: str = ADAPTER) -> dict[str, torch.Tensor]:
    """Adapter `name`'s tensors (A and B of every adapted layer), keyed without the adapter's name."""
    from peft.functional import get_peft_model_state_dict

    return get_peft_model_state_dict(model, adapter_name=name)


def set_adapter_state(model: torch.nn.Module, state: dict[str, torch.Tensor], name: str = ADAPTER) -> None:
    """Load `adapter_state`'s tensors into adapter `name`; a missing or unexpected key is an error."""
    from peft.functional import set_peft_model_state_dict

    expected = adapter_state(model, name)
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    wrong = [k for k in expected.keys() & state.keys() if expected[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(f"adapter tensors do not fit the model's adapter: missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}, other shapes {wrong[:3]}")
    set_peft_model_state_dict(model, state, adapter_name=name)


def trained_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What training changes: the adapter of an adapted model, else the whole state dict."""
    return adapter_state(model) if has_adapters(model) else model.state_dict()


def base_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The frozen base weights of an adapted model under the base model's names (W, not W + s B A)."""
    return {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if ".lora_" not in k}


@torch.no_grad()
def merged_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Weights W + sum over active adapters of s B A, under the base model's names, without changing
    `model` (a plain model: its state dict)."""
    state = base_state(model)
    for path, module in adapter_layers(model, named=True):
        if not module.merged:
            key = f"{path}.weight"
            for name in module.active_adapters:
                if name in module.lora_A:
                    state[key] = state[key] + module.get_delta_weight(name).to(state[key].dtype)
    return state


def attach(model: WanModel, adapters: list[tuple[peft.LoraConfig, dict[str, torch.Tensor], float]]) -> WanModel:
    """Several trained adapters on one model, each (config, tensors, scale) with its update scaled by
    `scale` (1: as trained), all active at once: W x + sum_i scale_i s_i B_i A_i x."""
    from peft.functional import set_adapter

    names = [f"lora{i}" for i in range(len(adapters))]
    for name, (config, state, scale) in zip(names, adapters):
        with warnings.catch_warnings():  # peft warns that a second adapter joins the first: meant here
            warnings.filterwarnings("ignore", "Already found a `peft_config`")
            add_adapters(model, config, name)
        set_adapter_state(model, state, name)
        for layer in adapter_layers(model):
            layer.set_scale(name, scale)
    set_adapter(model, names, inference_mode=True)
    return model


@torch.no_grad()
def merge(model: WanModel) -> WanModel:
    """Fold every active adapter into its base weights and put the plain linear layers back: the same
    function (up to float rounding), a plain `WanModel` with no per-forward adapter cost."""
    for path, module in adapter_layers(model, named=True):
        module.merge(adapter_names=list(module.active_adapters))
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, module.get_base_layer())
    del model.peft_config
    return model
