"""trainer/heldout.py: the per-epoch held-out loss line and the plateau verdict that ends every stage.

The verdict is a pure function, tested at its boundaries here; the slow tests run train_pretrain.main on
the workspace's tiny corpus and check the lines in the log, the metrics, the resume file, and that a
Ctrl-C during the validation pass at an epoch's end does not lose that epoch.
"""
import re

import pytest

from conftest import quiet
from model.common import safe_load
from trainer import train_loop, train_pretrain, trainer_utils
from trainer.heldout import PLATEAU_DROP, epoch_line, nearer_middle, plateau_verdict, relative_change

# ------------------------------------------------------------------------------------------ the verdict


def test_threshold_is_two_percent_and_exactly_two_is_flat():
    assert PLATEAU_DROP == 0.02
    assert plateau_verdict([100.0, 98.0], 2) == "on its plateau (held-out loss -2.0% over the last epoch)"
    v = plateau_verdict([100.0, 97.9], 2)
    assert v.startswith("NOT on its plateau: held-out loss fell 2.1% over the last epoch (> 2%)")
    assert "more epochs or a larger learning rate would still pay" in v


def test_judged_over_the_last_epoch_only():
    # a steep start does not matter, the last epoch does; a rising loss is not "still falling"
    assert plateau_verdict([5.0, 2.0, 1.994], 3) == "on its plateau (held-out loss -0.3% over the last epoch)"
    assert plateau_verdict([2.0, 2.02], 2) == "on its plateau (held-out loss +1.0% over the last epoch)"
    assert plateau_verdict([2.0, 1.999, 1.9], 3).startswith("NOT on its plateau: held-out loss fell 5.0%")


def test_one_epoch_stage_compares_the_halves_of_its_epoch():
    assert plateau_verdict([2.0], 1, mid_loss=2.02) == (
        "on its plateau (held-out loss -1.0% over the second half of its only epoch)")
    assert plateau_verdict([2.0], 1, mid_loss=2.5).startswith(
        "NOT on its plateau: held-out loss fell 20.0% over the second half of its only epoch (> 2%)")
    assert "cannot be judged" in plateau_verdict([2.0], 1, mid_loss=None)


def test_no_heldout_set_and_runs_stopped_early():
    assert plateau_verdict(None, 3) == ("no held-out set (--val_ratio 0): whether it ended on its plateau "
                                        "cannot be judged")
    assert plateau_verdict([], 1).startswith("stopped early (--max_steps) before its first epoch ended")
    # --max_steps stopped a 4-epoch run in epoch 3: judged over epoch 2, and the line says so
    v = plateau_verdict([3.0, 2.5], 4)
    assert v.startswith("NOT on its plateau: held-out loss fell 16.7% over epoch 2, its last complete one")
    assert v.endswith("; --max_steps stopped it with 2 of 4 epochs complete")
    v = plateau_verdict([2.0], 3, mid_loss=2.01)
    assert v == ("on its plateau (held-out loss -0.5% over the second half of epoch 1); "
                 "--max_steps stopped it with 1 of 3 epochs complete")
    assert "cannot be judged" in plateau_verdict([2.0], 3) and "1 of 3 epochs" in plateau_verdict([2.0], 3)


def test_epoch_line_and_helpers():
    assert epoch_line([1.7061, 1.6412], 9) == "epoch 2/9 | held-out loss 1.6412 (-3.8% over the epoch)"
    assert epoch_line([2.5357], 1, mid_loss=3.1349) == (
        "epoch 1/1 | held-out loss 2.5357 (-19.1% over its second half)")
    assert epoch_line([2.0], 3) == "epoch 1/3 | held-out loss 2.0000"
    assert relative_change(2.0, 1.5) == -0.25 and relative_change(0.0, 1.0) == 0.0
    assert nearer_middle(3, -1, 10)              # the first pass is the nearest so far
    assert nearer_middle(5, 3, 10) and not nearer_middle(7, 5, 10)
    assert not nearer_middle(6, 4, 10)           # a tie keeps the earlier pass


# ------------------------------------------------------------------------------------------ in a run

def argv(ws: dict, save_dir, *extra) -> list[str]:
    return ["--preset", "smoke", "--data_path", ws["pre"], "--tokenizer_path", ws["tok"],
            "--cache_dir", ws["cache"], "--save_dir", str(save_dir), "--device", "cpu", "--max_seq_len", "32", "--batch_size", "8",
            "--learning_rate", "3e-3", "--log_interval", "5", "--eval_interval", "0", "--val_ratio", "0.05",
            *map(str, extra)]


def epoch_lines(log: str) -> list[tuple[str, str]]:
    return re.findall(r"^epoch (\d+/\d+) \| held-out loss (\d+\.\d{4})", log, re.M)


@pytest.mark.slow   # trains
def test_every_epoch_logs_its_heldout_loss_and_the_last_line_judges_the_plateau(ws, tmp_path):
    metrics, log = quiet(train_pretrain.main, argv(ws, tmp_path / "two", "--epochs", 2))
    per_epoch = metrics["epoch_val_losses"]
    assert epoch_lines(log) == [("1/2", f"{per_epoch[0]:.4f}"), ("2/2", f"{per_epoch[1]:.4f}")]
    assert re.search(r"^epoch 2/2 \| held-out loss \S+ \([-+]\d+\.\d% over the epoch\)$", log, re.M)
    last = log.strip().splitlines()[-1]
    assert last.startswith("done: ") and last.endswith(metrics["plateau"])
    assert metrics["plateau"] == plateau_verdict(per_epoch, 2)
    assert re.search(r" \| (NOT )?on its plateau", last)
    # the CSV has a validation row at each epoch's end, and the resume file keeps every epoch's loss
    rows = trainer_utils.read_csv_rows(tmp_path / "two" / "pretrain_64_log.csv")
    steps = metrics["steps"]
    assert [r["step"] for r in rows if r["val_loss"]] == [str(steps // 2), str(steps)]
    assert safe_load(tmp_path / "two" / "pretrain_64_resume.pth")["epoch_val_losses"] == per_epoch

    # one epoch (pretraining's default): a pass at its middle, and the verdict compares the halves
    metrics, log = quiet(train_pretrain.main, argv(ws, tmp_path / "one"))
    rows = trainer_utils.read_csv_rows(tmp_path / "one" / "pretrain_64_log.csv")
    assert [r["step"] for r in rows if r["val_loss"]] == [str(metrics["steps"] // 2), str(metrics["steps"])]
    assert re.search(r"^epoch 1/1 \| held-out loss \S+ \([-+]\d+\.\d% over its second half\)$", log, re.M)
    assert "over the second half of its only epoch" in log.strip().splitlines()[-1]


@pytest.mark.slow   # trains
def test_ctrl_c_during_the_epoch_end_pass_loses_no_epoch(ws, tmp_path, monkeypatch):
    straight, _ = quiet(train_pretrain.main, argv(ws, tmp_path / "straight", "--epochs", 2))
    real = train_loop.evaluate

    def interrupted(*a, **k):  # the first pass of the run is the one at the end of epoch 1
        raise KeyboardInterrupt

    monkeypatch.setattr(train_loop, "evaluate", interrupted)
    with pytest.raises(SystemExit):
        quiet(train_pretrain.main, argv(ws, tmp_path / "cut", "--epochs", 2))
    resume = safe_load(tmp_path / "cut" / "pretrain_64_resume.pth")
    assert resume["step"] == straight["steps"] // 2 and resume["epoch_val_losses"] == []
    monkeypatch.setattr(train_loop, "evaluate", real)
    resumed, log = quiet(train_pretrain.main, argv(ws, tmp_path / "cut", "--epochs", 2, "--from_resume", 1))
    assert [e for e, _ in epoch_lines(log)] == ["1/2", "2/2"]   # the lost pass is made again
    assert resumed["epoch_val_losses"] == straight["epoch_val_losses"]
    assert resumed["plateau"] == straight["plateau"]
