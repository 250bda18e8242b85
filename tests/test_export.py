"""Head then tail, in ONNX Runtime, reproduce the full PyTorch model at every split point of every model."""

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from splitleak.core import manifest
from splitleak.model import export, zoo

# torchvision's ImageNet models run here at 64 px: the split arithmetic is the same as at 224, the export is faster.
SIZES = {"resnet20": 32, "hecnn": 32, "mobilenet_v2": 64, "resnet18": 64}
# The slowest to export (6 to 14 s each here): the quick loop keeps the CIFAR-size models.
SLOW_TO_EXPORT = {"mobilenet_v2", "resnet18"}


@pytest.mark.parametrize(
    "model_name", [pytest.param(m, marks=pytest.mark.slow) if m in SLOW_TO_EXPORT else m for m in zoo.ZOO]
)
def test_head_then_tail_reproduce_the_full_model_at_every_split(model_name, tmp_path: Path):
    torch.manual_seed(0)
    model = zoo.build(model_name, num_classes=10).eval()
    size = SIZES[model_name]
    # Random weights give BatchNorm trivial statistics; perturb them so that the comparison means something.
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    entry = zoo.ZOO[model_name]
    export.export(
        model,
        tmp_path,
        name=f"{model_name}-test",
        model_name=model_name,
        dataset="test",
        classes=[str(i) for i in range(10)],
        input_shape=(3, size, size),
        mean=[0.5] * 3,
        std=[0.25] * 3,
        split_points=entry.split_points,
        default_split=entry.default_split,
    )
    m = manifest.load(tmp_path)
    assert list(m.splits) == list(entry.split_points)
    x = np.random.default_rng(0).standard_normal((3, 3, size, size)).astype(np.float32)
    with torch.no_grad():
        reference = model(torch.from_numpy(x)).numpy()
    for split in m.splits.values():
        activation = ort.InferenceSession(str(split.head)).run(None, {"image": x})[0]
        assert activation.shape[1:] == split.activation_shape
        logits = ort.InferenceSession(str(split.tail)).run(None, {"activation": activation})[0]
        assert np.abs(logits - reference).max() <= 1e-4, f"{model_name} split at {split.name}"


def test_he_cnn_has_the_papers_split_points_and_shapes():
    model = zoo.build("hecnn")
    x = torch.zeros(1, 3, 32, 32)
    shapes = {name: zoo.split(model, name)[0](x).shape[1:] for name in ("conv11", "relu22", "relu32")}
    assert shapes == {"conv11": (64, 32, 32), "relu22": (128, 16, 16), "relu32": (128, 8, 8)}


def test_a_tampered_onnx_file_fails_its_checksum(shipped_model_dir: Path, tmp_path: Path):
    import shutil

    copy = Path(shutil.copytree(shipped_model_dir, tmp_path / "copy"))
    (copy / "layer1.head.onnx").write_bytes((copy / "layer1.head.onnx").read_bytes() + b"\0")
    with pytest.raises(ValueError, match="does not match the sha256"):
        manifest.load(copy)


def test_unknown_split_points_and_models_are_named_in_the_error():
    with pytest.raises(KeyError, match="the zoo has resnet20"):
        zoo.build("vgg99")
    with pytest.raises(KeyError, match="blocks: stem, layer1"):
        zoo.split(zoo.build("resnet20"), "layer9")
