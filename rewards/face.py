"""Identity rewards: how much the face in a generated image looks like a reference person.

``face_id`` = cosine similarity between the identity embedding of a face found in each image
and the mean (L2-normalised) embedding of the reference photos given at construction; in
``[-1, 1]``, higher is the same person. It is the reward half of ID-Aligner-style tuning.

A pipeline is a detector (boxes, and landmarks where it has them) plus a recogniser:

========== ==================================== =================================================
backend     detector (default)                   recogniser
========== ==================================== =================================================
dlib        ``hog`` (dlib frontal HOG); ``cnn``  dlib's 128-d ResNet (``face_recognition_models``),
            (dlib mmod CNN); ``haar`` (OpenCV)   black-box
facenet     ``mtcnn`` (facenet-pytorch, weights  dlib (default) or ArcFace when ``model_root`` is
            ship inside the package)             given
insightface ``scrfd`` from ``model_root``        ArcFace ONNX from ``model_root`` (buffalo_l,
            (insightface's SCRFD)                antelopev2, ...): insightface's ArcFaceONNX, or
                                                 torch via onnx2torch when ``differentiable=True``
========== ==================================== =================================================

``detector=`` and ``recognizer=`` override the backend's defaults (any detector works with any
recogniser: dlib's 68-point shape predictor supplies landmarks to detectors that have none).

Differentiable path (ArcFace in torch): detection and landmarks run without gradient on the
quantised image; the similarity warp to the 112x112 ArcFace template (``face_align``) and the
recogniser run with gradient, so d(reward)/d(pixels) exists. A caller may pass
``landmarks=`` (``(B, 5, 2)`` pixels, or a list with None for "no face") to skip detection.

An image with no face scores ``no_face_score`` (default -1, the minimum of cosine similarity;
NaN makes combinations skip it) and is counted in ``last_no_face`` / ``no_face_count``.

The insightface backend is the ``insightface`` package itself (``FaceAnalysis(name=FOLDER,
allowed_modules=["detection", "recognition"])`` / ``model_zoo.get_model`` route a local pack,
``SCRFD.detect`` finds faces, ``face_align.norm_crop`` + ``ArcFaceONNX.get_feat`` embed them);
packs load only from local folders, never downloaded. Ours is only what must be
differentiable: the torch alignment warp (``face_align``) and the ArcFace graph converted to
torch (onnx2torch), tested equal to insightface's outputs.

Faithful to: face_recognition (``api.py``: HOG/CNN locations, shape predictor on the box,
``compute_face_descriptor``) and facenet-pytorch (``MTCNN.detect``).
"""
from __future__ import annotations

import glob
import importlib.util
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from . import face_align
from .base import Reward, RewardError, register
from .images import ImageError, to_single

log = logging.getLogger(__name__)

BACKENDS = ("dlib", "facenet", "insightface")
DETECTORS = ("hog", "cnn", "haar", "mtcnn", "scrfd")
RECOGNIZERS = ("dlib", "arcface")
MULTI_FACE = ("largest", "mean", "max")

# pip packages providing each importable module (for error messages)
_PIP = {
    "dlib": "dlib-bin",
    "face_recognition_models": "face_recognition_models 'setuptools<81'",
    "cv2": "'opencv-python<5'",
    "facenet_pytorch": "facenet-pytorch (with --no-deps)",
    "onnx": "onnx",
    "onnxruntime": "onnxruntime",
    "onnx2torch": "onnx2torch",
    "insightface": "insightface",
}
_NEEDS_DETECTOR = {"hog": ("dlib", "face_recognition_models"), "cnn": ("dlib", "face_recognition_models"), "haar": ("cv2",), "mtcnn": ("facenet_pytorch",), "scrfd": ("insightface", "onnx", "onnxruntime", "cv2")}
_NEEDS_RECOGNIZER = {"dlib": ("dlib", "face_recognition_models"), "arcface": ("insightface", "onnx", "onnxruntime", "cv2")}


def _require(modules: Sequence[str], what: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        pkgs = " ".join(_PIP.get(m, m) for m in missing)
        raise RewardError(f"face_id: {what} needs {', '.join(missing)}: pip install 'vfeedback[face]' (or pip install {pkgs})")


# --------------------------------------------------------------------------------------------
# model cache: dlib models, onnxruntime sessions and MTCNN are loaded once per process


_MODELS: dict[tuple, Any] = {}
_MODELS_LOCK = threading.Lock()


def _cached(key: tuple, build: Callable[[], Any]) -> Any:
    with _MODELS_LOCK:
        if key not in _MODELS:
            _MODELS[key] = build()
        return _MODELS[key]


def clear_model_cache() -> None:
    """Forget every loaded face model (they are reloaded on next use)."""
    with _MODELS_LOCK:
        _MODELS.clear()


def dlib_model_path(kind: str) -> str:
    """Path of one of the dlib model files shipped in ``face_recognition_models``.

    ``kind``: ``recognition`` | ``shape68`` | ``shape5`` | ``cnn``.
    """
    _require(("face_recognition_models",), "the dlib models")
    import warnings

    with warnings.catch_warnings():  # its import uses pkg_resources, deprecated in setuptools
        warnings.simplefilter("ignore")
        import face_recognition_models as frm

    fn = {
        "recognition": frm.face_recognition_model_location,
        "shape68": frm.pose_predictor_model_location,
        "shape5": frm.pose_predictor_five_point_model_location,
        "cnn": frm.cnn_face_detector_model_location,
    }[kind]
    path = fn()
    if not os.path.isfile(path):
        raise RewardError(f"face_id: dlib model file {path} is missing; reinstall face_recognition_models")
    return path


def _dlib(kind: str):
    import dlib

    def build():
        if kind == "hog":
            return dlib.get_frontal_face_detector()
        if kind == "cnn":
            return dlib.cnn_face_detection_model_v1(dlib_model_path("cnn"))
        if kind in ("shape68", "shape5"):
            return dlib.shape_predictor(dlib_model_path(kind))
        return dlib.face_recognition_model_v1(dlib_model_path("recognition"))

    return _cached(("dlib", kind), build)


# --------------------------------------------------------------------------------------------
# detection


@dataclass
class Face:
    """One detected face in pixel coordinates of its image."""

    box: np.ndarray  # (4,) x1, y1, x2, y2
    score: float
    kps: Optional[np.ndarray] = None  # (5, 2) ArcFace-order landmarks, when the detector has them
    shape: Any = None  # dlib full_object_detection, filled on demand

    @property
    def area(self) -> float:
        return float(max(0.0, self.box[2] - self.box[0]) * max(0.0, self.box[3] - self.box[1]))


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    """``(B, 3, H, W)`` in [0, 1] -> ``(B, H, W, 3)`` uint8 RGB, detached (detectors are black boxes)."""
    x = images.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8)
    return np.ascontiguousarray(x.permute(0, 2, 3, 1).cpu().numpy())


def _dlib_rect(box: np.ndarray):
    import dlib

    x1, y1, x2, y2 = (int(round(float(v))) for v in box[:4])
    return dlib.rectangle(x1, y1, x2, y2)


class _HogDetector:
    """dlib's frontal HOG + linear SVM detector, as face_recognition's ``model="hog"``."""

    def __init__(self, upsample: int, threshold: float):
        self.upsample, self.threshold = upsample, threshold

    def __call__(self, imgs: np.ndarray, device) -> list[list[Face]]:
        det = _dlib("hog")
        out = []
        for img in imgs:
            rects, scores, _ = det.run(img, self.upsample, self.threshold)
            out.append([Face(np.array([r.left(), r.top(), r.right(), r.bottom()], np.float32), float(s)) for r, s in zip(rects, scores)])
        return out


class _CnnDetector:
    """dlib's mmod CNN detector (``mmod_human_face_detector.dat``), batched over same-size images."""

    def __init__(self, upsample: int, threshold: float):
        self.upsample, self.threshold = upsample, threshold

    def __call__(self, imgs: np.ndarray, device) -> list[list[Face]]:
        dets = _dlib("cnn")(list(imgs), self.upsample, batch_size=max(1, len(imgs)))
        out = []
        for ds in dets:
            faces = []
            for d in ds:
                if d.confidence < self.threshold:
                    continue
                r = d.rect
                faces.append(Face(np.array([r.left(), r.top(), r.right(), r.bottom()], np.float32), float(d.confidence)))
            out.append(faces)
        return out


class _HaarDetector:
    """OpenCV's Viola-Jones frontal-face Haar cascade (boxes only; landmarks come from dlib)."""

    def __init__(self, min_size: int, min_neighbors: int = 5):
        self.min_size, self.min_neighbors = min_size, min_neighbors

    def __call__(self, imgs: np.ndarray, device) -> list[list[Face]]:
        import cv2

        path = os.path.join(cv2.data.haarcascades, "haarcascade_frontalface_default.xml")
        cascade = _cached(("haar", path), lambda: cv2.CascadeClassifier(path))
        out = []
        for img in imgs:
            gray = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
            rects, _, weights = cascade.detectMultiScale3(gray, scaleFactor=1.1, minNeighbors=self.min_neighbors, minSize=(self.min_size, self.min_size), outputRejectLevels=True)
            faces = []
            for (x, y, w, h), s in zip(np.asarray(rects).reshape(-1, 4), np.asarray(weights).reshape(-1)):
                faces.append(Face(np.array([x, y, x + w, y + h], np.float32), float(s)))
            out.append(faces)
        return out


class _MtcnnDetector:
    """facenet-pytorch's MTCNN (P/R/O-nets; weights ship inside the package), batched.

    Its five points (eyes, nose, mouth corners; left/right as in the image) are in the
    ArcFace template's order.
    """

    def __init__(self, min_face_size: int, thresholds: Sequence[float]):
        self.min_face_size, self.thresholds = min_face_size, list(thresholds)

    def __call__(self, imgs: np.ndarray, device) -> list[list[Face]]:
        from facenet_pytorch import MTCNN

        dev = torch.device(device)
        key = ("mtcnn", str(dev), self.min_face_size, tuple(self.thresholds))
        mtcnn = _cached(key, lambda: MTCNN(keep_all=True, min_face_size=self.min_face_size, thresholds=self.thresholds, device=dev).eval())
        x = torch.from_numpy(imgs).to(dev)  # (B, H, W, 3) uint8: the layout MTCNN.detect takes
        boxes, probs, points = mtcnn.detect(x, landmarks=True)
        out = []
        for b, p, pts in zip(boxes, probs, points):
            if b is None:
                out.append([])
                continue
            out.append([Face(np.asarray(bb, np.float32), float(pp), np.asarray(kk, np.float32)) for bb, pp, kk in zip(b, p, pts)])
        return out


class _ScrfdDetector:
    """insightface's SCRFD detector (``insightface.model_zoo.SCRFD``: letterbox into
    ``det_size``, anchor decoding, NMS at IoU 0.4), given the RGB images as the BGR arrays
    insightface expects."""

    def __init__(self, model, det_size: int, threshold: float):
        self.model = model
        self.model.prepare(_ctx_id(), input_size=(det_size, det_size), det_thresh=threshold)
        self.input_size, self.threshold = (det_size, det_size), threshold

    def __call__(self, imgs: np.ndarray, device) -> list[list[Face]]:
        out = []
        for img in imgs:
            det, kps = self.model.detect(np.ascontiguousarray(img[..., ::-1]), input_size=self.input_size, det_thresh=self.threshold)
            out.append([Face(det[j, :4].astype(np.float32), float(det[j, 4]), None if kps is None else kps[j].astype(np.float32))
                        for j in range(det.shape[0])])
        return out


def _ctx_id() -> int:
    """insightface's device index: 0 (first GPU) when onnxruntime has CUDA, else -1 (CPU)."""
    import onnxruntime as ort

    return 0 if "CUDAExecutionProvider" in ort.get_available_providers() else -1


def _ort_providers() -> list[str]:
    import onnxruntime as ort

    avail = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in avail] or avail


# --------------------------------------------------------------------------------------------
# insightface model packs: local folders only (insightface's FaceAnalysis downloads a missing
# pack; a training job must not), routed by insightface itself

#: the files of the packs people use, for the "fetch these" message
KNOWN_PACKS = {
    "buffalo_l": ("det_10g.onnx", "w600k_r50.onnx", "1k3d68.onnx", "2d106det.onnx", "genderage.onnx"),
    "buffalo_m": ("det_2.5g.onnx", "w600k_r50.onnx", "1k3d68.onnx", "2d106det.onnx", "genderage.onnx"),
    "buffalo_s": ("det_500m.onnx", "w600k_mbf.onnx", "1k3d68.onnx", "2d106det.onnx", "genderage.onnx"),
    "antelopev2": ("scrfd_10g_bnkps.onnx", "glintr100.onnx", "1k3d68.onnx", "2d106det.onnx", "genderage.onnx"),
}


def _pack_hint(name: str) -> str:
    pack = name if name in KNOWN_PACKS else "buffalo_l"
    files = ", ".join(KNOWN_PACKS[pack][:2])
    return (f"fetch the pack on a machine with internet: `insightface-cli model.download {pack}` (writes ~/.insightface/models/{pack}/, "
            f"with {files}; or unzip https://github.com/deepinsight/insightface/releases/download/model-zoo/{pack}.zip there), "
            f"then pass model_root=~/.insightface/models/{pack} or model_root={pack}")


def _resolve_model_root(model_root: Union[str, os.PathLike]) -> Path:
    p = Path(os.path.expanduser(str(model_root)))
    if p.exists():
        return p
    pack = Path(os.path.expanduser("~/.insightface/models")) / str(model_root)
    if pack.is_dir():
        return pack
    raise RewardError(
        f"face_id: model_root={str(model_root)!r} is neither a local file nor a folder (nor a pack under ~/.insightface/models); "
        f"nothing is downloaded: {_pack_hint(Path(str(model_root)).name)}"
    )


def load_insightface_pack(model_root: Union[str, os.PathLike], need_detector: bool) -> dict[str, Any]:
    """The ``detection`` (SCRFD) and ``recognition`` (ArcFaceONNX) models of a local pack.

    A folder goes through ``insightface.app.FaceAnalysis(name=FOLDER, allowed_modules=...)``
    (insightface's router: 5+ outputs is a detector, a square >= 112 input a recogniser;
    landmark / gender-age models are skipped), which never downloads given an existing
    folder; a single ``.onnx`` file through ``insightface.model_zoo.get_model``.
    """
    _require(("insightface",), "the insightface backend")
    from insightface.model_zoo import get_model

    root = _resolve_model_root(model_root)
    providers = _ort_providers()
    found: dict[str, Any] = {"detection": None, "recognition": None}
    if root.is_file():
        m = get_model(str(root), providers=providers)
        if m is not None and m.taskname in found:
            found[m.taskname] = m
        return found
    files = sorted(Path(f).name for f in glob.glob(str(root / "*.onnx")))
    if not files:
        raise RewardError(f"face_id: no .onnx files in {root}; {_pack_hint(root.name)}")
    if need_detector:
        from insightface.app import FaceAnalysis

        try:
            app = _cached(("faceanalysis", str(root)), lambda: FaceAnalysis(name=str(root), allowed_modules=["detection", "recognition"], providers=providers))
        except AssertionError:  # FaceAnalysis asserts a detector exists
            raise RewardError(f"face_id: no SCRFD detector among {', '.join(files)} in {root}; {_pack_hint(root.name)}, "
                              "or use detector=hog|mtcnn with this folder's recogniser") from None
        found.update({k: v for k, v in app.models.items() if k in found})
        return found
    for f in files:
        m = get_model(str(root / f), providers=providers)
        if m is not None and m.taskname == "recognition":
            found["recognition"] = m
            break
    return found


def find_insightface_models(model_root: Union[str, os.PathLike]) -> dict[str, Optional[str]]:
    """Paths of the pack's ``detection`` and ``recognition`` ``.onnx`` files, as insightface routes them."""
    found = load_insightface_pack(model_root, need_detector=False)
    root = _resolve_model_root(model_root)
    out = {"detection": None, "recognition": found["recognition"].model_file if found["recognition"] is not None else None}
    if root.is_dir():
        from insightface.model_zoo import get_model

        for f in sorted(glob.glob(str(root / "*.onnx"))):
            m = get_model(f, providers=_ort_providers())
            if m is not None and m.taskname == "detection":
                out["detection"] = f
                break
    return out


# --------------------------------------------------------------------------------------------
# recognisers


class _DlibRecognizer:
    """dlib's 128-d ResNet face descriptor; landmarks from dlib's shape predictor on each box.

    As face_recognition's ``face_encodings(img, known_face_locations)``: the predictor runs on
    the box, and ``compute_face_descriptor`` aligns a 150x150 chip (padding 0.25) itself.
    """

    dim = 128

    def __init__(self, shape_model: str, num_jitters: int):
        self.shape_model, self.num_jitters = shape_model, num_jitters

    def embed(self, img: np.ndarray, faces: list[Face]) -> np.ndarray:
        import dlib

        sp = _dlib(self.shape_model)
        shapes = dlib.full_object_detections()
        for f in faces:
            if f.shape is None or f.shape.num_parts != _sp_parts(self.shape_model):
                f.shape = sp(img, _dlib_rect(f.box))
            shapes.append(f.shape)
        vecs = _dlib("recognition").compute_face_descriptor(img, shapes, self.num_jitters)
        return np.array([np.asarray(v) for v in vecs], dtype=np.float32).reshape(len(faces), self.dim)


def _sp_parts(shape_model: str) -> int:
    return 68 if shape_model == "shape68" else 5


class ArcFaceRecognizer(torch.nn.Module):
    """ArcFace identity embeddings: insightface's ``ArcFaceONNX`` or its torch conversion.

    ``model``: an ``insightface.model_zoo.ArcFaceONNX`` (or the path of its ``.onnx``). Its
    input normalisation (``(x - input_mean) / input_std`` on 0..255 RGB; insightface decides
    127.5 / 127.5, or 0 / 1 for graphs that normalise themselves) is used on both paths.

    * black box (``differentiable=False``): :meth:`embed_images` is insightface end to end,
      ``face_align.norm_crop`` (cv2 warp of the uint8 image) then ``ArcFaceONNX.get_feat``.
    * differentiable: our own code, because insightface's path is numpy / onnxruntime and has
      no gradient: the torch warp (:mod:`rewards.face_align`) and the ONNX graph converted to
      torch with onnx2torch; tests pin it to insightface's outputs.
    """

    def __init__(self, model, differentiable: bool = False):
        super().__init__()
        if isinstance(model, (str, os.PathLike)):
            _require(("insightface",), "the ArcFace recogniser")
            from insightface.model_zoo import get_model

            path = str(model)
            model = get_model(path, providers=_ort_providers())
            if model is None or model.taskname != "recognition":
                raise RewardError(f"face_id: {path} is not an ArcFace recogniser (insightface routes it to "
                                  f"{getattr(model, 'taskname', 'nothing')}); it takes (N, 3, 112, 112)")
        self.model = model
        self.path = model.model_file
        self.input_mean, self.input_std = float(model.input_mean), float(model.input_std)
        self.input_size = int(model.input_size[0])
        self.differentiable = differentiable
        self.net: Optional[torch.nn.Module] = None
        if differentiable:
            _require(("onnx2torch",), "face_id with differentiable=True")
            import onnx
            from onnx2torch import convert

            self.net = convert(onnx.load(self.path)).eval()
            self.net.requires_grad_(False)

    def normalise(self, crops: torch.Tensor) -> torch.Tensor:
        return (crops * 255.0 - self.input_mean) / self.input_std

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        """``(N, 3, S, S)`` aligned RGB crops in [0, 1] -> ``(N, D)`` raw (unnormalised) embeddings.

        Differentiable through the torch net; else ``ArcFaceONNX.forward`` (no gradient).
        """
        x = self.normalise(crops)
        if self.net is not None:
            p = next(self.net.parameters(), None)
            if p is not None:
                x = x.to(device=p.device, dtype=p.dtype)
            return self.net(x).to(crops.device)
        blob = crops.detach().float().cpu().numpy() * 255.0
        return torch.from_numpy(np.asarray(self.model.forward(blob))).to(crops.device)

    def embed_images(self, imgs_rgb: Sequence[np.ndarray], kps: Sequence[np.ndarray]) -> np.ndarray:
        """insightface's own path: ``norm_crop`` of each uint8 RGB image at its 5 landmarks,
        then ``get_feat`` (BGR in, as insightface takes it) -> ``(N, D)`` float32."""
        from insightface.utils import face_align as if_align

        crops = [if_align.norm_crop(np.ascontiguousarray(img[..., ::-1]), landmark=k, image_size=self.input_size) for img, k in zip(imgs_rgb, kps)]
        return np.asarray(self.model.get_feat(crops), np.float32).reshape(len(crops), -1)


# --------------------------------------------------------------------------------------------
# the reward


def _parse_landmarks(landmarks, b: int) -> list[Optional[np.ndarray]]:
    if isinstance(landmarks, torch.Tensor):
        landmarks = landmarks.detach().float().cpu().numpy()
    if isinstance(landmarks, np.ndarray):
        if landmarks.shape != (b, 5, 2):
            raise RewardError(f"face_id: landmarks must have shape ({b}, 5, 2) (pixels), got {landmarks.shape}")
        return list(landmarks)
    items = list(landmarks)
    if len(items) != b:
        raise RewardError(f"face_id: {len(items)} landmark sets for {b} images")
    return [None if x is None else np.asarray(x, np.float32).reshape(5, 2) for x in items]


@register(
    "face_id",
    differentiable=False,
    extra="face",
    requires=("dlib", "face_recognition_models"),
    description="cosine similarity of the face to reference photos (dlib / MTCNN / insightface ArcFace; differentiable with backend=insightface, differentiable=True)",
)
class FaceIdentity(Reward):
    """Identity similarity to reference faces: ``cos(e(face), normalize(mean_r normalize(e(ref_r))))``.

    Options:
      reference: path(s) or image tensor(s) of the person (required). A reference with no face
        is an error naming it; with several faces the largest is used.
      backend: ``dlib`` (default) | ``facenet`` | ``insightface`` (see the module docstring).
      detector: ``hog`` | ``cnn`` | ``haar`` | ``mtcnn`` | ``scrfd``; default from the backend.
      recognizer: ``dlib`` | ``arcface`` (alias ``insightface``); default from the backend.
      model_root: insightface model pack folder (SCRFD + ArcFace .onnx), or one ArcFace .onnx.
      differentiable: run ArcFace in torch (onnx2torch) with a differentiable alignment warp.
      multi_face: ``largest`` (default) | ``mean`` | ``max`` over the faces of an image.
      no_face_score: score of an image without a face (default -1.0; NaN to skip it).
      upsample: dlib detectors' upsampling (default 1 for hog, 0 for cnn).
      det_thresh: detector score threshold (hog: SVM margin 0.0; cnn: 0.0; scrfd: 0.5).
      det_size: SCRFD input size (640). min_face_size: MTCNN / Haar smallest face (20 / 40 px).
      shape_predictor: ``68`` (default) | ``5`` dlib landmark model for the dlib recogniser.
      num_jitters: dlib descriptor re-sampling (1).

    Output: ``(B,)`` float32 (float64 for float64 images) in ``[-1, 1]``. After each call ``last_no_face`` (int) and
    ``last_num_faces`` (list) describe the batch; ``no_face_count`` / ``images_seen`` accumulate.
    """

    def __init__(
        self,
        reference=None,
        backend: str = "dlib",
        detector: Optional[str] = None,
        recognizer: Optional[str] = None,
        model_root: Optional[str] = None,
        differentiable: bool = False,
        multi_face: str = "largest",
        no_face_score: float = -1.0,
        upsample: Optional[int] = None,
        det_thresh: Optional[float] = None,
        det_size: int = 640,
        min_face_size: Optional[int] = None,
        shape_predictor: Union[int, str] = 68,
        num_jitters: int = 1,
    ):
        super().__init__()
        if reference is None or (isinstance(reference, (list, tuple)) and not reference):
            raise RewardError("face_id: needs reference=[photo of the person, ...] (paths or image tensors)")
        if backend not in BACKENDS:
            raise RewardError(f"face_id: backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        if multi_face not in MULTI_FACE:
            raise RewardError(f"face_id: multi_face must be one of {', '.join(MULTI_FACE)}, got {multi_face!r}")
        if str(shape_predictor) not in ("68", "5"):
            raise RewardError(f"face_id: shape_predictor must be 68 or 5, got {shape_predictor!r}")
        if recognizer == "insightface":
            recognizer = "arcface"
        if recognizer is None:
            recognizer = "arcface" if backend == "insightface" or (backend == "facenet" and model_root is not None) else "dlib"
        if recognizer not in RECOGNIZERS:
            raise RewardError(f"face_id: recognizer must be dlib or arcface, got {recognizer!r}")
        if detector is None:
            detector = {"dlib": "hog", "facenet": "mtcnn", "insightface": "scrfd"}[backend]
        if detector not in DETECTORS:
            raise RewardError(f"face_id: detector must be one of {', '.join(DETECTORS)}, got {detector!r}")
        _require(_NEEDS_DETECTOR[detector], f"detector={detector}")
        _require(_NEEDS_RECOGNIZER[recognizer], f"recognizer={recognizer}")
        if differentiable and recognizer != "arcface":
            raise RewardError(
                "face_id: differentiable=True needs the ArcFace recogniser (backend=insightface with model_root=...); "
                "dlib's recogniser is a black box"
            )
        self.backend, self.detector_name, self.recognizer_name = backend, detector, recognizer
        self.multi_face = multi_face
        self.no_face_score = float(no_face_score)
        self.differentiable = bool(differentiable)

        if model_root is not None and (recognizer == "arcface" or detector == "scrfd"):
            models = load_insightface_pack(model_root, need_detector=detector == "scrfd")
        else:
            models = {"detection": None, "recognition": None}
        if recognizer == "arcface" and models["recognition"] is None:
            where = f"in {model_root}" if model_root is not None else "(no model_root given)"
            raise RewardError(f"face_id: recognizer=arcface needs an ArcFace .onnx (112x112 input) {where}; pass model_root=PATH/TO/buffalo_l")
        if detector == "scrfd" and models["detection"] is None:
            where = f"in {model_root}" if model_root is not None else "(no model_root given)"
            raise RewardError(f"face_id: detector=scrfd needs an SCRFD .onnx {where}; pass model_root=PATH/TO/buffalo_l, or detector=hog|mtcnn")

        # the 68-point predictor gives ArcFace's 5 points to detectors without landmarks
        self.shape_model = "shape68" if (recognizer == "arcface" or str(shape_predictor) == "68") else "shape5"
        if detector in ("hog", "cnn", "haar") or recognizer == "dlib":
            _require(("dlib", "face_recognition_models"), "landmarks for this detector")
        if detector == "hog":
            self.detector = _HogDetector(1 if upsample is None else int(upsample), 0.0 if det_thresh is None else float(det_thresh))
        elif detector == "cnn":
            self.detector = _CnnDetector(0 if upsample is None else int(upsample), 0.0 if det_thresh is None else float(det_thresh))
        elif detector == "haar":
            self.detector = _HaarDetector(40 if min_face_size is None else int(min_face_size))
        elif detector == "mtcnn":
            th = [0.6, 0.7, 0.7] if det_thresh is None else [0.6, 0.7, float(det_thresh)]
            self.detector = _MtcnnDetector(20 if min_face_size is None else int(min_face_size), th)
        else:
            self.detector = _ScrfdDetector(models["detection"], int(det_size), 0.5 if det_thresh is None else float(det_thresh))

        if recognizer == "dlib":
            self.recognizer = _DlibRecognizer(self.shape_model, int(num_jitters))
            self.arcface = None
        else:
            self.recognizer = None
            self.arcface = ArcFaceRecognizer(models["recognition"], differentiable=self.differentiable)

        self.no_face_count = 0
        self.images_seen = 0
        self.last_no_face = 0
        self.last_num_faces: list[int] = []

        refs = reference if isinstance(reference, (list, tuple)) else [reference]
        embs = []
        for i, r in enumerate(refs):
            label = str(r) if isinstance(r, (str, os.PathLike)) else f"reference image #{i}"
            try:
                img = to_single(r)
            except ImageError as e:
                raise RewardError(f"face_id: cannot read reference {label}: {e}") from None
            with torch.no_grad():
                e, owner, _ = self._embed_faces(img[None].float(), select="largest")
            if e.shape[0] == 0:
                raise RewardError(
                    f"face_id: no face found in reference {label} (detector={detector}); use a photo where the face is clearly visible and frontal"
                )
            embs.append(F.normalize(e[0].float(), dim=0))
        # plain fp32 tensors, not buffers: ``reward.half()`` must not quantise the reference
        self._refs = torch.stack(embs).detach().float().cpu()
        self._ref_mean = F.normalize(self._refs.mean(0), dim=0)

    @property
    def reference_embeddings(self) -> torch.Tensor:
        """``(R, D)`` L2-normalised embedding of each reference image (fp32, CPU)."""
        return self._refs

    @property
    def reference_embedding(self) -> torch.Tensor:
        """``(D,)`` the L2-normalised mean of :attr:`reference_embeddings`: what images are compared to."""
        return self._ref_mean

    # ----------------------------------------------------------------------------------------

    def _detect(self, images: torch.Tensor, arr: np.ndarray) -> list[list[Face]]:
        faces = self.detector(arr, images.device)
        for fs in faces:  # largest first; ties (dlib's HOG boxes come in fixed sizes) by score
            fs.sort(key=lambda f: (-f.area, -f.score))
        return faces

    def _arcface_kps(self, img: np.ndarray, face: Face) -> np.ndarray:
        if face.kps is None:
            face.shape = _dlib("shape68")(img, _dlib_rect(face.box))
            pts = np.array([[p.x, p.y] for p in face.shape.parts()], np.float32)
            face.kps = face_align.landmarks_68_to_5(pts)
        return face.kps

    def _embed_faces(self, images: torch.Tensor, select: str, landmarks=None):
        """Embed the faces of ``images`` -> (embeddings (N, D), owner image index (N,), faces per image)."""
        b = images.shape[0]
        arr = _to_uint8(images)
        if landmarks is not None:
            if self.arcface is None:
                raise RewardError("face_id: landmarks= is only used with the ArcFace recogniser")
            lms = _parse_landmarks(landmarks, b)
            faces = [[] if k is None else [Face(np.r_[k.min(0), k.max(0)].astype(np.float32), 1.0, k)] for k in lms]
        else:
            faces = self._detect(images, arr)
        chosen = [fs[:1] if select == "largest" else fs for fs in faces]
        owner = [i for i, fs in enumerate(chosen) for _ in fs]
        counts = [len(fs) for fs in faces]
        if not owner:
            dim = 128 if self.arcface is None else 512
            return images.new_zeros(0, dim), [], counts
        if self.arcface is None:
            embs = [torch.from_numpy(self.recognizer.embed(arr[i], fs)) for i, fs in enumerate(chosen) if fs]
            return torch.cat(embs).to(images.device), owner, counts
        kps = np.stack([self._arcface_kps(arr[i], f) for i, fs in enumerate(chosen) for f in fs])
        if not self.arcface.differentiable:
            # black box: insightface's own crop + ArcFaceONNX.get_feat
            return torch.from_numpy(self.arcface.embed_images([arr[i] for i in owner], kps)).to(images.device), owner, counts
        src = images[torch.tensor(owner, device=images.device)]
        # warp in fp32 (fp64 for gradient checks) whatever the image dtype; the recogniser casts
        # the crop to its own dtype
        dtype = torch.float64 if images.dtype == torch.float64 else torch.float32
        crops = face_align.norm_crop(src.to(dtype), kps, self.arcface.input_size)
        return self.arcface(crops), owner, counts

    def forward(self, images: torch.Tensor, prompts: Optional[Sequence[str]] = None, landmarks=None, **context) -> torch.Tensor:
        """``images`` ``(B, 3, H, W)`` in [0, 1] -> ``(B,)`` cosine similarity to the reference.

        ``landmarks``: optional ``(B, 5, 2)`` ArcFace-order points in pixels (or a list with None
        for images without a face) that replace detection (ArcFace recogniser only).
        """
        if images.ndim == 3:
            images = images[None]
        b = images.shape[0]
        grad = self.differentiable and torch.is_grad_enabled()
        with torch.set_grad_enabled(grad):
            emb, owner, counts = self._embed_faces(images, self.multi_face, landmarks)
        # cosine in fp32 at least (a bf16 cosine near 1 is quantised to ~0.004); fp32 output
        calc = torch.float64 if emb.dtype == torch.float64 else torch.float32
        fill = torch.full((), self.no_face_score, device=images.device, dtype=calc)
        if emb.shape[0]:
            sims = F.normalize(emb.to(calc), dim=-1) @ self._ref_mean.to(emb.device, calc)
        per_image = []
        for i in range(b):
            idx = [j for j, o in enumerate(owner) if o == i]
            if not idx:
                per_image.append(fill)
            elif len(idx) == 1 or self.multi_face == "largest":
                per_image.append(sims[idx[0]])
            elif self.multi_face == "mean":
                per_image.append(sims[idx].mean())
            else:
                per_image.append(sims[idx].max())
        out = torch.stack(per_image).to(images.device)
        self.last_num_faces = counts
        self.last_no_face = b - len(set(owner))
        self.no_face_count += self.last_no_face
        self.images_seen += b
        return out

    def reset_counts(self) -> None:
        self.no_face_count = 0
        self.images_seen = 0

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, backend={self.backend!r}, detector={self.detector_name!r}, recognizer={self.recognizer_name!r}, "
            f"differentiable={self.differentiable}, multi_face={self.multi_face!r}, references={self.reference_embeddings.shape[0]}"
        )
