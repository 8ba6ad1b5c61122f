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
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere

import argparse

from dataset.lm_dataset import collate_batch
from model.common import TinyMindError, cleanup_distributed, find_checkpoint, run_main, setup_device
from model.lora_variants import TrainSetup, add_variant_args, config_from_args, get_variant
from model.model_lora import DEFAULT_TARGETS, LoRAConfig, apply_lora, load_lora, save_lora
from trainer.resume import run_key, seed_everything
from trainer.train_loop import finish_run, train_loop
from trainer.trainer_utils import TrainConfig, add_common_args, setup_run
from trainer.watch import WatchReplies, add_watch_flag, watch_prompts


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
    add_watch_flag(p)
    add_variant_args(p)
    return p


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
        ctx.log(f"model: {setup.src} (hidden {config.hidden_size}, {config.num_hidden_layers} layers)")
        ctx.log(f"LoRA {args.lora_name}: rank {lora_cfg.rank}, alpha {lora_cfg.alpha:g}, scaling "
                f"{lora_cfg.scaling:.4g}, {len(info['wrapped'])} layers wrapped ({args.lora_targets}), "
                f"variant {variant.name} {lora_cfg.options or ''}")
        ctx.log(f"parameters: total {info['total']:,} (base {base:,} frozen), LoRA {info['trainable']:,} "
                f"trainable = {100 * info['trainable'] / info['total']:.2f}% of total")
        files = setup.files
        make_optimizer = variant.make_optimizer(args) if variant.make_optimizer is not None else None
        hooks = [*(variant.hooks(model, args.lora_name, args) if variant.hooks is not None else ()), *hooks]
        prompts = watch_prompts(args.watch_prompts, setup.data_path, setup.tok, setup.val_set)
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
        return finish_run(metrics, ctx)
    finally:
        cleanup_distributed(ctx)


if __name__ == "__main__":
    run_main(main)
