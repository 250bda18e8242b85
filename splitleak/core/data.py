"""Image data sets as plain numpy arrays, so the device (which has no torch) reads them the same way as training does.

A data set is named by a string:
- `cifar10`, `mnist`, `fashion_mnist`, `att_faces`, ...: an `.npz` folder under the data root
  (`$SPLITLEAK_DATA`, else `../shared/datasets` when it exists), with `images` (uint8, N x H x W x C),
  `labels` and `classes`;
- `embedded` (real photos) and `embedded-faces` (a small face set): shipped with scikit-image, so the project runs
  with neither network nor data root;
- `torchvision:CIFAR10` (any torchvision data set with `.data` and `.targets`): downloaded by torchvision into the
  cache, for users who are online;
- `imagefolder:PATH`: one sub-folder of images per class.

A frame the device streams names its image by one number, its frame id, whichever split it comes from (`frame_ids`,
`frames`): ids 0 to len(test) - 1 are the test split's images in order, and id len(test) + i is the train split's
image i. The test split comes first so that every id from before the device could stream training images keeps its
meaning; and a tap that knows the data set tells a member of the shipped model's training set from its id alone.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[2]
FRAMES = ("test", "train", "mix")  # which split the device's frames come from; mix: half of each


@dataclass(frozen=True)
class Dataset:
    name: str
    images: np.ndarray  # (N, H, W, C) uint8
    labels: np.ndarray  # (N,) int64; -1 where the image has no label
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.images)

    def take(self, indices) -> Dataset:
        return Dataset(self.name, self.images[indices], self.labels[indices], self.classes)

    def labels_as(self, classes: tuple[str, ...]) -> tuple[np.ndarray, list[str]]:
        """The labels as indices into a model's `classes`, matched by class name (an image folder's sub-folders come
        sorted, a model's classes in its own order); -1 for an image whose class the model does not know. Also the
        names of this data set's classes that found no match, for the caller to warn about."""
        index = {name: i for i, name in enumerate(classes)}
        mapping = np.array([index.get(name, -1) for name in self.classes] + [-1], np.int64)  # label -1 stays -1
        unmapped = [name for name in self.classes if name not in index]
        return mapping[self.labels], unmapped


def data_root() -> Path | None:
    if env := os.environ.get("SPLITLEAK_DATA"):
        return Path(env)
    for candidate in (Path.cwd() / ".." / "shared" / "datasets", REPO_ROOT / ".." / "shared" / "datasets"):
        if candidate.is_dir():
            return candidate.resolve()
    return None


def cache_dir() -> Path:
    path = Path(os.environ.get("SPLITLEAK_CACHE", Path.home() / ".cache" / "splitleak"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def default_dataset() -> str:
    """CIFAR-10 from the data root when there is one, else the embedded photos."""
    root = data_root()
    return "cifar10" if root is not None and (root / "cifar10" / "test.npz").exists() else "embedded"


def load(name: str, split: str = "test") -> Dataset:
    if name == "embedded":
        return _embedded_photos()
    if name == "embedded-faces":
        return _embedded_faces()
    if name.startswith("torchvision:"):
        return _torchvision(name.split(":", 1)[1], split)
    if name.startswith("imagefolder:"):
        return _image_folder(Path(name.split(":", 1)[1]))
    root = data_root()
    path = None if root is None else root / name / f"{split}.npz"
    if path is None or not path.exists():
        raise FileNotFoundError(
            f"data set {name!r} ({split}) not found: looked for {path or 'a data root'}; set SPLITLEAK_DATA to the "
            "folder of .npz data sets, or use 'embedded', 'torchvision:NAME' or 'imagefolder:PATH'"
        )
    with np.load(path) as f:
        images = f["images"]
        return Dataset(
            name,
            images if images.ndim == 4 else images[..., None],
            f["labels"].astype(np.int64),
            tuple(str(c) for c in f["classes"]),
        )


def resize(images: np.ndarray, size: int, channels: int) -> np.ndarray:
    """Centre-crop to a square and resize to `size` (bilinear), converting to `channels`; uint8 in and out."""
    from PIL import Image

    if images.shape[1] == images.shape[2] == size and images.shape[3] == channels:
        return images
    mode = "RGB" if channels == 3 else "L"
    out = np.empty((len(images), size, size, channels), np.uint8)
    for i, img in enumerate(images):
        h, w = img.shape[:2]
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        pil = Image.fromarray(
            img[top : top + s, left : left + s].squeeze(-1)
            if img.shape[2] == 1
            else img[top : top + s, left : left + s]
        )
        arr = np.asarray(pil.convert(mode).resize((size, size), Image.BILINEAR))
        out[i] = arr if arr.ndim == 3 else arr[..., None]
    return out


# Photos that scikit-image ships inside its wheel, with the CIFAR-10 class each one shows (or none).
_EMBEDDED_PHOTOS = {
    "chelsea": "cat",
    "coffee": None,
    "astronaut": None,
    "rocket": None,
    "camera": None,
    "immunohistochemistry": None,
    "retina": None,
    "hubble_deep_field": None,
    "colorwheel": None,
}
_CIFAR10 = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _embedded_photos() -> Dataset:
    """scikit-image's bundled photos, each cut into its centre and four corner crops, as 32x32 RGB."""
    from skimage import data as skdata

    crops, labels = [], []
    for name, cls in _EMBEDDED_PHOTOS.items():
        img = getattr(skdata, name)()
        img = np.repeat(img[..., None], 3, -1) if img.ndim == 2 else img[..., :3]
        h, w = img.shape[:2]
        s = int(min(h, w) * 0.8)
        for top, left in ((0, 0), (0, w - s), (h - s, 0), (h - s, w - s), ((h - s) // 2, (w - s) // 2)):
            crops.append(resize(img[None, top : top + s, left : left + s], 32, 3)[0])
            labels.append(_CIFAR10.index(cls) if cls else -1)
    return Dataset("embedded", np.stack(crops), np.array(labels, np.int64), _CIFAR10)


def _embedded_faces() -> Dataset:
    """scikit-image's LFW subset: 100 faces (25x25 grey), labelled 1, and 100 non-faces, labelled 0."""
    from skimage import data as skdata

    images = (skdata.lfw_subset() * 255).round().astype(np.uint8)[..., None]
    labels = np.array([1] * 100 + [0] * 100, np.int64)
    return Dataset("embedded-faces", images, labels, ("not a face", "face"))


def _torchvision(name: str, split: str) -> Dataset:
    import torchvision

    cls = getattr(torchvision.datasets, name)
    ds = cls(str(cache_dir() / "torchvision"), train=split == "train", download=True)
    images = np.asarray(ds.data)
    images = images if images.ndim == 4 else images[..., None]
    return Dataset(f"torchvision:{name}", images.astype(np.uint8), np.asarray(ds.targets, np.int64), tuple(ds.classes))


def _image_folder(root: Path) -> Dataset:
    from PIL import Image

    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise FileNotFoundError(f"{root} has no class sub-folders")
    images, labels = [], []
    for label, cls in enumerate(classes):
        for path in sorted((root / cls).iterdir()):
            if path.suffix.lower() in {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}:
                images.append(np.asarray(Image.open(path).convert("RGB")))
                labels.append(label)
    side = min(min(i.shape[:2]) for i in images)
    return Dataset(
        f"imagefolder:{root}",
        np.concatenate([resize(i[None], side, 3) for i in images]),
        np.array(labels, np.int64),
        tuple(classes),
    )


def _has_train_split(name: str) -> bool:
    """Whether `name` has a train split apart from its test split (the embedded sets and image folders have one set)."""
    return not (name in {"embedded", "embedded-faces"} or name.startswith("imagefolder:"))


def frame_ids(name: str, split: str, indices: np.ndarray) -> np.ndarray:
    """The frame ids of the images `indices` of `split` ("test" or "train") of data set `name`."""
    indices = np.asarray(indices, np.int64)
    if split == "test":
        return indices
    if split != "train" or not _has_train_split(name):
        raise ValueError(f"{name} has no {split!r} split to name frames from; frames come from 'test' or 'train'")
    return len(load(name, "test")) + indices


def is_train_frame(name: str, ids: np.ndarray) -> np.ndarray:
    """(N,) bool: which frame ids name a train-split image of data set `name`."""
    return np.asarray(ids, np.int64) >= len(load(name, "test"))


def frames(name: str, ids: np.ndarray) -> Dataset:
    """The images and labels behind frame ids `ids` of data set `name`, in their order (the train split is read only
    when an id names one of its images)."""
    ids = np.asarray(ids, np.int64)
    test = load(name, "test")
    train_count = len(load(name, "train")) if (ids >= len(test)).any() and _has_train_split(name) else 0
    if ((ids < 0) | (ids >= len(test) + train_count)).any():
        bad = ids[(ids < 0) | (ids >= len(test) + train_count)][:3].tolist()
        raise ValueError(
            f"frame ids {bad} name no image of {name}: its ids run from 0 to {len(test) + train_count - 1} "
            f"({len(test)} test images, then {train_count} train images)"
        )
    if not train_count:
        return test.take(ids)
    train = load(name, "train")
    from_train = ids >= len(test)
    images = np.empty((len(ids), *test.images.shape[1:]), np.uint8)
    labels = np.empty(len(ids), np.int64)
    images[~from_train], labels[~from_train] = test.images[ids[~from_train]], test.labels[ids[~from_train]]
    train_ids = ids[from_train] - len(test)
    images[from_train], labels[from_train] = train.images[train_ids], train.labels[train_ids]
    return Dataset(name, images, labels, test.classes)


def draw_frames(name: str, kind: str, limit: int, seed: int = 0) -> np.ndarray:
    """The frame ids of `limit` images drawn at random without replacement from the test split, the train split, or
    (`mix`) half from each, shuffled together. At random because the shared data sets are stored grouped by class."""
    rng = np.random.default_rng(seed)
    if kind == "test":
        return rng.permutation(len(load(name, "test")))[:limit]  # as the device drew frames before it had `kind`
    if kind not in FRAMES:
        raise ValueError(f"frames come from {', '.join(FRAMES)}, not {kind!r}")
    if not _has_train_split(name):
        raise ValueError(f"{name} has no train split apart from its test split: stream its frames with 'test'")
    test_count, train_count = len(load(name, "test")), len(load(name, "train"))
    train_limit = limit if kind == "train" else limit // 2
    ids = test_count + rng.permutation(train_count)[:train_limit]
    if kind == "mix":
        ids = np.concatenate([ids, rng.permutation(test_count)[: limit - train_limit]])
    return rng.permutation(ids)
