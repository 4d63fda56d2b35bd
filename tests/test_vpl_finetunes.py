"""bench/vpl_finetunes.py: the sign test and one person's duel, by hand; a missing run exits 2."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import vpl_finetunes as vf  # noqa: E402


def test_sign_test_by_hand():
    assert vf.sign_test(0, 0) == 1.0
    assert vf.sign_test(5, 0) == 2 / 32 == vf.sign_test(0, 5)
    assert vf.sign_test(9, 1) == pytest.approx(2 * (1 + 10) / 1024, abs=0)
    assert vf.sign_test(3, 3) == 1.0  # 2 * P(X <= 3 | n = 6) = 2 * 42/64 > 1: capped
    assert vf.sign_test(2, 4) == pytest.approx(2 * (1 + 6 + 15) / 64, abs=0)


def test_duel_counts_one_persons_answers_with_ties():
    own = torch.tensor([0.10, 0.10, 0.10, 0.10, 0.20])
    other = torch.tensor([0.05, 0.104, 0.096, 0.20, 0.195])  # win, tie (+0.004), tie (-0.004), loss, win (+0.005: not a tie)
    d = vf.duel(own, other)
    assert (d["wins"], d["losses"], d["ties"]) == (2, 1, 2)
    assert d["own_share"] == pytest.approx(2 / 3, abs=1e-4) and d["sign_test_p"] == 1.0


def test_missing_runs_exit_2_naming_the_folder(tmp_path, capsys):
    assert vf.main(["--runs", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path) in err and "alice, bob, carol" in err and "configs/refl/vpl_shapes.yaml" in err
