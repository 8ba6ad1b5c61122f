"""Pretraining: teach a freshly initialised TinyMind to continue text (next-token prediction).

Reads ``{"text": ...}`` lines, packs them into full ``max_seq_len`` windows (dataset/lm_dataset.py),
builds a model from ``--preset`` (plus --hidden_size / --num_hidden_layers overrides) and trains every
token with the shared loop in trainer/train_loop.py. Writes:
    out/{weight}_{hidden}.pth          the weights + config (stage "pretrain"), e.g. out/pretrain_192.pth
    out/{weight}_{hidden}_resume.pth   optimizer, step, RNG and data position for --from_resume 1
    out/{weight}_{hidden}_log.csv      one row per log interval / validation pass
    out/{weight}_{hidden}_loss.png     the loss curve (train + validation)

CPU demo on the shipped data (the defaults):
    python trainer/train_pretrain.py
    python trainer/train_pretrain.py --max_steps 30          # a quick look
    python trainer/train_pretrain.py --from_resume 1         # continue after Ctrl-C
One GPU / several GPUs (bf16 autocast is chosen automatically):
    python trainer/train_pretrain.py --device cuda --preset small --batch_size 32 --learning_rate 5e-4 \\
        --data_path dataset/pretrain_hq.jsonl --max_seq_len 512
    torchrun --nproc_per_node 2 trainer/train_pretrain.py --preset small --batch_size 32 \\
        --learning_rate 5e-4 --data_path dataset/pretrain_hq.jsonl --max_seq_len 512
    (multi-GPU: build the token cache once first, e.g. python dataset/lm_dataset.py --data_path ... --mode pretrain)
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere

import argparse

from dataset.lm_dataset import PretrainDataset, collate_batch
from model.common import cleanup_distributed, run_main, setup_device
from model.model import TinyMindForCausalLM, get_config, save_model
from model.tokenizer import load_tokenizer
from trainer.resume import run_key, seed_everything, split_dataset
from trainer.train_loop import count_parameters, finish_run, train_loop
from trainer.trainer_utils import RunFiles, TrainConfig, add_common_args, check_tokenizer_fits, require_file


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="TinyMind pretraining (next-token prediction on packed text).")
    add_common_args(p, weight="pretrain", data_path="dataset/pretrain_demo.jsonl", preset="tiny",
                    epochs=1, batch_size=16, learning_rate=2e-3, max_seq_len=256)
    p.add_argument("--cache_dir", default=None,
                   help="where the tokenized data cache lives (default: dataset/.cache)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    tc = TrainConfig.from_args(args)
    ctx = setup_device(args.device, args.dtype)
    try:
        # Everything that can fail on user input happens before anything is written.
        data_path = require_file(args.data_path)
        tok = load_tokenizer(args.tokenizer_path)
        config = get_config(args.preset, hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers,
                            vocab_size=len(tok))
        check_tokenizer_fits(tok, config, args.max_seq_len, f"--preset {args.preset}")
        dataset = PretrainDataset(data_path, tok, args.max_seq_len, cache_dir=args.cache_dir,
                                  skip_bad_lines=bool(args.skip_bad_lines))
        train_set, val_set = split_dataset(dataset, args.val_ratio, args.seed)

        seed_everything(args.seed)  # the same initial weights on every rank
        model = TinyMindForCausalLM(config)
        total, _ = count_parameters(model)
        ctx.log(f"model: --preset {args.preset}, hidden {config.hidden_size}, {config.num_hidden_layers} layers, "
                f"{total / 1e6:.2f}M parameters, vocab {config.vocab_size}")
        files = RunFiles.for_run(args.save_dir, args.weight, config.hidden_size)
        metrics = train_loop(
            model, train_set, val_set, collate_batch, tc, ctx, files,
            save_weights=lambda m: save_model(m, files.weights, stage="pretrain", weight=args.weight),
            run=run_key(args, "pretrain", ctx), resume=bool(args.from_resume))
        return finish_run(metrics, ctx)
    finally:
        cleanup_distributed(ctx)


if __name__ == "__main__":
    run_main(main)
