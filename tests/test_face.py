"""face_id with real weights that ship inside packages (dlib's models in face_recognition_models,
MTCNN in facenet-pytorch) on real photos that ship inside packages (scikit-image's astronaut
Eileen Collins, matplotlib's Grace Hopper), plus the insightface path with a tiny ArcFace-shaped
network and a fake SCRFD exported to ONNX in a temp folder.
"""
from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("dlib")
pytest.importorskip("face_recognition_models")
skimage_data = pytest.importorskip("skimage.data")
Image = pytest.importorskip("PIL.Image")

import rewards  # noqa: E402
from rewards import face_align  # noqa: E402


# --------------------------------------------------------------------------------------------
# photos


def _jpeg(im, quality=70):
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    from matplotlib import cbook

    d = tmp_path_factory.mktemp("faces")
    ast = Image.fromarray(skimage_data.astronaut())
    with Image.open(cbook.get_sample_data("grace_hopper.jpg")) as im:
        gh = im.convert("RGB")
    p = {}
    p["ast"] = d / "astronaut.png"
    ast.save(p["ast"])
    p["gh"] = d / "grace_hopper.png"
    gh.save(p["gh"])
    # the same people again: mirrored, resized, JPEG re-encoded
    p["ast_aug"] = d / "astronaut_aug.jpg"
    _jpeg(ast.transpose(Image.FLIP_LEFT_RIGHT).resize((384, 384), Image.BICUBIC)).save(p["ast_aug"])
    p["gh_aug"] = d / "grace_hopper_aug.jpg"
    _jpeg(gh.transpose(Image.FLIP_LEFT_RIGHT).resize((400, 470), Image.BICUBIC)).save(p["gh_aug"])
    p["coffee"] = d / "coffee.png"
    Image.fromarray(skimage_data.coffee()).save(p["coffee"])
    ramp = np.linspace(0, 255, 256, dtype=np.float32)
    grad = np.stack([np.tile(ramp, (256, 1)), np.tile(ramp[:, None], (1, 256)), np.full((256, 256), 128.0)], -1)
    p["gradient"] = d / "gradient.png"
    Image.fromarray(grad.astype(np.uint8)).save(p["gradient"])
    # two people in one picture: the astronaut large on the left, Grace Hopper smaller on the right
    two = Image.new("RGB", (512 + 180, 512), (255, 255, 255))
    two.paste(ast, (0, 0))
    two.paste(gh.resize((180, 211), Image.BICUBIC), (512, 150))
    p["two"] = d / "two.png"
    two.save(p["two"])
    return p


@pytest.fixture(autouse=True)
def _fresh_reward_cache():
    rewards.clear_cache()  # counters live on the reward object; do not share it between tests
    yield
    rewards.clear_cache()


# --------------------------------------------------------------------------------------------
# dlib (black box, real weights)


@pytest.mark.parametrize("ref,same,other", [("ast", "ast_aug", "gh_aug"), ("gh", "gh_aug", "ast_aug")])
def test_dlib_same_person_scores_higher(photos, ref, same, other):
    r = rewards.load("face_id", reference=[photos[ref]])
    assert not r.differentiable
    s_same, s_other = r.score([photos[same], photos[other]])
    assert s_same > 0.95, s_same
    assert s_same > s_other + 0.05, (s_same, s_other)
    assert r.no_face_count == 0


def test_no_face_gets_defined_score_and_is_counted(photos):
    r = rewards.load("face_id", reference=[photos["ast"]])
    s = r.score([photos["coffee"], photos["gradient"], photos["ast_aug"]])
    assert s[0] == -1.0 and s[1] == -1.0 and s[2] > 0.9
    assert r.no_face_count == 2
    x = rewards.to_tensor([photos["gradient"], photos["gradient"]])
    out = r(x)
    assert out.tolist() == [-1.0, -1.0] and r.last_no_face == 2 and r.no_face_count == 4
    r_nan = rewards.load("face_id", reference=[photos["ast"]], no_face_score=float("nan"))
    assert math.isnan(r_nan.score([photos["coffee"]])[0])


def test_reference_without_face_is_a_clear_error(photos):
    with pytest.raises(rewards.RewardError, match="no face found in reference .*coffee.png"):
        rewards.load("face_id", reference=[photos["ast"], photos["coffee"]])
    with pytest.raises(rewards.RewardError, match="reference"):
        rewards.load("face_id")
    with pytest.raises(rewards.RewardError, match="no such file"):
        rewards.load("face_id", reference=[photos["ast"].parent / "missing.png"])


def test_reference_as_tensor_and_several_references(photos):
    t = rewards.to_tensor(photos["ast"])[0]
    r1 = rewards.load("face_id", reference=t)
    r2 = rewards.load("face_id", reference=[photos["ast"], photos["ast_aug"]])
    assert r2.reference_embeddings.shape == (2, 128)
    assert torch.allclose(r2.reference_embedding.norm(), torch.tensor(1.0))
    s1 = r1.score([photos["ast_aug"], photos["gh_aug"]])
    s2 = r2.score([photos["ast_aug"], photos["gh_aug"]])
    assert s1[0] > s1[1] and s2[0] > s2[1]


def test_multi_face_modes(photos):
    scores = {}
    for mode in ("largest", "mean", "max"):
        # det_thresh 0.5 drops HOG's weak false positive on the astronaut's suit patch (margin 0.1)
        r = rewards.load("face_id", reference=[photos["ast"]], multi_face=mode, det_thresh=0.5)
        scores[mode] = r.score([photos["two"]])[0]
        assert r.last_num_faces == [2]
    r_gh = rewards.load("face_id", reference=[photos["ast"]]).score([photos["gh_aug"]])[0]
    assert scores["largest"] == pytest.approx(scores["max"], abs=1e-6)  # the astronaut is larger
    assert scores["largest"] > 0.95
    assert r_gh - 0.05 < scores["mean"] < scores["max"] - 0.02


@pytest.mark.slow  # dlib's CNN detector takes ~5 s per image on one CPU core
def test_cnn_detector(photos):
    r = rewards.load("face_id", reference=[photos["ast"]], detector="cnn")
    s = r.score([photos["ast_aug"], photos["gh_aug"], photos["coffee"]])
    assert s[0] > s[1] + 0.05 and s[2] == -1.0


def test_haar_detector_with_dlib_landmarks(photos):
    pytest.importorskip("cv2")
    r = rewards.load("face_id", reference=[photos["ast"]], detector="haar")
    s = r.score([photos["ast_aug"], photos["gh_aug"], photos["coffee"]])
    assert s[0] > s[1] + 0.05 and s[2] == -1.0


def test_cli_score_with_reference(photos, capsys):
    import json

    try:
        import vfeedback.commands.score  # noqa: F401
    except ModuleNotFoundError:
        pytest.skip("vfeedback score not built yet")
    from vfeedback.cli import main

    imgs = [str(photos[k]) for k in ("ast_aug", "gh_aug", "coffee")]
    # --reference takes one path (repeat it for several), so images may follow it
    rc = main(["score", "--json", "--reward", "face_id", "--reference", str(photos["ast"]), *imgs])
    out = capsys.readouterr().out
    assert rc == 0, out
    res = {Path(r["image"]).name: r["scores"]["face_id"] for r in json.loads(out)["results"]}
    same, other, none = (res[Path(p).name] for p in imgs)
    assert same > other + 0.05 and none == -1.0


# --------------------------------------------------------------------------------------------
# MTCNN (facenet-pytorch, weights ship inside it)


def test_mtcnn_finds_one_face_with_plausible_landmarks(photos):
    pytest.importorskip("facenet_pytorch")
    from rewards.face import _MtcnnDetector, _to_uint8

    det = _MtcnnDetector(20, [0.6, 0.7, 0.7])
    for key in ("ast", "gh"):
        x = rewards.to_tensor(photos[key])
        (faces,) = det(_to_uint8(x), "cpu")
        assert len(faces) == 1
        f = faces[0]
        x1, y1, x2, y2 = f.box
        k = f.kps
        assert f.score > 0.99 and 60 < x2 - x1 < 300
        assert np.all((k[:, 0] > x1) & (k[:, 0] < x2) & (k[:, 1] > y1) & (k[:, 1] < y2))
        assert k[0, 0] < k[2, 0] < k[1, 0]  # left eye, nose, right eye from left to right
        assert k[3, 0] < k[4, 0]  # mouth corners
        assert max(k[0, 1], k[1, 1]) < k[2, 1] < min(k[3, 1], k[4, 1])  # eyes above nose above mouth
    (none,) = det(_to_uint8(rewards.to_tensor(photos["coffee"])), "cpu")
    assert none == []


def test_facenet_backend_scores(photos):
    pytest.importorskip("facenet_pytorch")
    r = rewards.load("face_id", reference=[photos["gh"]], backend="facenet")
    s = r.score([photos["gh_aug"], photos["ast_aug"], photos["coffee"]])
    assert s[0] > s[1] + 0.05 and s[2] == -1.0 and r.no_face_count == 1


# --------------------------------------------------------------------------------------------
# alignment


def test_norm_crop_matches_insightface_alignment():
    cv2 = pytest.importorskip("cv2")
    from skimage.transform import SimilarityTransform

    kps = np.array([[205.0, 101.7], [246.8, 103.7], [224.7, 129.0], [201.7, 139.2], [245.3, 141.9]], np.float32)
    tf = SimilarityTransform()
    tf.estimate(kps, face_align.ARCFACE_DST)  # what insightface's estimate_norm does
    m = face_align.estimate_norm(kps)[0].numpy()
    np.testing.assert_allclose(m, tf.params[:2], atol=1e-4)
    img = skimage_data.astronaut()
    ref = cv2.warpAffine(img, tf.params[:2], (112, 112), borderValue=0.0).astype(np.float32)
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float()
    out = face_align.norm_crop(x, kps[None])[0].permute(1, 2, 0).numpy()
    assert np.abs(out - ref).mean() < 0.5  # cv2 interpolates in fixed point: < 0.5 of 255 on average
    pts = face_align.landmarks_68_to_5(np.arange(136, dtype=np.float32).reshape(68, 2))
    assert pts.shape == (5, 2) and pts[2].tolist() == [60.0, 61.0]


# --------------------------------------------------------------------------------------------
# insightface path: tiny ArcFace-shaped recogniser + fake SCRFD, exported to ONNX here


class FakeSCRFD(torch.nn.Module):
    """SCRFD-shaped (9 outputs: scores / box distances / keypoint distances at strides 8, 16, 32,
    2 anchors each) returning one fixed detection: enough to exercise decoding and letterboxing."""

    def __init__(self, box, kps, size=640, scale=1.0):
        super().__init__()
        outs = {"score": [], "bbox": [], "kps": []}
        for stride in (8, 16, 32):
            k = (size // stride) ** 2 * 2
            outs["score"].append(torch.zeros(k, 1))
            outs["bbox"].append(torch.zeros(k, 4))
            outs["kps"].append(torch.zeros(k, 10))
        box = np.asarray(box, np.float64) * scale
        kps = np.asarray(kps, np.float64) * scale
        g = size // 32
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        col, row = int(cx // 32), int(cy // 32)
        ax, ay = col * 32.0, row * 32.0
        i = (row * g + col) * 2
        outs["score"][2][i, 0] = 0.95
        outs["bbox"][2][i] = torch.tensor([ax - box[0], ay - box[1], box[2] - ax, box[3] - ay]) / 32
        outs["kps"][2][i] = torch.tensor((kps - [ax, ay]).reshape(-1)) / 32
        self.outs = torch.nn.ParameterList([torch.nn.Parameter(t, requires_grad=False) for t in outs["score"] + outs["bbox"] + outs["kps"]])

    def forward(self, x):
        z = x.mean() * 0
        return tuple(t + z for t in self.outs)


def _export(model, path, shape, dynamic=True, n_out=1):
    outs = [f"out{i}" for i in range(n_out)]
    axes = {"input.1": {0: "N"}, **{o: {0: "N"} for o in outs}} if dynamic else None
    torch.onnx.export(model.eval(), (torch.randn(*shape),), str(path), dynamo=False, input_names=["input.1"], output_names=outs, dynamic_axes=axes, opset_version=17)


@pytest.fixture(scope="module")
def insightface_pack(tmp_path_factory, photos):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx2torch")
    pytest.importorskip("facenet_pytorch")
    import warnings

    from rewards.face import _MtcnnDetector, _to_uint8

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    d = tmp_path_factory.mktemp("buffalo_tiny")
    from vfeedback.models.tiny_face import tiny_arcface

    arc = tiny_arcface(0)  # ArcFace-shaped, (255 x - 127.5) / 127.5 input -> 512-d BN'd features
    _export(arc, d / "w600k_tiny.onnx", (1, 3, 112, 112))
    # a decoy like genderage.onnx (96x96 input) that the router must ignore
    decoy = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 3))
    _export(decoy, d / "genderage.onnx", (1, 3, 96, 96))
    (face,) = _MtcnnDetector(20, [0.6, 0.7, 0.7])(_to_uint8(rewards.to_tensor(photos["ast"])), "cpu")[0]
    _export(FakeSCRFD(face.box, face.kps, scale=640 / 512), d / "det_tiny.onnx", (1, 3, 640, 640), dynamic=False, n_out=9)
    return {"root": d, "kps": face.kps, "box": face.box, "arc": arc}


def test_model_pack_routing(insightface_pack):
    from rewards.face import find_insightface_models

    found = find_insightface_models(insightface_pack["root"])
    assert found["recognition"].endswith("w600k_tiny.onnx") and found["detection"].endswith("det_tiny.onnx")


def test_differentiable_arcface_equals_insightface(insightface_pack, photos):
    """Our torch path (onnx2torch graph, torch warp) against insightface's own ArcFaceONNX and
    face_align.norm_crop on the same inputs."""
    from insightface.model_zoo import ArcFaceONNX, get_model
    from insightface.utils import face_align as if_align

    from rewards.face import ArcFaceRecognizer

    path = str(insightface_pack["root"] / "w600k_tiny.onnx")
    theirs = get_model(path, providers=["CPUExecutionProvider"])
    assert isinstance(theirs, ArcFaceONNX) and (theirs.input_mean, theirs.input_std) == (127.5, 127.5)
    ours = ArcFaceRecognizer(path, differentiable=True)
    assert (ours.input_mean, ours.input_std, ours.input_size) == (127.5, 127.5, 112)
    img = np.array(Image.open(photos["ast"]).convert("RGB"))
    kps = insightface_pack["kps"]
    # the same crops (insightface's cv2 crop, as uint8 BGR for get_feat and RGB [0,1] for ours)
    crops_bgr = [if_align.norm_crop(img[..., ::-1].copy(), landmark=k, image_size=112) for k in (kps, kps + 3.0, kps * 0.95)]
    want = theirs.get_feat(crops_bgr)
    x = torch.from_numpy(np.stack([c[..., ::-1] for c in crops_bgr]).copy()).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        got = ours(x).numpy()
        direct = insightface_pack["arc"]((x * 255 - 127.5) / 127.5).numpy()
    assert want.shape == (3, 512)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(direct, want, atol=1e-4, rtol=1e-4)
    # the torch warp against insightface's norm_crop: the same crop up to cv2's fixed-point
    # bilinear weights and uint8 rounding (under half a grey level on average)
    t = torch.from_numpy(img).permute(2, 0, 1)[None].float()
    warped = face_align.norm_crop(t, kps[None])[0].permute(1, 2, 0).numpy()
    assert np.abs(warped - crops_bgr[0][..., ::-1]).mean() < 0.5
    # and end to end: the black-box reward (all insightface) and ours agree on embeddings
    black = ArcFaceRecognizer(path, differentiable=False).embed_images([img], kps[None])
    with torch.no_grad():
        mine = ours(face_align.norm_crop(t / 255, kps[None])).numpy()
    cos = float((black @ mine.T).item() / (np.linalg.norm(black) * np.linalg.norm(mine)))
    assert cos > 0.999


def test_scrfd_is_insightface_and_recovers_the_detection(insightface_pack, photos):
    from insightface.model_zoo import SCRFD, get_model

    from rewards.face import _ScrfdDetector, _to_uint8

    model = get_model(str(insightface_pack["root"] / "det_tiny.onnx"), providers=["CPUExecutionProvider"])
    assert isinstance(model, SCRFD)
    det = _ScrfdDetector(model, 640, 0.5)
    (faces,) = det(_to_uint8(rewards.to_tensor(photos["ast"])), "cpu")
    assert len(faces) == 1 and faces[0].score == pytest.approx(0.95, abs=1e-6)
    np.testing.assert_allclose(faces[0].box, insightface_pack["box"], atol=1e-3)
    np.testing.assert_allclose(faces[0].kps, insightface_pack["kps"], atol=1e-3)


def test_missing_pack_is_a_clear_error_and_nothing_downloads(photos, tmp_path, monkeypatch):
    import insightface.utils.storage as storage

    monkeypatch.setattr(storage, "download_file", lambda *a, **k: pytest.fail("insightface tried to download"))
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(rewards.RewardError, match=r"insightface-cli model.download buffalo_l.*det_10g.onnx, w600k_r50.onnx"):
        rewards.load("face_id", reference=[photos["ast"]], backend="insightface", model_root="buffalo_l")
    empty = tmp_path / "antelopev2"
    empty.mkdir()
    with pytest.raises(rewards.RewardError, match=r"no .onnx files.*model.download antelopev2.*glintr100.onnx"):
        rewards.load("face_id", reference=[photos["ast"]], backend="insightface", model_root=str(empty))


def test_insightface_differentiable_gradients_reach_pixels(insightface_pack, photos):
    root = insightface_pack["root"]
    kw = dict(reference=[photos["ast"]], backend="insightface", model_root=str(root))
    r = rewards.load("face_id", differentiable=True, **kw)
    r_ort = rewards.load("face_id", **kw)
    assert r.differentiable and not r_ort.differentiable
    x = rewards.to_tensor(photos["ast"])
    # black-box and torch paths agree; the fake SCRFD finds the MTCNN face, so the reference
    # embedding is this image's: similarity 1
    with torch.no_grad():
        s, s_ort = r(x), r_ort(x)
    torch.testing.assert_close(s, s_ort, atol=1e-4, rtol=0)
    assert s.item() == pytest.approx(1.0, abs=1e-4)
    # the same with landmarks given instead of detection, and with MTCNN as the detector
    kps = torch.from_numpy(insightface_pack["kps"])[None]
    r_mtcnn = rewards.load("face_id", differentiable=True, detector="mtcnn", **kw)
    torch.testing.assert_close(r_mtcnn(x).detach(), s, atol=1e-4, rtol=0)

    # gradients: perturb the image, then d(score)/d(pixels) through warp + converted ArcFace
    torch.manual_seed(1)
    xp = (x + 0.1 * torch.randn_like(x)).clamp(0, 1).double().requires_grad_(True)
    r.double()
    out = r(xp, landmarks=kps)
    assert out.requires_grad
    out.sum().backward()
    g = xp.grad
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    x1, y1, x2, y2 = insightface_pack["box"]
    assert g[..., 400:, :].abs().sum() == 0  # far below the face: outside the warped crop
    assert g[..., int(y1) : int(y2), int(x1) : int(x2)].abs().sum() > 0.5 * g.abs().sum()
    # and they are the right gradients (finite differences along a random direction)
    v = torch.randn_like(xp)
    eps = 1e-6  # small: PReLU kinks make larger steps inexact
    with torch.no_grad():
        fd = (r(xp + eps * v, landmarks=kps) - r(xp - eps * v, landmarks=kps)) / (2 * eps)
    assert (g * v).sum().item() == pytest.approx(fd.item(), rel=1e-3, abs=1e-9)
    r.float()
    # an image without a face keeps the defined score, with no gradient path
    flat = torch.full((1, 3, 64, 64), 0.5, requires_grad=True)
    r_mtcnn_flat = r_mtcnn(flat)
    assert r_mtcnn_flat.item() == -1.0 and r_mtcnn.last_no_face == 1


def test_half_precision_keeps_reference_and_score_in_fp32(insightface_pack, photos):
    r = rewards.load("face_id", reference=[photos["ast"]], backend="insightface", model_root=str(insightface_pack["root"]), differentiable=True)
    x = rewards.to_tensor(photos["ast"])
    with torch.no_grad():
        s32 = r(x)
        r.to(torch.bfloat16)
        s16 = r(x.to(torch.bfloat16))
    r.float()
    assert r.reference_embedding.dtype == torch.float32 and s16.dtype == torch.float32
    assert s16.item() == pytest.approx(s32.item(), abs=0.02)


def test_dlib_detector_feeds_arcface_landmarks(insightface_pack, photos):
    r = rewards.load("face_id", reference=[photos["ast"]], backend="insightface", detector="hog", model_root=str(insightface_pack["root"]))
    s = r.score([photos["ast"], photos["coffee"]])
    assert s[0] == pytest.approx(1.0, abs=1e-4) and s[1] == -1.0


def test_bad_options_are_clear(photos, tmp_path):
    with pytest.raises(rewards.RewardError, match="backend must be"):
        rewards.load("face_id", reference=[photos["ast"]], backend="nope")
    with pytest.raises(rewards.RewardError, match="differentiable=True needs the ArcFace"):
        rewards.load("face_id", reference=[photos["ast"]], differentiable=True)
    with pytest.raises(rewards.RewardError, match="no .onnx files in .*insightface-cli model.download buffalo_l"):
        rewards.load("face_id", reference=[photos["ast"]], backend="insightface", detector="hog", model_root=str(tmp_path))


def test_pack_without_detector_names_its_files(insightface_pack, photos, tmp_path):
    import shutil

    d = tmp_path / "recognition_only"
    d.mkdir()
    shutil.copy(insightface_pack["root"] / "w600k_tiny.onnx", d)
    with pytest.raises(rewards.RewardError, match=r"no SCRFD detector among w600k_tiny.onnx .*detector=hog\|mtcnn"):
        rewards.load("face_id", reference=[photos["ast"]], backend="insightface", model_root=str(d))
    # the same folder serves as the recogniser behind another detector
    r = rewards.load("face_id", reference=[photos["ast"]], backend="insightface", detector="mtcnn", model_root=str(d))
    assert r.score([photos["ast"]])[0] == pytest.approx(1.0, abs=1e-4)
