"""dev/embedding_health.py: the collapse measure on a hand-made embedding and on a saved checkpoint."""
import torch

from conftest import dev_script
from model.model import TinyMindForCausalLM, get_config, save_model

H = dev_script("embedding_health")


def test_max_cosine_finds_collapsed_rows():
    torch.manual_seed(0)
    emb = torch.randn(50, 16)
    emb[7] = 3.0 * emb[3] + 0.01 * torch.randn(16)   # row 7 points where row 3 points
    cos = H.max_cosine(emb, [3, 7, 10])
    assert cos[0] > 0.99 and cos[1] > 0.99   # each finds the other
    assert cos[2] < 0.9                       # a random row in 16 dims is far from all others
    assert torch.equal(H.max_cosine(emb, [10]), cos[2:])


def test_main_reports_every_group(tmp_path, capsys):
    torch.manual_seed(0)
    model = TinyMindForCausalLM(get_config("smoke"))
    save_model(model, tmp_path / "full_sft_64.pth", stage="sft")
    rows = H.main(["--save_dir", str(tmp_path)])
    assert [r["group"] for r in rows] == list(H.word_groups())
    for r in rows:
        assert r["tokens"] >= 1 and 0.0 <= r["collapsed"] <= 1.0 and -1.0 <= r["median_max_cos"] <= 1.0
    # a freshly initialised model has no collapse: random rows in 64 dims are far apart
    assert all(r["collapsed"] == 0.0 for r in rows)
    assert "| condition names |" in capsys.readouterr().out


def test_out_writes_the_rows_the_docs_quote(tmp_path):
    """--out: the same rows as JSON, each with its short id (docs/06's table reads rows/id=.../...),
    plus the checkpoint's fingerprint and the command."""
    import json

    from model.model import state_fingerprint

    torch.manual_seed(0)
    model = TinyMindForCausalLM(get_config("smoke"))
    save_model(model, tmp_path / "full_sft_64.pth", stage="sft")
    out = tmp_path / "health.json"
    rows = H.main(["--save_dir", str(tmp_path), "--out", str(out)])
    data = json.loads(out.read_text(encoding="utf-8"))
    assert data["rows"] == rows and [r["id"] for r in rows] == list(H.GROUP_IDS.values())
    assert data["checkpoint"] == "full_sft_64.pth" and data["fingerprint"] == state_fingerprint(model.state_dict())
    assert data["command"].startswith("python dev/embedding_health.py --save_dir")
