"""The LoRA family's registry: what a variant of the plain LoRA in model/model_lora.py is made of.

Each variant is one short module beside this file that ends with ``register(Variant(...))``. A ``Variant``
says, with plain callables, everything trainer/train_lora.py, ``apply_lora``, ``save_lora`` and
``load_lora`` need to know about it; the training loop itself never learns its name:

    layer           a module LoRALinear keeps in ``variants[name]`` when the branch is not s * B(Ax)
                    (DoRA, VeRA, AdaLoRA); None: the plain A/B branch
    supports_embedding  may adapt the token embedding too (``embed_tokens``, LoRAEmbedding): plain LoRA, LoRA+
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

``layer``, ``supports_embedding``, ``setup`` and ``export`` are the hooks model_lora itself calls:
``register`` puts the variant into ``model/model_lora.py::VARIANTS``, where ``apply_lora``, ``save_lora``
and ``load_lora`` find it. Registering one is a few lines, e.g. a variant that only changes the optimizer:

    register(Variant("lora_plus", paper="2402.12354", summary="B's learning rate = loraplus_lr_ratio x A's",
                     add_args=add_args, make_optimizer=make_optimizer))
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
from typing import Callable

import torch.nn as nn

from model.model_lora import VARIANTS, LoRAConfig, LoRALinear, lora_modules, variant_hooks


@dataclass
class TrainSetup:
    """What ``prepare`` may use: the data (LoRA-GA's gradient batches, LoRA-drop's sample), the device, the
    flags and the files of the run (Delta-LoRA writes its new base beside them)."""
    train_set: object = None      # indexable dataset of (input_ids, labels)
    collate_fn: Callable = None   # list of items -> (input_ids, labels, attention_mask)
    ctx: object = None            # the DeviceContext of model.common.setup_device (.device, .autocast(), .log)
    args: argparse.Namespace = None
    files: object = None          # the run's RunFiles (trainer/trainer_utils.py): .weights, .resume, ...


@dataclass
class Variant:
    name: str
    paper: str = ""                    # arXiv id
    summary: str = ""                  # one line for --help and the docs
    layer: type | None = None
    supports_embedding: bool = False
    add_args: Callable | None = None
    configure: Callable | None = None
    setup: Callable | None = None
    prepare: Callable | None = None
    export: Callable | None = None
    make_optimizer: Callable | None = None
    hooks: Callable | None = None
    save_extra: Callable | None = None
    count_trainable: Callable | None = None


def register(variant: Variant) -> Variant:
    """Add ``variant`` to model_lora's registry (plain "lora" replaces the bare entry model_lora starts with)."""
    if isinstance(VARIANTS.get(variant.name), Variant):
        raise ValueError(f"LoRA variant {variant.name!r} is registered twice")
    VARIANTS[variant.name] = variant
    return variant


register(Variant("lora", summary="plain LoRA: y = W x + s * B(A x), A and B train (model/model_lora.py)",
                 paper="2106.09685", supports_embedding=True))


def variants() -> dict[str, Variant]:
    """Every registered variant, plain LoRA first, then in the order model/lora_variants imports them."""
    return dict(VARIANTS)


def get_variant(name: str) -> Variant:
    """The variant called ``name``; an unknown name is a one-line error listing the known ones."""
    return variant_hooks(name)


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


def config_from_args(args: argparse.Namespace, cfg: LoRAConfig) -> LoRAConfig:
    """The LoRAConfig for --lora_variant: the variant turns its flags into ``cfg.options``."""
    v = get_variant(args.lora_variant)
    cfg = replace(cfg, variant=v.name)
    return v.configure(args, cfg) if v.configure is not None else cfg


def adapter_layers(model: nn.Module, name: str) -> list[tuple[str, LoRALinear]]:
    """(module name, LoRALinear) for every layer holding adapter ``name``."""
    return [(n, m) for n, m in lora_modules(model) if name in m.configs]
