"""LoRA fine-tuning: teach a frozen TinyMind a new identity or new knowledge through small adapters.

Loads ``out/{from_weight}_{hidden}.pth``, wraps the target linear layers with ``LoRALinear``
(model/model_lora.py: y = W x + scaling * B (A x), only A and B train; ``embed_tokens`` in
--lora_targets also wraps the token embedding with ``LoRAEmbedding``), and runs the same loop as
pretraining and SFT (trainer/train_loop.py) on chat data with the assistant-only loss. Writes:
    out/{lora_name}_{hidden}.pth          only the adapter (A/B tensors, LoRA config, base config and
                                          fingerprint), e.g. out/lora_identity_192.pth
    out/{lora_name}_{hidden}_resume.pth   adapter + optimizer + step + RNG for --from_resume 1
    out/{lora_name}_{hidden}_log.csv      one row per log interval / validation pass
    out/{lora_name}_{hidden}_loss.png     the loss curve (train + validation)

CPU demo on the shipped data (run train_pretrain.py and train_sft.py first):
    python trainer/train_lora.py                                   # lora_identity (the defaults: r=16, 4 epochs)
    python trainer/train_lora.py --lora_name lora_medical --data_path dataset/lora_medical.jsonl \
        --epochs 9 --learning_rate 7e-3 --weight_decay 0.1 --lora_targets q_proj,k_proj,v_proj,o_proj,embed_tokens
                                         # new knowledge keyed on new words: more passes, and the embedding too
    python trainer/train_lora.py --lora_targets all-linear --lora_rank 16 --lora_alpha 32 --use_rslora 1
    python trainer/train_lora.py --lora_variant dora --lora_name lora_identity_dora   # any of the LoRA family:
    python trainer/train_lora.py --help                            # lists the variants and each one's flags
    python trainer/train_lora.py --lora_name lora_style --lora_over lora_medical   # on top of another adapter
    python eval_llm.py --weight full_sft --lora_weight lora_identity    # chat with it
One GPU / several GPUs:
    python trainer/train_lora.py --device cuda --lora_name lora_medical --data_path dataset/lora_medical.jsonl
    torchrun --nproc_per_node 2 trainer/train_lora.py --lora_name lora_medical \\
        --data_path dataset/lora_medical.jsonl
A released model (imported with scripts/convert_model.py --from hf; docs/08-lora-on-real-models.md):
    python trainer/train_lora.py --from_weight smol --tokenizer_path out/smol_tokenizer.json \
        --data_path dataset/lora_identity_en.jsonl --lora_name lora_me --batch_size 8 --max_seq_len 128 \
        --grad_checkpoint 1          # --base_dtype auto holds a 100M+ base in the run's compute dtype (bf16
                                     # under bf16 autocast), --head_chunk auto runs a 32k+ vocabulary's head
                                     # in chunks; the run ends with its peak memory
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere

import argparse

import torch

from dataset.lm_dataset import collate_batch
from model.common import TinyMindError, cleanup_distributed, find_checkpoint, peak_memory_mb, run_main, setup_device
from model.loss_chunked import head_chunk_rows
from model.lora_frozen_base import base_dtype, hold_frozen_base
from model.lora_variants import TrainSetup, add_variant_args, config_from_args, get_variant
from model.model_lora import DEFAULT_TARGETS, LoRAConfig, apply_lora, load_lora, save_lora
from trainer.resume import run_key, seed_everything
from trainer.train_loop import finish_run, train_loop
from trainer.trainer_utils import TrainConfig, add_common_args, setup_run
from trainer.watch import WatchReplies, add_watch_flag, auto_watch_off, watch_prompts


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="TinyMind LoRA fine-tuning (frozen base, trainable low-rank adapters).")
    # The output is named by --lora_name, so the common --weight flag is left out.
    add_common_args(p, skip=("weight",), data_path="dataset/lora_identity.jsonl", epochs=4, batch_size=32,
                    learning_rate=2e-3, max_seq_len=256, weight_decay=0.0)
    p.add_argument("--lora_name", default="lora_identity",
                   help="adapter name; writes {save_dir}/{lora_name}_{hidden}.pth (letters, digits, _)")
    p.add_argument("--from_weight", default="full_sft",
                   help="frozen base model: {save_dir}/{from_weight}_{hidden}.pth (default: full_sft)")
    p.add_argument("--lora_rank", type=int, default=16, help="r, the inner size of B @ A (default: 16)")
    p.add_argument("--lora_alpha", type=float, default=32.0,
                   help="scaling numerator: scaling = alpha / r, or alpha / sqrt(r) with --use_rslora 1 (default: 32)")
    p.add_argument("--lora_dropout", type=float, default=0.0,
                   help="dropout on the LoRA branch's input only (default: 0)")
    p.add_argument("--lora_targets", default=DEFAULT_TARGETS,
                   help="layers to adapt: comma list of name suffixes, 'all-linear', or 're:<regex>'; add "
                        "embed_tokens to the list to adapt the token embedding too (plain LoRA / LoRA+ only) "
                        f"(default: {DEFAULT_TARGETS})")
    p.add_argument("--use_rslora", type=int, default=0, choices=[0, 1],
                   help="1: rsLoRA scaling alpha / sqrt(r), stable across ranks (default: 0)")
    p.add_argument("--lora_over", default="",
                   help="LoRA name(s), comma-separated, loaded first (frozen, active): the new adapter is trained "
                        "on top of them and its file will refuse to load without them (default: none)")
    p.add_argument("--base_dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype the frozen base is held in (the adapters stay fp32): auto = the run's compute dtype "
                        "(--dtype: bf16/fp16 where it autocasts, else fp32) for a base of 100M+ parameters, fp32 "
                        "for smaller ones such as the demo's; float16 on a GPU only (default: auto)")
    p.add_argument("--grad_checkpoint", type=int, default=0, choices=[0, 1],
                   help="1: gradient checkpointing, keep each block's input only and recompute the block in the "
                        "backward (less activation memory, about one more forward of compute) (default: 0)")
    p.add_argument("--head_chunk", default="auto",
                   help="the training loss runs the LM head this many rows at a time, never holding the whole "
                        "(tokens x vocabulary) logits: auto = 256 rows for a vocabulary of 32k+ tokens, plain "
                        "below; 0 = plain (default: auto)")
    add_watch_flag(p)
    add_variant_args(p)
    return p


def memory_settings(model, args, ctx, variant) -> str:
    """Apply --base_dtype, --grad_checkpoint and --head_chunk to the wrapped model; the log line saying what
    they did."""
    rows = head_chunk_rows(args.head_chunk, model.config.vocab_size)   # a bad flag fails before anything changes
    base = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    dtype = base_dtype(args.base_dtype, ctx.dtype, base, ctx.device)
    if dtype != torch.float32 and any(getattr(variant, k) is not None
                                      for k in ("layer", "prepare", "save_extra", "export")):
        raise TinyMindError(f"--base_dtype {args.base_dtype}: LoRA variant {variant.name} reads or rewrites the base "
                            "weights; train it on an fp32 base (--base_dtype float32)")
    saved = hold_frozen_base(model, dtype)
    model.model.gradient_checkpointing = bool(args.grad_checkpoint)
    model.head_chunk_rows = rows
    head = f"in chunks of {model.head_chunk_rows} rows" if model.head_chunk_rows else "whole"
    return (f"memory: frozen base in {str(dtype)[6:]} (saves {saved / 2**20:.0f} MB), adapters fp32, gradient "
            f"checkpointing {'on' if args.grad_checkpoint else 'off'}, LM head loss {head}")


def main(argv=None, hooks=()):
    """Train one adapter; ``hooks`` are extra ``TrainHook``s (e.g. dev/lora_experiments.py's scorer)."""
    args = build_parser().parse_args(argv)
    tc = TrainConfig.from_args(args)
    if tc.optimizer != "adamw":  # A and B are two factors of one update, not hidden matrices (trainer/optim.py)
        raise TinyMindError("--optimizer muon applies to full training (pretrain/SFT); LoRA trains with adamw")
    ctx = setup_device(args.device, args.dtype)
    try:
        # data, tokenizer, the frozen --from_weight model, the held-out split: nothing written yet
        setup = setup_run(args, args.lora_name)
        model = setup.model
        config = model.config
        for name in [n.strip() for n in args.lora_over.split(",") if n.strip()]:   # companions, frozen
            load_lora(model, find_checkpoint(args.save_dir, name, config.hidden_size, what="--lora_over file"),
                      adapter_name=name)
        seed_everything(args.seed)  # the same A initialisation on every rank
        variant = get_variant(args.lora_variant)
        lora_cfg = config_from_args(args, LoRAConfig(rank=args.lora_rank, alpha=args.lora_alpha,
                                                     targets=args.lora_targets, dropout=args.lora_dropout,
                                                     use_rslora=bool(args.use_rslora)))
        info = apply_lora(model, lora_cfg, adapter_name=args.lora_name)  # freezes every base weight
        if variant.prepare is not None:   # data-dependent init: PiSSA's SVD, QLoRA's 4-bit base, ...
            variant.prepare(model, args.lora_name,
                            TrainSetup(setup.train_set, collate_batch, ctx, args, setup.files))
        info["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        base = info["total"] - info["trainable"]
        memory = memory_settings(model, args, ctx, variant)
        ctx.log(f"model: {setup.src} (hidden {config.hidden_size}, {config.num_hidden_layers} layers)")
        ctx.log(f"LoRA {args.lora_name}: rank {lora_cfg.rank}, alpha {lora_cfg.alpha:g}, scaling "
                f"{lora_cfg.scaling:.4g}, {len(info['wrapped'])} layers wrapped ({args.lora_targets}), "
                f"variant {variant.name} {lora_cfg.options or ''}")
        ctx.log(f"parameters: total {info['total']:,} (base {base:,} frozen), LoRA {info['trainable']:,} "
                f"trainable = {100 * info['trainable'] / info['total']:.2f}% of total")
        ctx.log(memory)
        files = setup.files
        make_optimizer = variant.make_optimizer(args) if variant.make_optimizer is not None else None
        hooks = [*(variant.hooks(model, args.lora_name, args) if variant.hooks is not None else ()), *hooks]
        prompts = watch_prompts(args.watch_prompts, setup.data_path, setup.tok, setup.val_set, n_params=info["total"])
        if auto_watch_off(args.watch_prompts, info["total"]):
            ctx.log(f"watch: off for a {info['total'] / 1e6:.0f}M-parameter base (each reply is decoded token by "
                    "token through the live adapters); name prompts with --watch_prompts \"a|b\" to watch them")
        hooks.append(WatchReplies(prompts, setup.tok, ctx.log, ctx.is_main))

        def save_weights(m):
            path = save_lora(m, files.weights, adapter_name=args.lora_name, from_weight=args.from_weight)
            if variant.save_extra is not None:   # e.g. Delta-LoRA: W itself changed, write it too
                variant.save_extra(m, args.lora_name, args, path)
            return path

        metrics = train_loop(
            model, setup.train_set, setup.val_set, collate_batch, tc, ctx, files, save_weights=save_weights,
            run={**run_key(args, "lora", ctx, "from_weight", "lora_name", "lora_rank", "lora_alpha",
                           "lora_dropout", "lora_targets", "use_rslora", "lora_variant", "lora_over"),
                 "lora_options": repr(sorted(lora_cfg.options.items()))},
            resume=bool(args.from_resume),
            hooks=hooks, make_optimizer=make_optimizer)
        metrics["peak_memory_mb"] = peak_memory_mb(ctx.device)
        how = "max allocated" if ctx.device.type == "cuda" else "peak resident set of the process"
        ctx.log(f"peak memory: {metrics['peak_memory_mb']:,.0f} MB ({how})")
        return finish_run(metrics, ctx)
    finally:
        cleanup_distributed(ctx)


if __name__ == "__main__":
    run_main(main)
