"""VPL (rewards/vpl.py): the ELBO's terms on fixed tensors, the context encoder's invariance,
context sampling, training on a tiny two-person problem, save / load through rewards.load,
the preference-file reader, the simulated shapes people and the CLI's errors."""
from __future__ import annotations

import json
import math
import pytest
import torch

import rewards
from rewards.base import RewardError
from rewards.vpl import (ContextEncoder, PairSet, VPLModel, anneal, elbo_loss, kl_standard_normal, read_model,
                         read_preferences, rescale_latent, sample_contexts, save_model, train_vpl, user_latent)


def test_kl_closed_form_by_hand():
    mu = torch.tensor([[0.5, -1.0], [0.0, 0.0]])
    logvar = torch.tensor([[math.log(2.0), 0.0], [0.0, 0.0]])
    # row 0: 0.5 * [(0.25 + 2 - 1 - ln 2) + (1 + 1 - 1 - 0)] ; row 1: standard normal -> 0
    want0 = 0.5 * ((0.25 + 2.0 - 1.0 - math.log(2.0)) + 1.0)
    got = kl_standard_normal(mu, logvar)
    assert got.tolist() == pytest.approx([want0, 0.0], abs=1e-6)


def test_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros(3), torch.ones(3))
    want = torch.distributions.kl_divergence(q, p).sum(-1)
    assert torch.allclose(kl_standard_normal(mu, logvar), want, atol=1e-5)


def test_elbo_terms_by_hand():
    rc, rr = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    mu, logvar = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]])
    t = elbo_loss(rc, rr, mu, logvar, beta=0.1)
    nll = (math.log(1 + math.exp(-1.0)) + math.log(1 + math.exp(1.0))) / 2  # -log sigmoid(+1), -log sigmoid(-1)
    assert float(t["nll"]) == pytest.approx(nll, abs=1e-6)
    assert float(t["kl"]) == pytest.approx(0.5, abs=1e-6)  # 0.5 * mu^2 with unit variance
    assert float(t["loss"]) == pytest.approx(nll + 0.1 * 0.5, abs=1e-6)
    plain = elbo_loss(rc, rr, None, None, beta=0.1)
    assert float(plain["kl"]) == 0.0 and float(plain["loss"]) == pytest.approx(nll, abs=1e-6)


def test_anneal_cosine_cycle():
    assert anneal(0, 100) == pytest.approx(0.1)  # baseline at the start of a cycle
    assert anneal(50, 100) == pytest.approx(0.1 + 0.9 * 0.5)  # (cos(-pi/2) + 1) / 2 = 0.5
    assert anneal(99, 100) == pytest.approx(0.1 + 0.9 * (math.cos(math.pi * (0.99 - 1)) + 1) / 2)
    assert anneal(100, 100) == pytest.approx(0.1)  # cyclical
    assert anneal(7, 0) == 1.0


def test_rescale_latent_norm():
    z = rescale_latent(torch.tensor([[3.0, 4.0, 0.0, 0.0]]))
    assert z.tolist()[0] == pytest.approx([1.2, 1.6, 0.0, 0.0])  # norm sqrt(4) = 2


def test_context_encoder_permutation_invariant_and_masked():
    torch.manual_seed(0)
    enc = ContextEncoder(4)
    x = torch.randn(1, 5, 4)
    m = torch.ones(1, 5, dtype=torch.bool)
    mu, lv = enc(x, m)
    perm = torch.tensor([3, 0, 4, 1, 2])
    mu2, lv2 = enc(x[:, perm], m)
    assert torch.allclose(mu, mu2, atol=1e-6) and torch.allclose(lv, lv2, atol=1e-6)
    # padding rows (mask false) change nothing: 5 real pairs + 3 junk rows
    xp = torch.cat([x, 100 * torch.randn(1, 3, 4)], 1)
    mp = torch.cat([m, torch.zeros(1, 3, dtype=torch.bool)], 1)
    mu3, _ = enc(xp, mp)
    assert torch.allclose(mu, mu3, atol=1e-5)
    # and a different context gives a different posterior
    mu4, _ = enc(x[:, :2], m[:, :2])
    assert not torch.allclose(mu, mu4, atol=1e-3)


def test_sample_contexts_same_user_without_target():
    pairs = PairSet(torch.arange(10), torch.arange(10) + 10, torch.tensor([0] * 6 + [1] * 4), ["a", "b"])
    g = torch.Generator().manual_seed(0)
    targets = torch.tensor([0, 7, 9, 2])
    idx, mask = sample_contexts(pairs, targets, 5, g)
    for t, row, m in zip(targets.tolist(), idx, mask):
        got = row[m].tolist()
        assert 2 <= len(got) <= 5 and t not in got and len(set(got)) == len(got)
        assert {int(pairs.user[i]) for i in got} == {int(pairs.user[t])}
    # user b has 3 other pairs: never more than 3
    idx, mask = sample_contexts(pairs, torch.tensor([9] * 20), 8, g)
    assert int(mask.sum(1).max()) == 3


def _two_people(n=120, d=6, pairs_each=150, seed=0):
    """Features whose dim 0 person a likes and dim 1 person b likes."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, d, generator=g)
    ch, rj, us = [], [], []
    for u, dim in ((0, 0), (1, 1)):
        for _ in range(pairs_each):
            i, j = torch.randint(0, n, (2,), generator=g).tolist()
            if i == j:
                continue
            w, l = (i, j) if feats[i, dim] > feats[j, dim] else (j, i)
            ch.append(w), rj.append(l), us.append(u)
    return feats, PairSet(torch.tensor(ch), torch.tensor(rj), torch.tensor(us), ["a", "b"])


def _acc(model, feats, pairs, u, z):
    i = pairs.of(u)
    with torch.no_grad():
        d = model.reward(feats[pairs.chosen[i]], z) - model.reward(feats[pairs.rejected[i]], z)
    return float((d > 0).float().mean())


def test_training_lowers_the_negative_elbo():
    feats, pairs = _two_people(pairs_each=60)
    _, hist = train_vpl(feats, pairs, latent_dim=2, hidden=8, steps=40, batch_size=16, lr=1e-2, anneal_steps=0)
    assert hist[-1]["nll"] < hist[0]["nll"] - 0.1 and hist[0]["kl"] > 0


@pytest.mark.slow
def test_vpl_separates_two_people_where_pooled_bt_cannot():
    feats, pairs = _two_people()
    vpl, hist = train_vpl(feats, pairs, latent_dim=2, hidden=16, steps=300, batch_size=32, lr=1e-2, anneal_steps=50)
    bt, _ = train_vpl(feats, pairs, latent_dim=0, hidden=16, steps=300, batch_size=32, lr=1e-2)
    assert hist[-1]["nll"] < hist[0]["nll"]
    za = user_latent(vpl, feats[pairs.chosen[pairs.of(0)]], feats[pairs.rejected[pairs.of(0)]])
    zb = user_latent(vpl, feats[pairs.chosen[pairs.of(1)]], feats[pairs.rejected[pairs.of(1)]])
    a_own, b_own = _acc(vpl, feats, pairs, 0, za), _acc(vpl, feats, pairs, 1, zb)
    assert a_own > 0.9 and b_own > 0.9
    # swapped latents: each person's answers are predicted by their own z, not the other's
    assert _acc(vpl, feats, pairs, 0, zb) < a_own - 0.2
    # one pooled model cannot serve two independent tastes as well
    assert min(_acc(bt, feats, pairs, 0, None), _acc(bt, feats, pairs, 1, None)) < min(a_own, b_own) - 0.05


def _write_prefs(tmp_path, n_images=12):
    from rewards.images import to_pil

    g = torch.Generator().manual_seed(0)
    imgs = torch.rand(n_images, 3, 32, 32, generator=g)
    (tmp_path / "img").mkdir()
    for i, x in enumerate(imgs):
        to_pil(x[None])[0].save(tmp_path / "img" / f"{i}.png")
    recs = [{"prompt": "a red circle", "chosen": {"image": f"img/{i}.png"}, "rejected": {"image": f"img/{i + 1}.png"}, "user": "alice"} for i in range(0, 6)]
    recs += [{"prompt": "a red circle", "items": [{"image": f"img/{i}.png"} for i in (6, 7, 8)], "ranks": [2, 1, 3], "annotator": "bob"}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return tmp_path / "p.jsonl", imgs


def test_read_preferences_pairs_ranks_and_user(tmp_path):
    f, _ = _write_prefs(tmp_path)
    recs = read_preferences(f)
    assert len(recs) == 6 + 3  # 6 pairs + the ranked group's 3 ordered pairs
    assert [r["user"] for r in recs] == ["alice"] * 6 + ["bob"] * 3  # "annotator" when there is no "user"
    bob = [(r["chosen"].split("/")[-1], r["rejected"].split("/")[-1]) for r in recs[6:]]
    assert sorted(bob) == sorted([("7.png", "6.png"), ("7.png", "8.png"), ("6.png", "8.png")])
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x", "chosen": {"latent_seed": 1}, "rejected": {"image": "img/0.png"}}\n')
    with pytest.raises(RewardError, match=r"bad.jsonl line 1: every item needs an image"):
        read_preferences(tmp_path / "bad.jsonl")


def test_save_load_roundtrip_through_rewards_load(tmp_path):
    from rewards.itercomp_rm import load_backbone

    f, imgs = _write_prefs(tmp_path)
    spec = {"kind": "shapes", "which": "judge"}
    feats = load_backbone(spec).image_embeddings(imgs).float()
    model = VPLModel(feats.shape[1], latent_dim=3, hidden=8)
    model.fit_features(feats)
    za = torch.tensor([1.0, -1.0, 0.5])
    save_model(tmp_path / "m", model, spec, False, {"alice": za}, feats[:8], {"note": 1})
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert manifest["users"] == ["alice"] and manifest["model"]["latent_dim"] == 3 and manifest["weights"] == "vpl_rm.safetensors"
    back = read_model(tmp_path / "m" / "vpl_rm.safetensors")
    assert torch.equal(back["latents"]["alice"], za)
    r = rewards.load("vpl", path=str(tmp_path / "m"), user="alice", cache=False)
    with torch.no_grad():
        raw = model.reward(feats, za)
        ref = model.reward(feats[:8], za)
    want = (raw - ref.mean()) / ref.std()
    assert torch.allclose(r(imgs), want, atol=1e-5)
    # gradients reach the pixels
    x = imgs[:2].clone().requires_grad_(True)
    r(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # z given directly is the same reward
    rz = rewards.load("vpl", path=str(tmp_path / "m"), z=za.tolist(), cache=False)
    assert torch.allclose(rz(imgs), want, atol=1e-5)
    # a newcomer's answers: the latent is the rescaled posterior mean of their pairs
    rc = rewards.load("vpl", path=str(tmp_path / "m"), context=str(f), cache=False)
    recs = read_preferences(f)
    from rewards.images import load_image
    fc = load_backbone(spec).image_embeddings(torch.stack([load_image(x["chosen"]) for x in recs])).float()
    fr = load_backbone(spec).image_embeddings(torch.stack([load_image(x["rejected"]) for x in recs])).float()
    assert torch.allclose(rc.z, user_latent(model, fc, fr), atol=1e-5)


def test_load_errors(tmp_path):
    spec = {"kind": "shapes", "which": "judge"}
    model = VPLModel(144, latent_dim=2, hidden=4)
    save_model(tmp_path / "m", model, spec, False, {"alice": torch.zeros(2)}, torch.zeros(3, 144))
    with pytest.raises(RewardError, match=r"user 'carol' is not in .*its users: alice"):
        rewards.load("vpl", path=str(tmp_path / "m"), user="carol", cache=False)
    with pytest.raises(RewardError, match=r"say whose reward"):
        rewards.load("vpl", path=str(tmp_path / "m"), cache=False)
    with pytest.raises(RewardError, match=r"give one of user, context, z"):
        rewards.load("vpl", path=str(tmp_path / "m"), user="alice", z=[0, 0], cache=False)
    with pytest.raises(RewardError, match=r"z must be 2 numbers"):
        rewards.load("vpl", path=str(tmp_path / "m"), z=[0, 0, 0], cache=False)
    with pytest.raises(RewardError, match=r"no reward model at"):
        rewards.load("vpl", path=str(tmp_path / "nope"), user="a", cache=False)


def test_shapes_people_utilities():
    from rewards.shapes_people import prefers, utility

    img = torch.full((1, 3, 4, 4), 0.9)  # light grey background
    img[0, :, 0, 0] = torch.tensor([0.9, 0.1, 0.1])  # one red pixel
    img[0, :, 0, 1] = torch.tensor([0.1, 0.25, 0.9])  # two blue pixels
    img[0, :, 1, 1] = torch.tensor([0.1, 0.25, 0.9])
    img[0, :, 2, 2] = torch.tensor([0.1, 0.8, 0.85])  # cyan: neither red nor blue, but coloured
    assert float(utility(img, "alice")) == pytest.approx(1 / 16)
    assert float(utility(img, "bob")) == pytest.approx(2 / 16)
    assert float(utility(img, "carol")) == pytest.approx(4 / 16)
    assert prefers(torch.tensor([0.1, 0.1, 0.1]), torch.tensor([0.05, 0.2, 0.098])).tolist() == [1.0, -1.0, 0.0]
    with pytest.raises(RewardError, match="person must be one of"):
        utility(img, "dave")


def test_cli_bad_input_exits_2(tmp_path, capsys):
    f, _ = _write_prefs(tmp_path)
    lines = f.read_text().splitlines()
    (tmp_path / "nouser.jsonl").write_text(lines[0].replace('"user": "alice"', '"user": null') + "\n")
    from rewards.vpl import main

    rc = main(["--prefs", str(tmp_path / "nouser.jsonl"), "--out", str(tmp_path / "o"), "--backbone-kind", "shapes", "--steps", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "name no user" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()
    assert main(["--prefs", str(f), "--out", str(tmp_path / "o"), "--context-max", "1"]) == 2
    assert "--context-max must be >= 2, got 1" in capsys.readouterr().err
