"""Regenerate tests/data (the suite's small sample of the shared data sets) from ../shared/datasets.

    python tests/data/make_sample.py            # write tests/data/NAME/{train,test}.npz, print each sha256
    python tests/data/make_sample.py --check    # regenerate into a temporary folder; exit 1 if anything differs

Every subset is a fixed slice, so the same source gives the same arrays. The files are written with a fixed date in
every zip entry (np.savez_compressed stamps the time of writing), so they come out byte for byte the same too.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SOURCE = HERE.parents[1] / ".." / "shared" / "datasets"
# CIFAR-10 is stored grouped by class: the first N of each class, kept grouped. MNIST is in its original order:
# its first N. AT&T faces: all of it, since naming a person needs all 40 in the gallery (copied byte for byte).
PER_CLASS = {("cifar10", "train"): 100, ("cifar10", "test"): 40}
FIRST = {("mnist", "train"): 600, ("mnist", "test"): 200}
WHOLE = ("att_faces",)
SPLITS = ("train", "test")


def subset(images: np.ndarray, labels: np.ndarray, key: tuple[str, str]) -> np.ndarray:
    """The indices kept of one split."""
    if key in PER_CLASS:
        return np.concatenate([np.flatnonzero(labels == c)[: PER_CLASS[key]] for c in np.unique(labels)])
    return np.arange(FIRST[key])


def save(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """As np.savez_compressed, but with a fixed date in each entry, so the bytes depend on the arrays alone."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.asarray(array), allow_pickle=False)
            entry = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            entry.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(entry, buffer.getvalue())


def make(source: Path, out: Path) -> dict[str, str]:
    """Write the sample under `out`; returns each file's sha256 by its path relative to `out`."""
    written = {}
    for name in sorted({n for n, _ in PER_CLASS} | {n for n, _ in FIRST} | set(WHOLE)):
        (out / name).mkdir(parents=True, exist_ok=True)
        for split in SPLITS:
            path = out / name / f"{split}.npz"
            if name in WHOLE:
                shutil.copyfile(source / name / f"{split}.npz", path)
            else:
                with np.load(source / name / f"{split}.npz") as f:
                    keep = subset(f["images"], f["labels"], (name, split))
                    save(path, {"images": f["images"][keep], "labels": f["labels"][keep], "classes": f["classes"]})
            written[f"{name}/{split}.npz"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=SOURCE, help="default: ../shared/datasets")
    parser.add_argument("--check", action="store_true", help="compare a fresh generation with the committed files")
    args = parser.parse_args()
    if not args.check:
        for path, digest in make(args.source, HERE).items():
            print(f"- `{path}`: `{digest}`")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = make(args.source, Path(tmp))
        differ = [p for p, digest in fresh.items() if hashlib.sha256((HERE / p).read_bytes()).hexdigest() != digest]
    print("\n".join(f"{p} differs from a fresh generation" for p in differ) or "the sample is what the script makes")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
