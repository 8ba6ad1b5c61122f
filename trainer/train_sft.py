"""Supervised fine-tuning (SFT): teach a pretrained TinyMind to answer in the ChatML chat format.

Starts from ``out/{from_weight}_{hidden}.pth`` (the model is rebuilt from the config stored in that
file), reads ``{"conversations": [...]}`` lines and trains on the assistant's tokens only (every other
label is -100, dataset/lm_dataset.py). The loop is the same one pretraining uses
(trainer/train_loop.py). Writes:
    out/{weight}_{hidden}.pth          the weights + config (stage "sft"), e.g. out/full_sft_192.pth
    out/{weight}_{hidden}_resume.pth   optimizer, step, RNG and data position for --from_resume 1
    out/{weight}_{hidden}_log.csv      one row per log interval / validation pass
    out/{weight}_{hidden}_loss.png     the loss curve (train + validation)

CPU demo on the shipped data (the defaults; run trainer/train_pretrain.py first):
    python trainer/train_sft.py
    python trainer/train_sft.py --from_resume 1              # continue after Ctrl-C
One GPU / several GPUs:
    python trainer/train_sft.py --device cuda --data_path dataset/sft_mini_512.jsonl --max_seq_len 512 \\
        --batch_size 32 --learning_rate 5e-4
    torchrun --nproc_per_node 2 trainer/train_sft.py --data_path dataset/sft_mini_512.jsonl \\
        --max_seq_len 512 --batch_size 32 --learning_rate 5e-4
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere

import argparse

from dataset.lm_dataset import collate_batch
from model.common import cleanup_distributed, run_main, setup_device
from model.model import save_model
from trainer.resume import run_key, seed_everything
from trainer.train_loop import count_parameters, finish_run, train_loop
from trainer.trainer_utils import TrainConfig, add_common_args, setup_run
from trainer.watch import WatchReplies, add_watch_flag, watch_prompts


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="TinyMind supervised fine-tuning (assistant-only loss on chat data).")
    add_common_args(p, weight="full_sft", data_path="dataset/sft_demo.jsonl",
                    epochs=3, batch_size=32, learning_rate=2e-3, max_seq_len=256)
    p.add_argument("--from_weight", default="pretrain",
                   help="start from {save_dir}/{from_weight}_{hidden}.pth (default: pretrain)")
    add_watch_flag(p)
    return p


def main(argv=None, hooks=()):
    """Fine-tune every weight; ``hooks`` are extra ``TrainHook``s (e.g. dev/lora_experiments.py's scorer)."""
    args = build_parser().parse_args(argv)
    tc = TrainConfig.from_args(args)
    ctx = setup_device(args.device, args.dtype)
    try:
        # data, tokenizer, the --from_weight model, the held-out split: nothing written yet
        setup = setup_run(args, args.weight)
        seed_everything(args.seed)
        config = setup.model.config
        total, _ = count_parameters(setup.model)
        ctx.log(f"model: {setup.src} (hidden {config.hidden_size}, {config.num_hidden_layers} layers, "
                f"{total / 1e6:.2f}M parameters)")
        files = setup.files
        prompts = watch_prompts(args.watch_prompts, setup.data_path, setup.tok, setup.val_set)
        watch = WatchReplies(prompts, setup.tok, ctx.log, ctx.is_main)
        metrics = train_loop(
            setup.model, setup.train_set, setup.val_set, collate_batch, tc, ctx, files,
            save_weights=lambda m: save_model(m, files.weights, stage="sft", weight=args.weight,
                                              from_weight=args.from_weight),
            run=run_key(args, "sft", ctx, "from_weight"), resume=bool(args.from_resume),
            hooks=[*hooks, watch])
        return finish_run(metrics, ctx)
    finally:
        cleanup_distributed(ctx)


if __name__ == "__main__":
    run_main(main)
