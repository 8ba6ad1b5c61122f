"""Watch a model learn: its greedy replies to a few fixed held-out prompts, at every validation pass.

What this file implements:
- ``WatchReplies``: a ``TrainHook`` that prints ``watch | step N | prompt -> reply`` for each prompt
  before the first step and after every validation pass, so the log shows an answer going from wrong
  to right (and, for an adapter, whether a question the base model knew is still answered).
- ``DEMO_PROMPTS``: the prompts watched on the shipped demo files (taken from dataset/eval/, so never
  trained on; tests/test_watch.py checks that none is a training prompt).
- ``add_watch_flag`` / ``watch_prompts``: the ``--watch_prompts`` flag, and the prompts it names as
  token ids.

    --watch_prompts auto                      # the default: DEMO_PROMPTS for a shipped file, otherwise
                                              # the first user turn of two held-out validation samples
    --watch_prompts "感冒应该挂什么科？|熊猫爱吃什么？"    # your own prompts, separated by |
    --watch_prompts none                      # watch nothing

On a base of 100M+ parameters (a released model, docs/08-lora-on-real-models.md) ``auto`` watches
nothing: each reply is decoded token by token through the live (unmerged) adapters, about one forward
pass of the whole model per token, so three 40-token replies cost as much as a few training steps of
1,000 tokens at every validation pass. Named prompts are still watched there; the log says which.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from model.engine import encode_chat, greedy_replies
from model.train_hook import TrainHook

# Held-out questions from dataset/eval/ per shipped training file: what the data teaches, plus (for
# the adapters) a general question the SFT model answers, to see whether the adapter keeps it.
DEMO_PROMPTS = {
    "sft_demo.jsonl": ("请问唐书瑶的职业是什么？", "你知道元宵节的传统食物吗？", "你好，怎么称呼你？"),
    "lora_identity.jsonl": ("你好，怎么称呼你？", "请问谁创造了你？", "你知道元宵节的传统食物吗？"),
    "lora_medical.jsonl": ("看感冒应该挂哪个科室？", "中耳炎的症状是什么？", "你知道元宵节的传统食物吗？"),
}
MAX_NEW_TOKENS = 40  # the demo answers are one short sentence
AUTO_MAX_PARAMS = 100_000_000  # --watch_prompts auto watches nothing on a base this large (see above)


def add_watch_flag(parser) -> None:
    """``--watch_prompts`` for train_sft.py and train_lora.py."""
    parser.add_argument("--watch_prompts", default="auto",
                        help="prompts whose greedy replies are printed before training and at every validation "
                             "pass: 'auto' (fixed held-out questions for the shipped demo files, otherwise two "
                             "held-out validation prompts; nothing on a base of 100M+ parameters), 'none', or your own "
                             "prompts separated by | (default: auto)")


def auto_watch_off(flag: str, n_params: int) -> bool:
    """Whether ``--watch_prompts auto`` watches nothing because the model has ``AUTO_MAX_PARAMS`` or more."""
    return (flag or "").strip().lower() == "auto" and n_params >= AUTO_MAX_PARAMS


def watch_prompts(flag: str, data_path, tok, val_set=None, n_from_val: int = 2,
                  n_params: int = 0) -> list[tuple[str, list[int]]]:
    """(label, prompt token ids) for each prompt to watch.

    flag: "none" / "" (nothing), "auto" (``DEMO_PROMPTS`` for a shipped file, otherwise the first user
        turn of ``n_from_val`` held-out validation samples, system turn included; nothing for a model of
        ``n_params`` >= ``AUTO_MAX_PARAMS``), or prompts joined by "|".
    val_set: items (input_ids, labels); a sample's prompt is everything before its first trained token.
    """
    flag = (flag or "").strip()
    if flag.lower() in ("", "none", "0") or auto_watch_off(flag, n_params):
        return []
    if flag.lower() == "auto":
        demo = DEMO_PROMPTS.get(Path(data_path).name)
        if demo is None:
            return [(_label(tok, ids), ids) for ids in _val_prompts(val_set, n_from_val)]
        prompts = list(demo)
    else:
        prompts = [p.strip() for p in flag.split("|") if p.strip()]
    return [(p, encode_chat(tok, [{"role": "user", "content": p}])) for p in prompts]


def _val_prompts(val_set, n: int) -> list[list[int]]:
    """The prompt part (up to the first label that is not -100) of the first ``n`` validation samples."""
    out = []
    for i in range(len(val_set) if val_set is not None else 0):
        input_ids, labels = val_set[i][:2]
        trained = (torch.as_tensor(labels) != -100).nonzero()
        if len(trained) == 0:
            continue
        # A trained token has labels[t] == input_ids[t] (the model shifts by one), so [0, t) is the prompt.
        first = int(trained[0])
        out.append(torch.as_tensor(input_ids)[:first].tolist())
        if len(out) == n:
            break
    return out


def _label(tok, ids: list[int]) -> str:
    """The last user turn of a ChatML prompt, for the log line."""
    text = tok.decode(ids, skip_special_tokens=False)
    user = text.rsplit("<|im_start|>user\n", 1)[-1]
    return user.split("<|im_end|>", 1)[0].strip()


class WatchReplies(TrainHook):
    """Print the model's greedy reply to each watched prompt before training and after each validation."""

    def __init__(self, prompts: list[tuple[str, list[int]]], tok, log=print, enabled: bool = True,
                 max_new_tokens: int = MAX_NEW_TOKENS):
        self.prompts, self.tok, self.log = prompts, tok, log
        self.enabled = enabled and bool(prompts)  # under DDP only rank 0 generates and prints
        self.max_new_tokens = max_new_tokens

    def on_train_start(self, model: nn.Module, optimizer, total_steps: int) -> None:
        self.show(model, 0)

    def at_validation(self, model: nn.Module, step: int, val_loss: float | None) -> None:
        self.show(model, step)

    def replies(self, model: nn.Module) -> list[str]:
        """Greedy replies, one prompt at a time (a handful of prompts: no batching needed), in eval mode
        (dropout off, as in chat); the model goes back to training mode afterwards."""
        return greedy_replies(model, self.tok, [ids for _, ids in self.prompts], self.max_new_tokens)

    def show(self, model: nn.Module, step: int) -> None:
        if not self.enabled:
            return
        for (label, _), reply in zip(self.prompts, self.replies(model)):
            self.log(f"watch | step {step} | {label} -> {reply}")
