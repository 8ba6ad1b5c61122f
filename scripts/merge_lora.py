"""Merge one or more LoRA adapters into a base checkpoint and save a plain full checkpoint.

    W_merged = W + sum_i w_i * s_i * B_i @ A_i     (computed in fp32, cast once to W's dtype)

The result has the plain model's parameter names and stage "merged", so it loads with no LoRA code:
``python eval_llm.py --weight full_sft_lora_identity``. Before saving, the script runs a probe batch through
the model with the adapters attached and again after merging, and prints the largest logit difference.

CPU (merging needs no GPU; the same command works on any machine, and no torchrun is needed):
    python scripts/merge_lora.py --weight full_sft --lora_weight lora_identity
    python scripts/merge_lora.py --weight full_sft --lora_weight lora_identity,lora_medical --lora_scales 1,0.5
    python eval_llm.py --weight full_sft_lora_identity
Reads out/{weight}_{hidden}.pth and out/{lora}_{hidden}.pth, writes out/{out_weight}_{hidden}.pth.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere

import argparse

import torch

from model.common import TinyMindError, repo_path, run_main
from model.engine import load_adapters, load_base
from model.model import save_model
from model.lora_adapters import combine_adapters, set_active_adapters
from model.model_lora import base_state_dict, merge_lora
from tools.cli import add_model_flags, lora_names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(p, "weight", "lora_weight", "save_dir", "hidden_size", defaults={"lora_weight": "lora_identity"},
                    helps={"lora_weight": "LoRA name(s), comma-separated: reads {save_dir}/{name}_{hidden}.pth for "
                                          "each",
                           "save_dir": "folder with the input files and for the output"})
    p.add_argument("--lora_scales", default="",
                   help="comma-separated weight per LoRA (default 1 each); 0.5 merges half of that adapter's update")
    p.add_argument("--out_weight", default="",
                   help="name of the merged checkpoint (default {weight}_{lora names joined by _})")
    p.add_argument("--force", action="store_true",
                   help="merge a LoRA even if it was trained on another base checkpoint (same shapes required)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    save_dir = repo_path(args.save_dir)
    names = lora_names(args.lora_weight)
    if not names:
        raise TinyMindError("--lora_weight: give at least one LoRA name")
    try:
        scales = [float(s) for s in args.lora_scales.split(",")] if args.lora_scales else [1.0] * len(names)
    except ValueError:
        raise TinyMindError(f"--lora_scales {args.lora_scales!r}: expected comma-separated numbers") from None
    if len(scales) != len(names):
        raise TinyMindError(f"--lora_scales has {len(scales)} values for {len(names)} LoRA names")
    out_weight = args.out_weight or "_".join([args.weight] + names)
    if out_weight == args.weight:
        raise TinyMindError("--out_weight must differ from --weight (the base checkpoint is never overwritten)")

    model, ckpt, base_path = load_base(save_dir, args.weight, args.hidden_size, what="base checkpoint")
    hidden = model.config.hidden_size
    lora_paths = load_adapters(model, save_dir, names, force=args.force)
    if scales != [1.0] * len(names):   # a weighted sum: one exact combined adapter (ranks concatenated)
        combine_adapters(model, names, scales, "combined")
    else:
        set_active_adapters(model, names)

    probe = torch.randint(3, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(probe).logits.float()
        merge_lora(model)
        after = model(probe).logits.float()
    diff = (after - before).abs().max().item()
    print(f"[merge] {base_path.name} + {', '.join(f'{p.name} x{s:g}' for p, s in zip(lora_paths, scales))}: "
          f"max |logits merged - unmerged| = {diff:.2e} (fp32 weights: ~1e-6; bf16/fp16 round the sum)")
    out = save_model(model, save_dir / f"{out_weight}_{hidden}.pth", state_dict=base_state_dict(model),
                     stage="merged", weight=out_weight, base_weight=args.weight, loras=names, lora_scales=scales,
                     base_stage=ckpt.get("stage", ""))
    print(f"[merge] wrote {out} (stage merged; load it with: python eval_llm.py --weight {out_weight})")
    return out


if __name__ == "__main__":
    run_main(main)
