"""The LoRA family: a small registry of variants of the plain LoRA in model/model_lora.py.

Each variant is one short module beside this file that ends with ``register(Variant(...))``. A ``Variant``
says, with plain callables, everything trainer/train_lora.py, ``apply_lora``, ``save_lora`` and
``load_lora`` need to know about it; the training loop itself never learns its name:

    layer           a module LoRALinear keeps in ``variants[name]`` when the branch is not s * B(Ax)
                    (DoRA, VeRA, AdaLoRA); None: the plain A/B branch
    add_args        its own command-line flags (one argparse group per variant, the papers' defaults)
    configure       (args, LoRAConfig) -> LoRAConfig: flags -> ``options`` (saved in the file), checks
    setup           (model, name): after the layers are built, also when a file is loaded (VeRA's shared matrices)
    prepare         (model, name, TrainSetup): before training only, data-dependent init (PiSSA's SVD,
                    QLoRA's 4-bit base, LoRA-GA's gradients)
    export          (model, name) -> (LoRAConfig, tensors): what the adapter file holds (PiSSA: a plain LoRA)
    make_optimizer  (args) -> (model, lr, weight_decay) -> optimizer (LoRA+, LoRA-FA, LoRA-Pro)
    hooks           (model, name, args) -> [TrainHook objects] (AdaLoRA's budget, Delta-LoRA, LoRA-drop)
    save_extra      (model, name, args, weights_path): files written beside the adapter (Delta-LoRA's W)
    count_trainable (model, name) -> int: trainable numbers right after apply_lora, for the docs' table,
                    when ``prepare`` changes them (LoRA-FA freezes A); default: what apply_lora reports

Registering one is a few lines, e.g. a variant that only changes the optimizer:

    register(Variant("lora_plus", paper="2402.12354", summary="B learns lora_plus_ratio x faster than A",
                     add_args=add_args, make_optimizer=make_optimizer))
"""
from __future__ import annotations

import argparse
import importlib
from dataclasses import dataclass, replace
from typing import Callable

import torch.nn as nn

from model.common import TinyMindError


@dataclass
class TrainSetup:
    """What ``prepare`` may use: the data (LoRA-GA's gradient batches, LoRA-drop's sample) and the device."""
    train_set: object = None      # indexable dataset of (input_ids, labels)
    collate_fn: Callable = None   # list of items -> (input_ids, labels, attention_mask)
    ctx: object = None            # the DeviceContext of trainer_utils.setup_device (.device, .autocast(), .log)
    args: argparse.Namespace = None


@dataclass
class Variant:
    name: str
    paper: str = ""                    # arXiv id
    summary: str = ""                  # one line for --help and the docs
    layer: type | None = None
    add_args: Callable | None = None
    configure: Callable | None = None
    setup: Callable | None = None
    prepare: Callable | None = None
    export: Callable | None = None
    make_optimizer: Callable | None = None
    hooks: Callable | None = None
    save_extra: Callable | None = None
    count_trainable: Callable | None = None


REGISTRY: dict[str, Variant] = {}
# Modules that register variants, imported on first use (one module per variant, in --help order).
MODULES = ("dora", "vera", "pissa", "olora", "lora_ga", "qlora", "adalora",
           "lora_fa", "lora_plus", "lora_pro", "delta_lora", "lora_drop")


def register(variant: Variant) -> Variant:
    if variant.name in REGISTRY:
        raise ValueError(f"LoRA variant {variant.name!r} is registered twice")
    REGISTRY[variant.name] = variant
    return variant


register(Variant("lora", summary="plain LoRA: y = W x + s * B(A x), A and B train (model/model_lora.py)",
                 paper="2106.09685"))
_loaded = False


def _load_all():
    """Import every variant module once; a module not written yet is simply absent."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in MODULES:
        try:
            importlib.import_module(f"model.lora_variants.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"model.lora_variants.{mod}":
                raise


def variants() -> dict[str, Variant]:
    """Every registered variant, plain LoRA first, then in MODULES order (whatever order they were imported)."""
    _load_all()
    order = {name: i for i, name in enumerate(("lora",) + MODULES)}
    return dict(sorted(REGISTRY.items(), key=lambda kv: order.get(kv[0], len(order))))


def get_variant(name: str) -> Variant:
    if name not in variants():
        raise TinyMindError(f"unknown LoRA variant {name!r}; choose one of {', '.join(variants())}")
    return REGISTRY[name]


def variant_layer(name: str) -> type | None:
    return get_variant(name).layer


def add_variant_args(parser: argparse.ArgumentParser) -> None:
    """--lora_variant, then one argument group per variant holding its own flags."""
    names = list(variants())
    parser.add_argument("--lora_variant", default="lora", choices=names,
                        help="which member of the LoRA family to train (default: lora); "
                             "each one's own flags are listed in its group below")
    for v in variants().values():
        if v.name == "lora":
            continue
        paper = f" (arXiv {v.paper})" if v.paper else ""
        group = parser.add_argument_group(f"{v.name}{paper}", v.summary)   # shown even without own flags
        if v.add_args is not None:
            v.add_args(group)
        for action in group._group_actions:   # every flag shows its default, as the common flags do
            if action.help and "%(default)" not in action.help:
                action.help += " (default: %(default)s)"


def config_from_args(args: argparse.Namespace, cfg) -> "LoRAConfig":  # noqa: F821
    """The LoRAConfig for --lora_variant: the variant turns its flags into ``cfg.options``."""
    v = get_variant(args.lora_variant)
    cfg = replace(cfg, variant=v.name)
    return v.configure(args, cfg) if v.configure is not None else cfg


def export_adapter(model: nn.Module, name: str):
    """(LoRAConfig, {key: tensor}) that ``save_lora`` writes for adapter ``name``."""
    from model.model_lora import adapter_state, lora_modules

    cfg = next(m.configs[name] for _, m in lora_modules(model) if name in m.configs)
    v = get_variant(cfg.variant)
    if v.export is not None:
        return v.export(model, name)
    return cfg, adapter_state(model, name)


def adapter_layers(model: nn.Module, name: str):
    """(module name, LoRALinear) for every layer holding adapter ``name``."""
    from model.model_lora import lora_modules

    return [(n, m) for n, m in lora_modules(model) if name in m.configs]
