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
                                                 antelopev2, ...): onnxruntime, or torch via
                                                 onnx2torch when ``differentiable=True``
========== ==================================== =================================================

``detector=`` and ``recognizer=`` override the backend's defaults (any detector works with any
recogniser: dlib's 68-point shape predictor supplies landmarks to detectors that have none).

Differentiable path (ArcFace in torch): detection and landmarks run without gradient on the
quantised image; the similarity warp to the 112x112 ArcFace template (``face_align``) and the
recogniser run with gradient, so d(reward)/d(pixels) exists. A caller may pass
``landmarks=`` (``(B, 5, 2)`` pixels, or a list with None for "no face") to skip detection.

An image with no face scores ``no_face_score`` (default -1, the minimum of cosine similarity;
NaN makes combinations skip it) and is counted in ``last_no_face`` / ``no_face_count``.

Faithful to: face_recognition (``api.py``: HOG/CNN locations, shape predictor on the box,
``compute_face_descriptor``), insightface (``model_zoo/scrfd.py``, ``model_zoo/arcface_onnx.py``,
``utils/face_align.py``, ``app/face_analysis.py``) and facenet-pytorch (``MTCNN.detect``).
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
}
_NEEDS_DETECTOR = {"hog": ("dlib", "face_recognition_models"), "cnn": ("dlib", "face_recognition_models"), "haar": ("cv2",), "mtcnn": ("facenet_pytorch",), "scrfd": ("onnx", "onnxruntime", "cv2")}
_NEEDS_RECOGNIZER = {"dlib": ("dlib", "face_recognition_models"), "arcface": ("onnx", "onnxruntime")}


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
    """insightface's SCRFD ONNX detector run through onnxruntime (``model_zoo/scrfd.py``).

    The image is letterboxed into ``det_size`` (kept aspect, padded right/bottom), normalised
    ``(x - 127.5) / 128`` in RGB; each stride's outputs are distances from anchor centres to
    box sides and to the 5 keypoints; scores over ``det_thresh`` are kept and NMS'ed (IoU 0.4).
    """

    def __init__(self, path: str, det_size: int, threshold: float, nms_threshold: float = 0.4):
        import onnxruntime as ort

        self.path = path
        self.session = _cached(("ort", path), lambda: ort.InferenceSession(path, providers=_ort_providers()))
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        shape = inp.shape
        self.input_size = (det_size, det_size) if isinstance(shape[2], str) or shape[2] is None else (int(shape[3]), int(shape[2]))
        self.output_names = [o.name for o in self.session.get_outputs()]
        n = len(self.output_names)
        if n not in (6, 9, 10, 15):
            raise RewardError(f"face_id: {path} has {n} outputs; an SCRFD detector has 6, 9, 10 or 15")
        self.fmc = 3 if n in (6, 9) else 5
        self.strides = [8, 16, 32] if self.fmc == 3 else [8, 16, 32, 64, 128]
        self.num_anchors = 2 if self.fmc == 3 else 1
        self.use_kps = n in (9, 15)
        self.threshold, self.nms_threshold = threshold, nms_threshold

    def __call__(self, imgs: np.ndarray, device) -> list[list[Face]]:
        return [self._detect(img) for img in imgs]

    def _detect(self, img: np.ndarray) -> list[Face]:
        import cv2
        from torchvision.ops import nms

        iw, ih = self.input_size
        h, w = img.shape[:2]
        if h / w > ih / iw:
            nh, nw = ih, max(1, int(ih * w / h))
        else:
            nw, nh = iw, max(1, int(iw * h / w))
        scale = nh / h
        canvas = np.zeros((ih, iw, 3), np.uint8)
        canvas[:nh, :nw] = cv2.resize(img, (nw, nh))
        blob = ((canvas.astype(np.float32) - 127.5) / 128.0).transpose(2, 0, 1)[None]
        outs = self.session.run(self.output_names, {self.input_name: blob})
        outs = [o[0] if o.ndim == 3 else o for o in outs]  # some exports keep the batch axis
        all_scores, all_boxes, all_kps = [], [], []
        for i, stride in enumerate(self.strides):
            scores = outs[i].reshape(-1)
            dist = outs[i + self.fmc].reshape(-1, 4) * stride
            gh, gw = ih // stride, iw // stride
            centres = np.stack(np.mgrid[:gh, :gw][::-1], axis=-1).astype(np.float32).reshape(-1, 2) * stride
            centres = np.repeat(centres, self.num_anchors, axis=0)
            keep = np.where(scores >= self.threshold)[0]
            c = centres[keep]
            d = dist[keep]
            all_scores.append(scores[keep])
            all_boxes.append(np.concatenate([c - d[:, :2], c + d[:, 2:]], axis=1))
            if self.use_kps:
                k = outs[i + 2 * self.fmc].reshape(-1, 10)[keep] * stride
                all_kps.append(c[:, None, :] + k.reshape(-1, 5, 2))
        scores = np.concatenate(all_scores)
        if scores.size == 0:
            return []
        boxes = np.concatenate(all_boxes) / scale
        kps = np.concatenate(all_kps) / scale if self.use_kps else None
        keep = nms(torch.from_numpy(boxes).float(), torch.from_numpy(scores).float(), self.nms_threshold).numpy()
        return [Face(boxes[j].astype(np.float32), float(scores[j]), None if kps is None else kps[j].astype(np.float32)) for j in keep]


def _ort_providers() -> list[str]:
    import onnxruntime as ort

    avail = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in avail] or avail


# --------------------------------------------------------------------------------------------
# insightface model packs


def _resolve_model_root(model_root: Union[str, os.PathLike]) -> Path:
    p = Path(os.path.expanduser(str(model_root)))
    if p.exists():
        return p
    pack = Path(os.path.expanduser("~/.insightface/models")) / str(model_root)
    if pack.is_dir():
        return pack
    raise RewardError(
        f"face_id: model_root={str(model_root)!r} is neither a file nor a folder (nor a pack under ~/.insightface/models); "
        "give the folder of an insightface model pack (e.g. buffalo_l with det_10g.onnx and w600k_r50.onnx) or an ArcFace .onnx file"
    )


def find_insightface_models(model_root: Union[str, os.PathLike]) -> dict[str, Optional[str]]:
    """Route the ``.onnx`` files of an insightface model pack to ``detection`` / ``recognition``.

    As insightface's ``ModelRouter``: a graph with 5 or more outputs is an SCRFD detector, one with
    a 112x112 input an ArcFace recogniser; landmark and gender/age models are ignored. A single
    ``.onnx`` file is taken as the recogniser.
    """
    import onnx

    root = _resolve_model_root(model_root)
    files = [root] if root.is_file() else sorted(Path(f) for f in glob.glob(str(root / "*.onnx")))
    found: dict[str, Optional[str]] = {"detection": None, "recognition": None}
    if root.is_file():
        found["recognition"] = str(root)
        return found
    for f in files:
        try:
            g = onnx.load(str(f), load_external_data=False).graph
        except Exception as e:  # noqa: BLE001 - a broken file in a pack is reported, not fatal
            log.warning("face_id: skipping %s: %s", f, e)
            continue
        inits = {i.name for i in g.initializer}
        inputs = [i for i in g.input if i.name not in inits]
        dims = [d.dim_value if d.HasField("dim_value") else None for d in inputs[0].type.tensor_type.shape.dim] if inputs else []
        if len(g.output) >= 5 and found["detection"] is None:
            found["detection"] = str(f)
        elif len(dims) == 4 and dims[2] == 112 and dims[3] == 112 and found["recognition"] is None:
            found["recognition"] = str(f)
    return found


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
    """An insightface ArcFace ONNX recogniser (``model_zoo/arcface_onnx.py``), optionally in torch.

    Input: aligned ``(N, 3, 112, 112)`` RGB in [0, 1]; it is normalised ``(255 x - mean) / std``
    with mean = std = 127.5, unless the graph starts with its own ``Sub``/``Mul`` nodes (old
    MXNet exports), in which case mean 0, std 1, the same rule insightface applies. The ONNX graph
    runs through onnxruntime (black box) or, when ``differentiable``, as a torch module converted
    with onnx2torch, so gradients flow back to the crop.
    """

    def __init__(self, path: str, differentiable: bool = False):
        super().__init__()
        import onnx

        self.path = path
        model = onnx.load(path)
        names = [n.name for n in model.graph.node[:8]]
        mxnet_style = any(n.startswith(("Sub", "_minus")) for n in names) and any(n.startswith(("Mul", "_mul")) for n in names)
        self.input_mean, self.input_std = (0.0, 1.0) if mxnet_style else (127.5, 127.5)
        inits = {i.name for i in model.graph.initializer}
        inp = [i for i in model.graph.input if i.name not in inits][0]
        dims = [d.dim_value if d.HasField("dim_value") else None for d in inp.type.tensor_type.shape.dim]
        if len(dims) != 4 or dims[1] not in (3, None):
            raise RewardError(f"face_id: {path} takes input of shape {dims}; an ArcFace recogniser takes (N, 3, 112, 112)")
        self.input_size = int(dims[2] or 112)
        self.fixed_batch = dims[0] if dims[0] else None
        self.input_name = inp.name
        self.differentiable = differentiable
        self.net: Optional[torch.nn.Module] = None
        self.session = None
        if differentiable:
            _require(("onnx2torch",), "face_id with differentiable=True")
            from onnx2torch import convert

            self.net = convert(model).eval()
            self.net.requires_grad_(False)
        else:
            import onnxruntime as ort

            self.session = _cached(("ort", path), lambda: ort.InferenceSession(path, providers=_ort_providers()))
        del model

    def normalise(self, crops: torch.Tensor) -> torch.Tensor:
        return (crops * 255.0 - self.input_mean) / self.input_std

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        """``(N, 3, S, S)`` aligned crops in [0, 1] -> ``(N, D)`` raw (unnormalised) embeddings."""
        x = self.normalise(crops)
        if self.net is not None:
            p = next(self.net.parameters(), None)
            if p is not None:
                x = x.to(device=p.device, dtype=p.dtype)
            return self.net(x).to(crops.device)
        arr = x.detach().float().cpu().numpy()
        step = self.fixed_batch or len(arr)
        outs = [self.session.run(None, {self.input_name: arr[i : i + step]})[0] for i in range(0, len(arr), max(1, step))]
        return torch.from_numpy(np.concatenate(outs)).to(crops.device)


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

        models = find_insightface_models(model_root) if model_root is not None else {"detection": None, "recognition": None}
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
