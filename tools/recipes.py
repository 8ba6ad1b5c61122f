"""The training recipes of the demo chain: each preset's flags for every stage, on top of the scripts' own
defaults.

``ORDER`` is the chain's stages in the order they run; ``STAGES[preset][stage]`` is the list of flags
scripts/run_pipeline.py passes to that stage's script (pretrain, sft, lora_identity, lora_medical, eval).
dev/lora_experiments.py starts from the SFT model this recipe trains and keeps the previous adapter
recipe (its ``EXPERIMENT_STAGES``), so that its experiments stay comparable with one another.
"""
from __future__ import annotations

ORDER = ("pretrain", "sft", "lora_identity", "lora_medical", "eval")

# Per-preset flags on top of each script's defaults. The defaults are a plain recipe (AdamW everywhere);
# `tiny`, the demo, changes three stages, each measured over seeds 42, 1 and 2
# (docs/results/lora_effect_levers.md):
# - pretraining with Muon on the hidden matrices (trainer/optim.py): the same 186 steps end at held-out
#   loss ~1.6 instead of ~2.8, and the adapters built on that model are far less seed-dependent;
# - the identity adapter: 8 epochs instead of train_lora.py's 4 (its held-out loss still falls in the last
#   epoch, but the persona is learned): at 4 the persona's sentences were still garbled on two seeds of
#   three, and added to the medical adapter it lost the name;
# - the medical adapter: a new 62-row table keyed on 62 one-token condition names needs many passes
#   (16 epochs), some weight decay, a LoRA on the token embedding, which gives each name trainable numbers
#   of its own, and on the MLP as well as attention: the symptoms (several multi-token words per
#   condition) are a larger table than the departments, and attention alone learns under half of them.
MEDICAL_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,embed_tokens"
STAGES = {
    "tiny": {"pretrain": ["--optimizer", "muon", "--learning_rate", "4e-3"], "sft": [],
             "lora_identity": ["--epochs", "8"],
             "lora_medical": ["--epochs", "16", "--learning_rate", "5e-3", "--weight_decay", "0.1",
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
