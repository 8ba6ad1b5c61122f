"""dev/fact_recall.py: teacher-forced recall of the demo world's facts."""
from types import SimpleNamespace

import torch

from conftest import dev_script
from dataset.demo.world import build_world
from model.model import TinyMindForCausalLM, get_config, save_model

R = dev_script("fact_recall")


class Oracle(torch.nn.Module):
    """Predicts ``target`` at every position: the token after position i is target[i + 1]."""

    def __init__(self, target: list[int], vocab: int):
        super().__init__()
        self.target, self.vocab = target, vocab

    def forward(self, ids):
        logits = torch.zeros(1, ids.shape[1], self.vocab)
        for i in range(ids.shape[1] - 1):
            logits[0, i, self.target[i + 1]] = 1.0
        return SimpleNamespace(logits=logits)


def test_phrasings_end_with_the_value():
    facts = [f for f in build_world(R.DATA_SEED).facts if f.category == "person"]
    pairs = [(f, pq) for f in facts for pq in R.value_last_prompts(f)]
    assert len(pairs) > len(facts)   # most facts have several value-last phrasings
    for f, (prefix, value) in pairs:
        assert f.subject in prefix and value == f.render("{v}")
        assert f.render(next(t for t in f.attr.statements if f.render(t) == prefix + value + "。"))


def test_recalled_needs_every_value_token(tok):
    ids, start = R.value_span(tok, "唐书瑶的职业是", "记者")
    assert 1 < start < len(ids)
    assert R.recalled(Oracle(ids, len(tok)), ids, start)
    wrong = ids[:-1] + [(ids[-1] + 1) % len(tok)]   # the last value token differs
    assert not R.recalled(Oracle(wrong, len(tok)), ids, start)
    assert R.recalled(Oracle(wrong, len(tok)), ids[:-1] + [wrong[-1]], start)


def test_main_reports_both_splits(tmp_path, capsys):
    torch.manual_seed(0)
    save_model(TinyMindForCausalLM(get_config("smoke")), tmp_path / "pretrain_64.pth", stage="pretrain")
    table = R.main(["--save_dir", str(tmp_path)])
    assert set(table["split"]) == {"train", "pretrain_only"}
    n_facts = sum(n for _, n in table["split"].values())
    assert n_facts == sum(n for _, n in table["attr"].values()) > 100
    assert all(0 <= ok <= n for ok, n in table["split"].values())
    assert "| pretrain_only | all |" in capsys.readouterr().out
