"""The flags the inference commands share, each described once, as trainer/trainer_utils.py does for training.

eval_llm.py, scripts/evaluate.py, scripts/serve_openai_api.py, scripts/merge_lora.py and
scripts/convert_model.py all find a checkpoint by name in a folder, and most of them pick a device, a
dtype and a tokenizer. ``ModelFlags`` holds each of those flags as a dataclass field with its default
and help text; ``add_model_flags`` adds the ones a command takes. A command may give a flag its own
default (merge_lora.py merges lora_identity unless told otherwise) or its own help where the flag means
more there (the server's --lora_weight also picks adapters by itself). ``lora_names`` reads a
comma-separated --lora_weight.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

from trainer.trainer_utils import flag


@dataclass
class ModelFlags:
    """Which checkpoint and adapters to load, and where and how to run them."""

    weight: str = flag("full_sft", "checkpoint name: reads {save_dir}/{weight}_{hidden}.pth")
    lora_weight: str | None = flag(None, "LoRA name(s), comma-separated: reads {save_dir}/{name}_{hidden}.pth "
                                         "for each, all active together", type=str)
    save_dir: str = flag("out", "folder holding the checkpoints and LoRA files (relative to the repo root)")
    hidden_size: int | None = flag(None, "picks the file {weight}_{hidden}.pth (default: the only {weight}_*.pth "
                                         "in --save_dir)", type=int)
    tokenizer_path: str = flag("model/tokenizer.json", "tokenizer file")
    device: str = flag("auto", "auto (cuda -> mps -> cpu), cpu, cuda, cuda:N or mps")
    dtype: str = flag("auto", "weight dtype (auto: bf16/fp16 on a GPU, float32 on CPU)",
                      choices=["auto", "float32", "float16", "bfloat16"])


MODEL_FLAGS = {f.name: f for f in fields(ModelFlags)}


def add_model_flags(parser: argparse.ArgumentParser, *names: str, defaults: dict | None = None,
                    helps: dict | None = None) -> argparse.ArgumentParser:
    """Add ``--{name}`` for each of ``names`` (fields of ``ModelFlags``), in that order; ``defaults`` and
    ``helps`` replace a field's default or help text for this command."""
    defaults, helps = defaults or {}, helps or {}
    unknown = (set(names) | set(defaults) | set(helps)) - set(MODEL_FLAGS)
    if unknown:
        raise ValueError(f"add_model_flags: unknown flag(s) {sorted(unknown)}")
    for name in names:
        f = MODEL_FLAGS[name]
        parser.add_argument(f"--{name}", type=f.metadata["type"] or type(f.default),
                            default=defaults.get(name, f.default), choices=f.metadata["choices"],
                            help=helps.get(name, f.metadata["help"]))
    return parser


def lora_names(flag_value: str | None) -> list[str]:
    """The names in a comma-separated --lora_weight, blanks dropped ("a, b," -> ["a", "b"]; None -> [])."""
    return [n.strip() for n in (flag_value or "").split(",") if n.strip()]
