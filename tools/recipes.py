"""The training recipes of the demo chain: each preset's flags for every stage, on top of the scripts' own
defaults.

``ORDER`` is the chain's stages in the order they run; ``STAGES[preset][stage]`` is the list of flags scripts/run_pipeline.py passes to that stage's script
(pretrain, sft, lora_identity, lora_medical, eval); dev/lora_experiments.py starts every adapter of its
sweeps from the same recipe, so that the experiments measure the model the pipeline trains.
"""
from __future__ import annotations

ORDER = ("pretrain", "sft", "lora_identity", "lora_medical", "eval")

# Per-preset flags on top of each script's defaults. The defaults are the `tiny` demo recipe, so `tiny`
# adds nothing but the medical adapter's recipe: a new 62-row table keyed on 62 one-token condition
# names needs more passes than a new name, a larger step with some weight decay, and a LoRA on the token
# embedding, which gives each name trainable numbers of its own (docs/04-lora.md); it sits on attention +
# embedding only, so that it adds to the identity adapter (on every linear layer) with little interference.
MEDICAL_TARGETS = "q_proj,k_proj,v_proj,o_proj,embed_tokens"
STAGES = {
    "tiny": {"pretrain": [], "sft": [], "lora_identity": [],
             "lora_medical": ["--epochs", "9", "--learning_rate", "7e-3", "--weight_decay", "0.1",
                              "--lora_targets", MEDICAL_TARGETS],
             "eval": []},
    "smoke": {
        "pretrain": ["--max_steps", "40", "--batch_size", "8", "--max_seq_len", "128",
                     "--learning_rate", "3e-3"],
        "sft": ["--max_steps", "30", "--batch_size", "8", "--max_seq_len", "128", "--learning_rate", "2e-3"],
        "lora_identity": ["--max_steps", "15", "--batch_size", "8", "--max_seq_len", "128",
                          "--learning_rate", "3e-3", "--lora_rank", "4", "--lora_alpha", "8"],
        "lora_medical": ["--max_steps", "15", "--batch_size", "8", "--max_seq_len", "128",
                         "--learning_rate", "3e-3", "--lora_rank", "4", "--lora_alpha", "8"],
        "eval": ["--limit", "16", "--max_new_tokens", "24"],
    },
}
