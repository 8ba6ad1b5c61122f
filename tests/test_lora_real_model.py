"""The pipeline of docs/08-lora-on-real-models.md on a tiny random transformers Llama folder (nothing is
downloaded): import it, train a LoRA through train_lora.py (fp32 and bf16 base), export to PEFT, and the
adapter loaded with ``PeftModel.from_pretrained`` on the transformers model gives TinyMind's logits; the
merged export gives them too. The English identity set of dataset/demo/persona_en.py trains it.
"""
from pathlib import Path

import pytest
import torch
from conftest import logits, quiet

from model.model import load_model
from model.model_lora import load_lora
from scripts import convert_model
from trainer import train_lora

ROOT = Path(__file__).resolve().parents[1]
IDS = torch.randint(3, 6400, (2, 11), generator=torch.Generator().manual_seed(0))


def tiny_llama_folder(transformers, folder: Path) -> Path:
    """A random LlamaForCausalLM written with save_pretrained: what a learner's download looks like (the
    shipped TinyMind tokenizer's 6400 ids, tied embeddings, GQA)."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=6400, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():   # non-trivial norms: a dropped or misplaced norm changes the logits
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(folder)
    return folder


@pytest.mark.slow   # trains
@pytest.mark.parametrize("base_dtype", ["float32", "bfloat16"])
def test_tinymind_lora_on_an_imported_model_loads_in_peft_with_equal_logits(tmp_path, base_dtype):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    hf = tiny_llama_folder(transformers, tmp_path / "download")
    out = tmp_path / "out"
    quiet(convert_model.main, ["--from", "hf", "--in", str(hf), "--weight", "real", "--save_dir", str(out)])
    metrics, log = quiet(train_lora.main, [
        "--from_weight", "real", "--data_path", str(ROOT / "dataset/lora_identity_en.jsonl"),
        "--save_dir", str(out), "--lora_name", "lora_me", "--device", "cpu", "--max_steps", "3",
        "--batch_size", "4", "--max_seq_len", "64", "--learning_rate", "1e-2", "--lora_rank", "4",
        "--lora_alpha", "8", "--eval_interval", "0", "--val_ratio", "0", "--watch_prompts", "none",
        "--base_dtype", base_dtype, "--grad_checkpoint", "1", "--head_chunk", "16"])
    assert metrics["steps"] == 3 and f"frozen base in {base_dtype}" in log
    # TinyMind's own view: the fp32 base with the trained adapter (the file checks it belongs to this base)
    model, _ = load_model(out / "real_64.pth")
    base = logits(model, IDS)
    load_lora(model, out / "lora_me_64.pth")
    ours = logits(model, IDS)
    assert not torch.allclose(ours, base, atol=1e-4)   # the adapter trained: B is no longer zero
    # PEFT on the transformers model the learner downloaded
    quiet(convert_model.main, ["--weight", "real", "--lora_weight", "lora_me", "--to", "peft",
                               "--out", str(tmp_path / "peft"), "--save_dir", str(out)])
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf).float().eval()
    torch.testing.assert_close(logits(hf_model, IDS), base, atol=1e-4, rtol=1e-4)
    peft_model = peft.PeftModel.from_pretrained(hf_model, tmp_path / "peft").eval()
    torch.testing.assert_close(logits(peft_model, IDS), ours, atol=1e-4, rtol=1e-4)
    # merged into the weights (in fp32) and exported as a plain transformers folder
    quiet(convert_model.main, ["--weight", "real", "--lora_weight", "lora_me", "--to", "hf",
                               "--out", str(tmp_path / "merged"), "--save_dir", str(out)])
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").float().eval()
    torch.testing.assert_close(logits(merged, IDS), ours, atol=1e-4, rtol=1e-4)
