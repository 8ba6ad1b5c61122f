"""trainer/watch.py (greedy replies at every validation pass), and LoRA+ (model/lora_variants/lora_plus.py) as the
demo recipe would use it.

- the watched replies appear before training and after each validation pass, for prompts from the flag,
  from held-out validation samples ("auto" on other data), or not at all ("none");
- the demo prompts are held out: questions of dataset/eval/, never a user turn of a training file;
- LoRA+: every B matrix sits in a group whose lr is ``ratio`` times A's, and one AdamW step moves B that
  much further than A.
"""
import json
import re

import pytest
import torch

from conftest import lora_model, quiet, with_base
from model.common import ROOT
from model.tokenizer import load_tokenizer
from trainer import train_lora
from trainer.train_loop import set_lr
from trainer.watch import DEMO_PROMPTS, watch_prompts
from model.lora_variants.lora_plus import make_loraplus_optimizer


@pytest.fixture(scope="module")
def save_dir(ws, tmp_path_factory):
    """The folder the watched LoRA runs train in, with the workspace's smoke full_sft."""
    return with_base(ws, tmp_path_factory.mktemp("watch"))


def run_lora(ws, save_dir, *extra):
    argv = ["--data_path", ws["sft"], "--tokenizer_path", ws["tok"], "--save_dir", str(save_dir),
            "--device", "cpu", "--max_seq_len", "64", "--batch_size", "8", "--lora_rank", "4",
            "--log_interval", "2", "--val_ratio", "0.1", *map(str, extra)]
    return quiet(train_lora.main, argv)[1]


@pytest.mark.slow   # trains
def test_watch_prints_replies_at_start_and_each_validation(ws, save_dir):
    log = run_lora(ws, save_dir, "--max_steps", 4, "--eval_interval", 2,
                   "--watch_prompts", "who are you?|count to three")
    steps = re.findall(r"watch \| step (\d+) \| (.*?) -> ", log)
    assert steps == [(s, p) for s in ("0", "2", "4") for p in ("who are you?", "count to three")]


@pytest.mark.slow   # trains
def test_watch_auto_uses_heldout_samples_and_none_is_silent(ws, save_dir):
    log = run_lora(ws, save_dir, "--max_steps", 2, "--eval_interval", 0)
    prompts = re.findall(r"watch \| step 2 \| (.*?) -> ", log)
    questions = {"who are you?", "what color is the sky?", "count to three"}
    assert len(prompts) == 2 and set(prompts) <= questions   # user turns of validation samples
    assert "watch |" not in run_lora(ws, save_dir, "--max_steps", 2, "--eval_interval", 0, "--watch_prompts", "none")


def test_val_prompt_is_the_chat_up_to_the_reply(ws):
    from dataset.lm_dataset import SFTDataset
    tok = load_tokenizer(ws["tok"])
    data = SFTDataset(ws["sft"], tok, 64)
    (label, ids), = watch_prompts("auto", ws["sft"], tok, data, n_from_val=1)
    assert tok.decode(ids, skip_special_tokens=False).endswith("<|im_start|>assistant\n")
    assert label in {"who are you?", "what color is the sky?", "count to three"}


def test_demo_prompts_are_held_out():
    evals = {json.loads(line)["question"] for name in ("general_qa", "identity", "medical_qa")
             for line in (ROOT / "dataset/eval" / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()}
    users = set()
    for name in ("sft_demo", "lora_identity", "lora_medical"):
        for line in (ROOT / "dataset" / f"{name}.jsonl").read_text(encoding="utf-8").splitlines():
            users |= {m["content"] for m in json.loads(line)["conversations"] if m["role"] == "user"}
    for file, prompts in DEMO_PROMPTS.items():
        assert (ROOT / "dataset" / file).exists()
        for p in prompts:
            assert p in evals and p not in users, p


def test_loraplus_groups_and_step_sizes():
    model = lora_model(alpha=8.0)   # a random (non-zero) B, so A receives a gradient too
    opt = make_loraplus_optimizer(16)(model, 1e-3, 0.0)
    scale = {id(p): g["lr_scale"] for g in opt.param_groups for p in g["params"]}
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert named and all(scale[id(p)] == (16.0 if ".lora_B." in n else 1.0) for n, p in named.items())
    set_lr(opt, 1e-3)   # what the loop does before every step
    before = {n: p.detach().clone() for n, p in named.items()}
    x = torch.randint(3, 300, (2, 16))
    model(x, labels=x).loss.backward()
    opt.step()
    # Adam's first step moves every element with a gradient by about its lr: 1e-3 for A, 16e-3 for B.
    moved_a = max((p - before[n]).abs().max().item() for n, p in named.items() if ".lora_A." in n)
    moved_b = max((p - before[n]).abs().max().item() for n, p in named.items() if ".lora_B." in n)
    assert moved_a == pytest.approx(1e-3, rel=0.05) and moved_b == pytest.approx(16e-3, rel=0.05)
    with pytest.raises(Exception, match="loraplus_lr_ratio"):
        make_loraplus_optimizer(0)


@pytest.mark.slow   # trains
def test_loraplus_flag_trains(ws, save_dir):
    log = run_lora(ws, save_dir, "--max_steps", 2, "--eval_interval", 0, "--watch_prompts", "none",
                   "--lora_variant", "lora_plus", "--loraplus_lr_ratio", 16)
    assert "variant lora_plus {'loraplus_lr_ratio': 16.0}" in log and "done: 2 steps" in log
