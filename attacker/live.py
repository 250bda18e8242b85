"""The attacker, live: inverts each intercepted activation as it arrives and scores the reconstruction.

The attacks run here were trained beforehand and exported to ONNX (`splitleak attacker train-decoder` writes
`SPLIT.ATTACK.onnx` into the model's `attacks/` folder), so inverting a frame is one ONNX Runtime call of a
millisecond or two, fast enough for a device at camera rate, and this module never imports torch.

Each intercepted request is decoded as the cloud decodes it (a defended activation is restored to the float32
activation the tail takes, with splitleak.core.defences), inverted by every exported attack for its split point, and
scored against the private frame behind it (its `frame_id` in the test split of the data set the device streams, known
to the simulation, never to the attacker): PSNR and SSIM (splitleak.attacker.scoring), and the label the cloud's own
classifier (head and tail, run here with ONNX Runtime) gives the reconstruction. Given a gallery of other photos of
the same people, it also names who is in each reconstruction, as `scoring.identify` does: the attacker's best guess.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
from google.protobuf.message import DecodeError

from splitleak.attacker import scoring
from splitleak.core import codec, data, defences
from splitleak.core.manifest import Manifest, sha256
from splitleak.protos import inference_pb2 as pb

ATTACKS_FOLDER = "attacks"  # inside an exported model's folder
# What every exported attack's ONNX metadata holds (splitleak.attacker.train_decoder writes it).
METADATA = ("attack", "knowledge", "model", "split", "head_sha256", "command", "psnr", "ssim")


def _session(path: Path, threads: int = 1) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class ExportedInverse:
    """An attack exported to ONNX: `invert`, as every attack has, run with ONNX Runtime."""

    def __init__(self, path: str | Path, *, threads: int = 1) -> None:
        self.path = Path(path)
        self.session = _session(self.path, threads)
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)
        self.activation_shape = tuple(self.session.get_inputs()[0].shape[1:])

    def invert(self, activations: np.ndarray) -> np.ndarray:
        """Batch-first activations -> reconstructions, float32 (N, H, W, C) in [0, 1]."""
        activations = np.asarray(activations, np.float32)
        if activations.shape[1:] != self.activation_shape:
            raise ValueError(
                f"{self.path} inverts activations of shape {self.activation_shape}, not {activations.shape[1:]}"
            )
        reconstructions = self.session.run(["reconstruction"], {"activation": activations})[0]
        return np.clip(reconstructions, 0.0, 1.0)


def load_attacks(m: Manifest, folder: str | Path | None = None) -> dict[str, dict[str, ExportedInverse]]:
    """The exported attacks for model `m`, {attack: {split: inverse}}, from `folder` (default: its attacks/).

    An attack exported for another head is refused, saying how to train it again: it would invert nonsense."""
    folder = Path(folder) if folder is not None else m.root / ATTACKS_FOLDER
    attacks: dict[str, dict[str, ExportedInverse]] = {}
    for path in sorted(folder.glob("*.onnx")) if folder.is_dir() else []:
        inverse = ExportedInverse(path)
        meta = inverse.metadata
        missing = [key for key in METADATA if key not in meta]
        if missing:
            raise ValueError(f"{path} is not an exported attack: its metadata lacks {', '.join(missing)}")
        if meta["model"] != m.name or meta["split"] not in m.splits:
            raise ValueError(f"{path} attacks {meta['model']} at {meta['split']}, not a split of {m.name}")
        if meta["head_sha256"] != sha256(m.split(meta["split"]).head):
            raise ValueError(f"{path} was trained on another {meta['split']} head; train it again: {meta['command']}")
        attacks.setdefault(meta["attack"], {})[meta["split"]] = inverse
    return attacks


@dataclass
class Interception:
    """One intercepted request, restored, inverted and scored."""

    captured_ns: int
    split: str
    frame_id: int | None
    parameters: dict  # the request's, as sent: device_send_ns, defence, defence_strength, ...
    activation: np.ndarray  # (C, h, w) float32, as the tail takes it
    original: np.ndarray | None  # uint8 (H, W, C), the private frame, where the frame id names one
    identity: int | None = None  # who is in it, where the data set's labels name people
    # {attack: {"reconstruction": float32 (H, W, C), "psnr", "ssim" (None without an original), "label": int,
    #           "identity": the gallery's best match, with a gallery}}
    attacks: dict[str, dict] = field(default_factory=dict)


class LiveAttacker:
    """Turns each intercepted request for model `m` into an Interception, with the exported `attacks`."""

    def __init__(
        self,
        m: Manifest,
        attacks: dict[str, dict[str, ExportedInverse]],
        *,
        dataset: data.Dataset | None = None,
        gallery: data.Dataset | None = None,
    ) -> None:
        self.manifest = m
        self.attacks = attacks
        self.dataset = dataset  # where the frame ids point: the test split the device streams
        c, h, _ = m.input_shape
        # Other photos of the people in `dataset` (its train split), at the model's input size once and for all.
        self.gallery = None if gallery is None else replace(gallery, images=data.resize(gallery.images, h, c))
        self._originals: dict[int, np.ndarray] = {}
        # The cloud's classifier, whole: head and tail at any one split compute the same function.
        split = m.split(None)
        self._classifier = (_session(split.head), _session(split.tail))

    def intercept(
        self, request_bytes: bytes, captured_ns: int, *, attacks: Collection[str] | None = None
    ) -> Interception | None:
        """Restore, invert (with `attacks`, default all) and score one request; None if it is not a frame of `m`."""
        try:
            request = pb.ModelInferRequest.FromString(request_bytes)
            parameters = codec.get_parameters(request.parameters)
            name, _, split = request.model_name.rpartition(".")
            if name != self.manifest.name or split not in self.manifest.splits:
                return None
            tensors = codec.decode_request(request)
            activation = defences.restore(tensors, parameters, shape=self.manifest.splits[split].activation_shape)
        except (DecodeError, codec.CodecError, defences.RestoreError, KeyError):
            return None  # the cloud turns these down too
        frame_id = parameters.get("frame_id") if len(activation) == 1 else None
        original = self.original(int(frame_id)) if frame_id is not None else None
        identity = int(self.dataset.labels[frame_id]) if original is not None and self.gallery is not None else None
        result = Interception(captured_ns, split, frame_id, parameters, activation[0], original, identity)
        for attack, by_split in self.attacks.items():
            if (attacks is not None and attack not in attacks) or split not in by_split:
                continue
            reconstruction = by_split[split].invert(activation[:1])
            scores = {"psnr": None, "ssim": None, "identity": None}
            if original is not None:
                scores["psnr"] = float(scoring.psnr(original[None], reconstruction)[0])
                scores["ssim"] = float(scoring.ssim(original[None], reconstruction)[0])
            if self.gallery is not None:
                scores["identity"] = int(scoring.identify(reconstruction, self.gallery)[0])
            result.attacks[attack] = {
                "reconstruction": reconstruction[0],
                **scores,
                "label": int(self.classify(reconstruction)[0]),
            }
        return result

    def original(self, frame_id: int) -> np.ndarray | None:
        """The private frame `frame_id` as the device's head saw it, uint8 (H, W, C); None if there is none."""
        if self.dataset is None or not 0 <= frame_id < len(self.dataset):
            return None
        if frame_id not in self._originals:
            c, h, _ = self.manifest.input_shape
            self._originals[frame_id] = data.resize(self.dataset.images[frame_id : frame_id + 1], h, c)[0]
        return self._originals[frame_id]

    def classify(self, images: np.ndarray) -> np.ndarray:
        """The cloud's label for float images in [0, 1], (N, H, W, C)."""
        m = self.manifest
        x = (images.transpose(0, 3, 1, 2) - m.mean[:, None, None]) / m.std[:, None, None]
        head, tail = self._classifier
        activation = head.run(["activation"], {"image": np.ascontiguousarray(x, np.float32)})[0]
        return tail.run(["logits"], {"activation": activation})[0].argmax(1)
