"""Malformed input through the CLI: each gets exit code 2 (1 for a runtime fault), one clear
message naming the field or file, no traceback, and leaves an existing run folder untouched."""
import json
import os
import struct
import zlib
from pathlib import Path

import pytest
import yaml

from tests.test_train_e2e import BASE
from vfeedback.cli import main


def cfg_dict(out, **over):
    c = json.loads(json.dumps(BASE))
    c["output_dir"] = str(out)
    c["train"]["max_steps"] = 1
    for k, v in over.items():
        d = c
        *head, last = k.split(".")
        for h in head:
            d = d.setdefault(h, {})
        if v is DELETE:
            d.pop(last, None)
        else:
            d[last] = v
    return c


DELETE = object()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A finished run folder that no bad input may touch, plus files of every broken kind."""
    root = tmp_path_factory.mktemp("bad")
    run = root / "existing-run"
    good = root / "good.yaml"
    good.write_text(yaml.safe_dump(cfg_dict(run)))
    assert main(["train", str(good)]) == 0
    from PIL import Image

    Image.new("RGB", (16, 16), (200, 30, 30)).save(root / "ok.png")
    (root / "zero.png").write_bytes(b"")
    (root / "text.png").write_text("not an image at all")
    data = (root / "ok.png").read_bytes()
    (root / "truncated.png").write_bytes(data[: len(data) // 2])
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(200))
    # a PNG whose header claims 20000 x 20000 pixels (a decompression bomb)
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    (root / "huge.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0))
                                     + chunk(b"IDAT", zlib.compress(b"\x00" * 10)) + chunk(b"IEND", b""))
    (root / "emptydir").mkdir()
    (root / "empty_prompts.txt").write_text("# nothing here\n\n")
    (root / "bad_prompts.jsonl").write_text('{"prompt": "ok"}\n{"prompt": 3}\n')
    (root / "latin1.yaml").write_bytes("algorithm: refl\noutput_dir: caf\xe9\n".encode("latin-1"))
    (root / "prefs_bad.jsonl").write_text('{"prompt": "a", "ranking": [0, 1]}\nnot json\n')
    (root / "ro_file").write_text("a file, not a folder")
    (root / "mine").mkdir()  # someone's own renders, where `sample` would write its file names
    (root / "mine" / "p00-seed0.png").write_bytes((root / "ok.png").read_bytes())
    snapshot = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    yield root, run
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == snapshot, "a bad input touched an existing run"


def write(root, name, data):
    p = root / name
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return str(p)


# (id, how to build argv from (root, run), expected exit code, words the message must contain)
CONFIG_CASES = [
    ("yaml-syntax", lambda r, run: ["train", write(r, "c1.yaml", "algorithm: refl\nmodel: [\n")], 2, ["YAML syntax error", "line"]),
    ("empty-file", lambda r, run: ["train", write(r, "c2.yaml", "")], 2, ["empty"]),
    ("top-level-list", lambda r, run: ["train", write(r, "c3.yaml", "- a\n- b\n")], 2, ["mapping"]),
    ("unknown-top-key", lambda r, run: ["train", write(r, "c4.yaml", cfg_dict(r / "o4", bogus=1))], 2, ["bogus", "unknown key"]),
    ("unknown-nested-key", lambda r, run: ["train", write(r, "c5.yaml", cfg_dict(r / "o5", **{"train.lrr": 1e-3}))], 2, ["train.lrr"]),
    ("wrong-type", lambda r, run: ["train", write(r, "c6.yaml", cfg_dict(r / "o6", **{"train.lr": "fast"}))], 2, ["train.lr"]),
    ("negative-lr", lambda r, run: ["train", write(r, "c7.yaml", cfg_dict(r / "o7", **{"train.lr": -1}))], 2, ["train.lr"]),
    ("zero-batch", lambda r, run: ["train", write(r, "c8.yaml", cfg_dict(r / "o8", **{"train.batch_size": 0}))], 2, ["train.batch_size"]),
    ("resolution-not-x8", lambda r, run: ["train", write(r, "c9.yaml", cfg_dict(r / "o9", **{"model.resolution": 30}))], 2, ["model.resolution", "multiple of 8"]),
    ("stop-range", lambda r, run: ["train", write(r, "c10.yaml", cfg_dict(r / "o10", **{"refl.stop_range": [3, 50]}))], 2, ["stop_range"]),
    ("missing-model", lambda r, run: ["train", write(r, "c11.yaml", cfg_dict(r / "o11", model=DELETE))], 2, ["model", "missing"]),
    ("unknown-algorithm", lambda r, run: ["train", write(r, "c12.yaml", cfg_dict(r / "o12", algorithm="ppo"))], 2, ["algorithm"]),
    ("unknown-family", lambda r, run: ["train", write(r, "c13.yaml", cfg_dict(r / "o13", **{"model.family": "sd3"}))], 2, ["model.family"]),
    ("unknown-tiny", lambda r, run: ["train", write(r, "c14.yaml", cfg_dict(r / "o14", **{"model.path": "tiny:sd99"}))], 2, ["tiny:sd99"]),
    ("model-path-missing", lambda r, run: ["train", write(r, "c15.yaml", cfg_dict(r / "o15", **{"model.path": "./no-such-model"}))], 2, ["model.path"]),
    ("model-folder-no-index", lambda r, run: ["train", write(r, "c16.yaml", cfg_dict(r / "o16", **{"model.path": str(r / "emptydir")}))], 2, ["model_index.json"]),
    ("family-mismatch", lambda r, run: ["train", write(r, "c17.yaml", cfg_dict(r / "o17", **{"model.path": "tiny:sdxl"}))], 2, ["model.family"]),
    ("hub-offline", lambda r, run: ["train", write(r, "c18.yaml", cfg_dict(r / "o18", **{"model.path": "no-one/no-model-xyz"}))], 2, ["could not load", "no-one/no-model-xyz"]),
    ("unknown-reward", lambda r, run: ["train", write(r, "c19.yaml", cfg_dict(r / "o19", reward=[{"name": "beauty"}]))], 2, ["unknown reward", "beauty"]),
    ("bad-reward-option-value", lambda r, run: ["train", write(r, "c20.yaml", cfg_dict(r / "o20", reward=[{"name": "color", "options": {"sharpness": -1}}]))], 2, ["sharpness"]),
    ("unknown-reward-option", lambda r, run: ["train", write(r, "c21.yaml", cfg_dict(r / "o21", reward=[{"name": "color", "options": {"hue": 3}}]))], 2, ["hue"]),
    ("bad-colour", lambda r, run: ["train", write(r, "c22.yaml", cfg_dict(r / "o22", reward=[{"name": "color", "options": {"color": "reddish"}}]))], 2, ["reddish"]),
    ("prompt-file-missing", lambda r, run: ["train", write(r, "c23.yaml", cfg_dict(r / "o23", **{"prompts.train": str(r / "nope.txt")}))], 2, ["prompts.train", "nope.txt"]),
    ("prompt-file-empty", lambda r, run: ["train", write(r, "c24.yaml", cfg_dict(r / "o24", **{"prompts.train": str(r / "empty_prompts.txt")}))], 2, ["no prompts"]),
    ("prompt-jsonl-broken", lambda r, run: ["train", write(r, "c25.yaml", cfg_dict(r / "o25", **{"prompts.train": str(r / "bad_prompts.jsonl")}))], 2, ["line 2"]),
    ("empty-prompt-list", lambda r, run: ["train", write(r, "c26.yaml", cfg_dict(r / "o26", **{"prompts.train": []}))], 2, ["prompts.train"]),
    ("config-missing", lambda r, run: ["train", str(r / "missing.yaml")], 2, ["not found"]),
    ("config-is-folder", lambda r, run: ["train", str(r / "emptydir")], 2, ["folder"]),
    ("config-not-utf8", lambda r, run: ["validate", str(r / "latin1.yaml")], 2, ["latin1.yaml"]),
    ("override-no-equals", lambda r, run: ["validate", write(r, "c30.yaml", cfg_dict(r / "o30")), "train.max_steps"], 2, ["key=value"]),
    ("override-bad-type", lambda r, run: ["validate", write(r, "c31.yaml", cfg_dict(r / "o31")), "train.max_steps=lots"], 2, ["train.max_steps"]),
    ("fp16-on-cpu", lambda r, run: ["train", write(r, "c32.yaml", cfg_dict(r / "o32", **{"train.mixed_precision": "fp16"}))], 2, ["fp16"]),
    ("output-dir-is-file", lambda r, run: ["train", write(r, "c33.yaml", cfg_dict(r / "ro_file"))], 2, ["output_dir", "not a folder"]),
    ("output-dir-unwritable", lambda r, run: ["train", write(r, "c34.yaml", cfg_dict(Path("/proc/vfeedback-run")))], 2, ["output_dir", "cannot write"]),
    ("run-exists-no-resume", lambda r, run: ["train", write(r, "c35.yaml", cfg_dict(run))], 2, ["already holds a run", "--resume"]),
    ("resume-nothing", lambda r, run: ["train", write(r, "c36.yaml", cfg_dict(r / "o36")), "--resume"], 2, ["holds no run"]),
    ("resume-changed-config", lambda r, run: ["train", write(r, "c37.yaml", cfg_dict(run, **{"model.lora.rank": 16})), "--resume"], 2, ["model.lora.rank"]),
    ("pretrain-data-missing", lambda r, run: ["train", write(r, "c38.yaml", cfg_dict(r / "o38", **{"refl.pretrain": {"data": str(r / "nodata")}}))], 2, ["refl.pretrain.data"]),
    ("num-processes-zero", lambda r, run: ["train", write(r, "c39.yaml", cfg_dict(r / "o39")), "--num-processes", "0"], 2, ["--num-processes"]),
    ("d3po-broken-preferences", lambda r, run: ["train", write(r, "c40.yaml", d3po_cfg(r))], 2, ["prefs_bad.jsonl", "line 1"]),
]

# non-finite numbers anywhere, seeds outside the generators' range, empty lists where one item is
# needed, impossible optimizer settings, unknown LoRA targets and devices: refused by the schema
# (or, for what needs the model's layout, by the shared checks) before anything is created
NAN, INF = float("nan"), float("inf")
SCHEMA_CASES = [
    ("nan-margin", {"refl.margin": NAN}, ["refl.margin", "finite"]),
    ("inf-grad-scale", {"refl.grad_scale": INF}, ["refl.grad_scale", "finite"]),
    ("nan-reward-weight", {"reward": [{"name": "color", "weight": NAN}]}, ["reward.rewards.0.weight", "finite"]),
    ("inf-reward-option", {"reward": [{"name": "color", "options": {"sharpness": -INF}}]}, ["options", "finite"]),
    ("nan-lora-alpha", {"model.lora.alpha": NAN}, ["model.lora.alpha", "finite"]),
    ("inf-guidance", {"sampling.guidance_scale": INF}, ["sampling.guidance_scale", "finite"]),
    ("nan-lr", {"train.lr": NAN}, ["train.lr"]),
    ("negative-seed", {"seed": -1}, ["seed", "greater than or equal to 0"]),
    ("seed-past-numpy", {"seed": 2**40}, ["seed", "less than or equal to 4294967295"]),
    ("eval-seed-negative", {"prompts.eval_seeds": [-3]}, ["prompts.eval_seeds.0"]),
    ("empty-eval-seeds", {"prompts.eval_seeds": []}, ["prompts.eval_seeds", "at least 1"]),
    ("empty-target-modules", {"model.lora.target_modules": []}, ["model.lora.target_modules", "at least 1"]),
    ("empty-eval-prompts", {"prompts.eval": []}, ["prompts.eval"]),
    ("adam-beta-one", {"train.adam_betas": [1.0, 0.999]}, ["train.adam_betas.0", "less than 1"]),
    ("adam-beta-negative", {"train.adam_betas": [0.9, -0.1]}, ["train.adam_betas.1"]),
    ("unknown-target-module", {"model.lora.target_modules": ["to_q", "to_zz"]}, ["model.lora.target_modules", "to_zz", "to_k"]),
    ("unknown-device", {"train.device": "gpu"}, ["train.device", "gpu"]),
    ("absent-gpu-index", {"train.device": "cuda:99"}, ["train.device", "cuda:99"]),
    ("empty-output-dir", {"output_dir": ""}, ["output_dir"]),
    ("eval-reward-unknown", {"eval_rewards": [{"name": "beauty"}]}, ["eval_rewards.0", "beauty"]),
    ("eval-reward-bad-option", {"eval_rewards": [{"name": "color", "options": {"hue": 1}}]}, ["eval_rewards.0", "hue"]),
    ("eval-reward-twice", {"eval_rewards": [{"name": "brightness"}, {"name": "brightness"}]}, ["eval_rewards", "twice"]),
]
for _name, _over, _words in SCHEMA_CASES:
    # each refused alike by validate and by train (which then creates nothing)
    for _cmd in ("validate", "train"):
        CONFIG_CASES.append((f"{_name}-{_cmd}", lambda r, run, n=_name, o=_over, c=_cmd: [c, write(r, f"{n}.yaml", cfg_dict(r / f"o-{n}", **o))],
                             2, _words))

YAML_CASES = [
    ("duplicate-key", lambda r, run: ["validate", write(r, "dup.yaml", yaml.safe_dump(cfg_dict(r / "o-dup")) + "seed: 3\nseed: 4\n")],
     2, ["'seed' is given twice"]),
    ("duplicate-nested-key", lambda r, run: ["train", write(r, "dup2.yaml", "train:\n  lr: 0.5\n  lr: 0.1\n"
                                                              + yaml.safe_dump(cfg_dict(r / "o-dup2", train=DELETE)))], 2, ["'lr' is given twice", "lines 2 and 3"]),
    ("alias-bomb", lambda r, run: ["validate", write(r, "bomb.yaml", BOMB)], 2, ["aliases", "limit"]),
    ("recursive-alias", lambda r, run: ["validate", write(r, "rec.yaml", "a: &a [*a]\n")], 2, ["recursive"]),
    ("endless-config", lambda r, run: ["validate", "/dev/zero"], 2, ["/dev/zero", "larger than"]),
    ("override-duplicate-key", lambda r, run: ["validate", write(r, "c41.yaml", cfg_dict(r / "o41")), "train={lr: 0.1, lr: 0.2}"], 2, ["given twice"]),
    ("prompt-file-is-a-pipe", lambda r, run: ["validate", write(r, "c42.yaml", cfg_dict(r / "o42", **{"prompts.train": "/dev/stdin"}))],
     2, ["prompts.train", "not a regular file"]),
]
# an alias bomb of under 1 KB: 9 levels of 9 aliases expand to 9**9 (387 million) strings
BOMB = "a: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(
    f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
CONFIG_CASES += YAML_CASES


def d3po_cfg(r):
    c = cfg_dict(r / "o40", algorithm="d3po")
    c.pop("refl")
    c["sampling"]["eta"] = 1.0
    c["d3po"] = {"mode": "offline", "preference": "file", "file": str(r / "prefs_bad.jsonl")}
    return c


SCORE_CASES = [
    ("score-zero-byte", lambda r, run: ["score", "--reward", "brightness", str(r / "zero.png"), str(r / "ok.png")], 1, ["zero.png", "empty"]),
    ("score-not-an-image", lambda r, run: ["score", "--reward", "brightness", str(r / "text.png"), str(r / "ok.png")], 1, ["text.png"]),
    ("score-truncated", lambda r, run: ["score", "--reward", "brightness", str(r / "truncated.png"), str(r / "ok.png")], 1, ["truncated.png"]),
    ("score-corrupt-jpeg", lambda r, run: ["score", "--reward", "brightness", str(r / "corrupt.jpg"), str(r / "ok.png")], 1, ["corrupt.jpg"]),
    ("score-huge", lambda r, run: ["score", "--reward", "brightness", str(r / "huge.png"), str(r / "ok.png")], 1, ["huge.png"]),
    # a path the user typed that does not exist is a user error, found before any reward loads
    ("score-missing-file", lambda r, run: ["score", "--reward", "brightness", str(r / "gone.png"), str(r / "ok.png")], 2, ["gone.png", "no such file"]),
    ("score-unknown-reward", lambda r, run: ["score", "--reward", "beauty", str(r / "ok.png")], 2, ["beauty"]),
    ("score-needs-prompt", lambda r, run: ["score", "--reward", "color", str(r / "ok.png")], 2, ["prompt"]),
    ("score-no-images", lambda r, run: ["score", "--reward", "brightness", str(r / "emptydir")], 2, ["image"]),
    ("sample-bad-seeds", lambda r, run: ["sample", "--model", "tiny:sd15", "--prompt", "x", "--seeds", "one,two", "--out", str(r / "s1")], 2, ["--seeds"]),
    ("sample-lora-missing", lambda r, run: ["sample", "--model", "tiny:sd15", "--prompt", "x", "--lora", str(r / "nolora"), "--out", str(r / "s2")], 2, ["--lora"]),
    ("sample-zero-steps", lambda r, run: ["sample", "--model", "tiny:sd15", "--prompt", "x", "--steps", "0", "--out", str(r / "s4")], 2, ["--steps", "greater than or equal to 1"]),
    ("sample-negative-steps", lambda r, run: ["sample", "--model", "tiny:sd15", "--prompt", "x", "--steps", "-5", "--out", str(r / "s5")], 2, ["--steps"]),
    ("sample-nan-guidance", lambda r, run: ["sample", "--model", "tiny:sd15", "--prompt", "x", "--guidance-scale", "nan", "--out", str(r / "s6")], 2, ["--guidance-scale", "finite"]),
    ("sample-eta-above-one", lambda r, run: ["sample", "--model", "tiny:sd15", "--prompt", "x", "--eta", "2", "--out", str(r / "s7")], 2, ["--eta"]),
    ("sample-seed-out-of-range", lambda r, run: ["sample", "--model", "tiny:sd15", "--prompt", "x", "--seeds", "0,-1", "--out", str(r / "s8")], 2, ["--seeds", "-1"]),
    ("sample-unknown-device", lambda r, run: ["sample", "--model", "tiny:sd15", "--prompt", "x", "--device", "gpu0", "--out", str(r / "s9")], 2, ["--device", "gpu0"]),
    ("sample-out-is-file", lambda r, run: ["sample", "--model", "tiny:sd15", "--prompt", "x", "--out", str(r / "ro_file")], 2, ["--out", "not a folder"]),
    ("sample-out-would-overwrite", lambda r, run: ["sample", "--model", "tiny:sd15", "--prompt", "x", "--out", str(r / "mine")], 2, ["--out", "p00-seed0.png", "left alone"]),
    ("score-unknown-device", lambda r, run: ["score", "--reward", "brightness", "--device", "tpu", str(r / "ok.png")], 2, ["--device", "tpu"]),
    ("score-zero-batch", lambda r, run: ["score", "--reward", "brightness", "--batch-size", "0", str(r / "ok.png")], 2, ["--batch-size"]),
    ("score-stdin-pipe", lambda r, run: ["score", "--reward", "brightness", "/dev/stdin", str(r / "ok.png")], 1, ["/dev/stdin", "not a regular file"]),
    ("sample-lora-other-arch", lambda r, run: ["sample", "--model", "tiny:sdxl", "--family", "sdxl", "--prompt", "x", "--lora", str(run / "lora"), "--out", str(r / "s3")], 2, ["--lora"]),
]


@pytest.mark.parametrize("name,argv,code,words", CONFIG_CASES + SCORE_CASES, ids=[c[0] for c in CONFIG_CASES + SCORE_CASES])
def test_bad_input(world, capsys, name, argv, code, words):
    root, run = world
    rc = main(argv(root, run))
    out, err = capsys.readouterr()
    assert rc == code, f"{name}: exit {rc}\n{err[-2000:]}"
    assert "Traceback" not in err and "Traceback" not in out
    msg = err.lower()
    for w in words:
        assert w.lower() in msg, f"{name}: {w!r} not in message:\n{err[-1500:]}"


def test_non_rgb_images_are_converted_not_refused(world, capsys, tmp_path):
    from PIL import Image

    Image.new("CMYK", (12, 12), (0, 200, 200, 0)).save(tmp_path / "cmyk.jpg")
    Image.new("L", (12, 12), 90).save(tmp_path / "grey.png")
    Image.new("I;16", (12, 12), 30000).save(tmp_path / "grey16.png")
    Image.new("RGBA", (12, 12), (255, 0, 0, 0)).save(tmp_path / "transparent.png")
    Image.new("P", (12, 12), 3).save(tmp_path / "palette.gif")
    rc = main(["score", "--reward", "brightness", "--json", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0
    assert len(json.loads(out)["results"]) == 5


def test_exif_orientation_is_applied(tmp_path, capsys):
    """A scene stored mirrored with the EXIF tag that says 'mirror me' (orientation 2) is judged
    as shown: 'a red cross left of a green cross' scores 1 upright and tagged, 0 mirrored."""
    from PIL import Image

    from rewards.shapes import COLOURS
    from vfeedback.world.scenes import Obj, Scene, render

    scene = Scene([Obj("cross", "red", 0.27, 0.5, 0.17, COLOURS["red"]), Obj("cross", "green", 0.73, 0.5, 0.17, COLOURS["green"])],
                  (0.9, 0.9, 0.9), "spatial")
    up = Image.fromarray((render(scene).permute(1, 2, 0).numpy() * 255).round().astype("uint8"))
    up.save(tmp_path / "upright.png")
    mirrored = up.transpose(Image.FLIP_LEFT_RIGHT)
    exif = Image.Exif()
    exif[0x0112] = 2  # Orientation: mirror horizontal
    mirrored.save(tmp_path / "tagged.png", exif=exif)
    mirrored.save(tmp_path / "mirrored.png")
    names = ["upright.png", "tagged.png", "mirrored.png"]
    rc = main(["score", "--reward", "shapes_spatial", "--prompt", "a red cross left of a green cross", "--json",
               *[str(tmp_path / n) for n in names]])
    assert rc == 0
    scores = {Path(r["image"]).name: r["scores"]["shapes_spatial"] for r in json.loads(capsys.readouterr().out)["results"]}
    assert scores["upright.png"] > 0.99 and scores["mirrored.png"] < 0.01
    assert scores["tagged.png"] == scores["upright.png"]
    from rewards.images import load_image

    assert torch_equal(load_image(tmp_path / "tagged.png"), load_image(tmp_path / "upright.png"))


def torch_equal(a, b):
    import torch

    return a.shape == b.shape and bool(torch.equal(a, b))


def test_score_batches_are_bounded_by_pixels(tmp_path):
    """Large images are decoded a few at a time: a batch holds at most MAX_BATCH_PIXELS pixels
    (an image over it goes alone), small ones up to --batch-size."""
    from PIL import Image

    from vfeedback.commands.score import _chunks

    sizes = [(64, 64), (300, 300), (300, 300), (64, 64), (64, 64), (600, 600)]
    paths = []
    for i, (w, h) in enumerate(sizes):
        Image.new("RGB", (w, h)).save(tmp_path / f"{i}.png")
        paths.append(tmp_path / f"{i}.png")
    # budget 200_000 pixels: 64^2 + 300^2 = 94_096 fits, + 300^2 more = 184_096 fits, +64^2 = 188_192, +64^2 = 192_288;
    # 600^2 = 360_000 is over the budget and goes alone
    assert list(_chunks(paths, 16, 200_000)) == [[0, 1, 2, 3, 4], [5]]
    assert list(_chunks(paths, 2, 200_000)) == [[0, 1], [2, 3], [4], [5]]
    assert list(_chunks(paths, 16, 100_000)) == [[0, 1], [2, 3, 4], [5]]


def test_case_count_reported():
    # the README reports this number
    assert len(CONFIG_CASES) + len(SCORE_CASES) == 114
