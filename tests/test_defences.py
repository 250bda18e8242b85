"""Run-time defences do what they state, the cloud restores every defended form, and the device runs each one."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

from splitleak.core import codec, data, defences, manifest, transport
from splitleak.device import client
from splitleak.protos import inference_pb2_grpc as pb_grpc


def split_for(shape, reference_std=0.7, ranking=None) -> manifest.Split:
    """A split as a calibrated manifest describes it, for activations of `shape` (without the batch)."""
    ranking = tuple(range(shape[0])) if ranking is None else tuple(ranking)
    return manifest.Split(
        "cut", Path("/m/cut.head.onnx"), Path("/m/cut.tail.onnx"), shape, "FP32", reference_std, ranking
    )


def over_the_wire(tensors, parameters, shape):
    """Encode as the device does, serialize, then decode and restore as the cloud does."""
    request = codec.encode_request("m", tensors, parameters=parameters)
    wire = type(request).FromString(request.SerializeToString())
    return defences.restore(codec.decode_request(wire), codec.get_parameters(wire.parameters), shape=shape)


def test_every_defence_is_built_by_name_and_refuses_a_strength_out_of_range():
    split = split_for((16, 8, 8))
    for name, cls in defences.DEFENCES.items():
        strength = cls.strengths.default if cls.strengths.default is not None else 0.5
        assert defences.build(name, strength=strength, split=split).name == name
    assert defences.build("quantise", split=split).bits == 8  # the default strength
    for name, strength, why in [
        ("dropout", 1.0, "fraction of elements zeroed"),
        ("quantise", 4.5, "bits per element"),
        ("quantise-channel", 9, "bits per element"),
        ("topk", -0.1, "fraction of channels pruned"),
        ("gaussian", -1, "reference std"),
        ("none", 1, "unused"),
    ]:
        with pytest.raises(ValueError, match=why):
            defences.build(name, strength=strength, split=split)
    with pytest.raises(ValueError, match="gaussian needs a strength"):
        defences.build("gaussian", split=split)
    with pytest.raises(KeyError, match="defences: none, gaussian"):
        defences.build("blur", strength=1, split=split)


@pytest.mark.parametrize("name, kurtosis", [("gaussian", 3.0), ("laplace", 6.0)])
def test_noise_has_the_stated_std_relative_to_the_splits_reference(name, kurtosis):
    rng = np.random.default_rng(0)
    activation = np.maximum(rng.normal(size=(8, 16, 32, 32)), 0).astype(np.float32)
    for strength in (0.1, 1.0):
        defence = defences.build(name, strength=strength, split=split_for((16, 32, 32), reference_std=0.7))
        tensors, form = defence.apply(activation, rng)
        noise = (tensors["activation"] - activation).astype(np.float64)
        assert tensors["activation"].dtype == np.float32 and form == {}
        assert abs(noise.std() / (strength * 0.7) - 1) < 0.03
        assert abs(noise.mean()) < 0.01 * strength
        assert abs(np.mean(noise**4) / noise.var() ** 2 - kurtosis) < 0.5  # the shape of the noise, not just its size


@pytest.mark.parametrize("name", ["dropout", "channel-dropout"])
def test_dropout_zeros_the_stated_fraction_and_scales_the_survivors(name):
    rng = np.random.default_rng(1)
    activation = rng.uniform(0.5, 1.5, size=(32, 64, 8, 8)).astype(np.float32)  # no zeros of its own
    for p in (0.1, 0.5):
        sent = defences.build(name, strength=p, split=split_for((64, 8, 8))).apply(activation, rng)[0]["activation"]
        zeroed = sent == 0
        assert abs(zeroed.mean() - p) < 0.03
        np.testing.assert_allclose(sent[~zeroed], activation[~zeroed] / (1 - p), rtol=1e-6)
        if name == "channel-dropout":  # whole feature maps, or nothing
            per_map = zeroed.reshape(32, 64, -1)
            assert (per_map.all(-1) | ~per_map.any(-1)).all()


@settings(max_examples=150, deadline=None)
@given(
    activation=arrays(
        np.float32,
        array_shapes(min_dims=2, max_dims=4, min_side=1, max_side=9),
        elements=st.floats(-1e4, 1e4, width=32, allow_subnormal=False),
    ),
    bits=st.integers(1, 8),
    per_channel=st.booleans(),
)
def test_quantised_activations_come_back_within_half_a_step_in_fewer_bytes(activation, bits, per_channel):
    shape = activation.shape[1:]
    defence = defences.build("quantise-channel" if per_channel else "quantise", strength=bits, split=split_for(shape))
    tensors, form = defence.apply(activation, np.random.default_rng(0))
    restored = over_the_wire(tensors, form, shape)
    assert restored.dtype == np.float32 and restored.shape == activation.shape
    count = math.prod(shape)
    assert tensors["activation"].nbytes == len(activation) * math.ceil(count * bits / 8)
    scale = tensors["scale"]  # (B, 1) or (B, C): the step of each group
    assert scale.shape == (len(activation), shape[0] if per_channel else 1)
    groups = scale.shape + (-1,)
    error = np.abs(restored.astype(np.float64) - activation).reshape(groups)
    assert (error <= scale[..., None].astype(np.float64) * (0.5 + 1e-4)).all()
    assert (restored[activation == 0] == 0).all()  # zeros (ReLU's) come back exact


@settings(max_examples=100, deadline=None)
@given(
    activation=arrays(
        np.float32,
        array_shapes(min_dims=2, max_dims=4, min_side=1, max_side=9),
        elements=st.floats(-6e4, 6e4, width=32),
    )
)
def test_fp16_activations_come_back_within_half_precision(activation):
    tensors, form = defences.build("fp16", split=split_for(activation.shape[1:])).apply(activation, None)
    assert tensors["activation"].nbytes * 2 == activation.nbytes
    restored = over_the_wire(tensors, form, activation.shape[1:]).astype(np.float64)
    assert (np.abs(restored - activation) <= np.maximum(np.abs(activation) * 2.0**-11, 2.0**-25)).all()


@settings(max_examples=100, deadline=None)
@given(bits=st.integers(1, 7), data=st.data())
def test_packing_levels_loses_nothing_for_any_length(bits, data):
    rows, count = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 200))
    levels = data.draw(arrays(np.uint8, (rows, count), elements=st.integers(0, 2**bits - 1)))
    packed = defences.pack(levels, bits)
    assert packed.shape == (rows, defences.packed_size(count, bits))
    np.testing.assert_array_equal(defences.unpack(packed, bits, count), levels)


def test_topk_sends_k_channels_and_restore_puts_them_back_in_place():
    rng = np.random.default_rng(2)
    activation = rng.uniform(0.5, 1.5, size=(3, 10, 4, 4)).astype(np.float32)
    ranking = (7, 2, 9, 0, 5, 1, 3, 4, 6, 8)  # most important first
    defence = defences.build("topk", strength=0.6, split=split_for((10, 4, 4), ranking=ranking))
    tensors, form = defence.apply(activation, rng)
    assert defence.k == 4 and tensors["activation"].shape == (3, 4, 4, 4)
    np.testing.assert_array_equal(tensors["channels"], [[0, 2, 7, 9]] * 3)
    restored = over_the_wire(tensors, form, (10, 4, 4))
    expected = activation.copy()
    expected[:, [1, 3, 4, 5, 6, 8]] = 0
    np.testing.assert_array_equal(restored, expected)
    # The forms compose: pruned channels, then quantised, come back to the same places.
    levels, scale, zero_point = defences.quantise(tensors["activation"], bits=8, per_channel=True)
    requantised = {"activation": levels, "scale": scale, "zero_point": zero_point, "channels": tensors["channels"]}
    restored = over_the_wire(requantised, {"bits": 8}, (10, 4, 4))
    np.testing.assert_allclose(restored, expected, atol=float(scale.max()))


@pytest.mark.slow
def test_export_calibrates_every_split_and_the_ranking_finds_the_channels_that_matter(tiny_model_dir):
    m = manifest.load(tiny_model_dir)
    for split in m.splits.values():
        assert split.reference_std > 0 and sorted(split.channel_ranking) == list(range(split.activation_shape[0]))
    # Out of sample: keeping the top-ranked half of layer1's channels changes the prediction less than the bottom half.
    split = m.split("layer1")
    images = data.load("cifar10", "test").images[::2]  # 200 images the calibration never saw
    head, tail = (ort.InferenceSession(str(p)) for p in (split.head, split.tail))
    activation = head.run(None, {"image": m.preprocess(images)})[0]
    intact = tail.run(None, {"activation": activation})[0].argmax(1)
    half = len(split.channel_ranking) // 2

    def agreement(kept) -> float:
        pruned = np.zeros_like(activation)
        pruned[:, kept] = activation[:, kept]
        return float(np.mean(tail.run(None, {"activation": pruned})[0].argmax(1) == intact))

    # The tiny model is weak (about a third accurate), so the margin between the halves may be small but must be there.
    assert agreement(list(split.channel_ranking[:half])) > agreement(list(split.channel_ranking[half:]))


def test_an_old_manifest_refuses_only_the_defences_that_need_calibration(shipped_model_dir, tmp_path, capsys):
    old = Path(shutil.copytree(shipped_model_dir, tmp_path / "old"))
    doc = json.loads((old / "manifest.json").read_text())
    doc.pop("calibration")
    for s in doc["splits"].values():
        s.pop("calibration")
    (old / "manifest.json").write_text(json.dumps(doc))
    split = manifest.load(old).split("layer1")
    for name, strength in (("none", None), ("dropout", 0.1), ("fp16", None), ("quantise", 4)):
        defences.build(name, strength=strength, split=split)
    for name, what in (("gaussian", "reference_std"), ("topk", "channel_ranking")):
        with pytest.raises(ValueError, match=f"needs the {what} of split 'layer1'.*re-export"):
            defences.build(name, strength=0.5, split=split)
    args = client.get_args_parser().parse_args(["--model-dir", str(old), "--defence", "laplace", "--strength", "0.1"])
    assert client.main(args) == 2
    assert "laplace needs the reference_std" in capsys.readouterr().err


# Strengths mild enough that the tiny ResNet-20 (about a third accurate, so fragile) still mostly says the same.
END_TO_END = [
    ("none", None),
    ("gaussian", 0.25),
    ("laplace", 0.25),
    ("dropout", 0.1),
    ("channel-dropout", 0.1),
    ("fp16", None),
    ("quantise", 8),
    ("quantise-channel", 8),
    ("quantise", 4),
    ("topk", 0.25),
]


@pytest.mark.slow
def test_every_defence_runs_end_to_end_keeping_predictions_and_shrinking_bytes(cloud, tiny_model_dir, tmp_path):
    device = [sys.executable, "-m", "splitleak.cli", "device", "--cloud", f"127.0.0.1:{cloud}"]
    common = ["--model-dir", str(tiny_model_dir), "--dataset", "cifar10", "--limit", "100", "--split", "layer1"]
    reports = {}
    for name, strength in END_TO_END:
        out = tmp_path / f"{name}-{strength}.json"
        argv = [*common, "--defence", name, *([] if strength is None else ["--strength", str(strength)])]
        if name == "quantise" and strength == 4:  # one as a real device process, the rest through the same main()
            done = subprocess.run([*device, *argv, "--json", str(out)], capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stderr
            assert "defence quantise (strength 4)" in done.stdout
            assert any(line.startswith("defence ") for line in done.stdout.splitlines())  # its own stage
        else:
            args = client.get_args_parser().parse_args([*argv, "--cloud", f"127.0.0.1:{cloud}", "--json", str(out)])
            assert client.main(args) == 0
        reports[name, strength] = json.loads(out.read_text())

    def predictions(report) -> np.ndarray:
        return np.array([f["prediction"] for f in report["frames"]])

    base = reports["none", None]
    rows = {}
    for (name, strength), report in reports.items():
        assert report["config"]["defence"] == {"name": name, "strength": float(strength or 0)}
        assert all(f["error"] is None and f["defence"] == name for f in report["frames"])
        assert [f["frame"] for f in report["frames"]] == [f["frame"] for f in base["frames"]]
        summary = report["summary"]
        rows[name, strength] = {
            "agreement": float(np.mean(predictions(report) == predictions(base))),
            "accuracy": summary["accuracy"],
            "bytes_up": summary["bytes_up"],
            "defence_ms": summary["stages_ms"]["defence"]["median"],
        }
    print("\n".join(f"{n:>16} {s!s:>5}: {r}" for (n, s), r in rows.items()))  # the trade-off, with pytest -s

    assert rows["fp16", None]["agreement"] >= 0.99
    assert rows["quantise", 8]["agreement"] >= 0.97 and rows["quantise-channel", 8]["agreement"] >= 0.97
    assert rows["quantise", 4]["agreement"] >= 0.9
    assert all(r["agreement"] >= 0.5 for r in rows.values())  # degraded, not destroyed (chance is about 0.1)
    assert all(r["accuracy"] >= base["summary"]["accuracy"] - 0.15 for r in rows.values())
    full = rows["none", None]["bytes_up"]
    for key, most in [(("fp16", None), 0.52), (("quantise", 8), 0.27), (("quantise", 4), 0.14), (("topk", 0.25), 0.77)]:
        assert rows[key]["bytes_up"] <= most * full, key


@pytest.fixture
def stub(shipped_cloud):
    with transport.channel(f"127.0.0.1:{shipped_cloud}") as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def test_the_cloud_restores_quantised_and_pruned_activations_and_refuses_malformed_ones(stub, shipped_model_dir):
    m = manifest.load(shipped_model_dir)
    split = m.split("layer2")  # (32, 16, 16)
    name, shape = m.served_name("layer2"), split.activation_shape
    activation = np.random.default_rng(3).uniform(0, 2, size=(2, *shape)).astype(np.float32)
    tail = ort.InferenceSession(str(split.tail))

    def infer(tensors, parameters):
        return codec.decode_response(stub.ModelInfer(codec.encode_request(name, tensors, parameters=parameters)))

    # What the cloud answers is the tail run on what the device meant to send.
    for defence_name, strength in (("quantise", 4), ("topk", 0.5)):
        tensors, form = defences.build(defence_name, strength=strength, split=split).apply(activation, None)
        meant = defences.restore(tensors, form, shape=shape)
        np.testing.assert_allclose(infer(tensors, form)["logits"], tail.run(None, {"activation": meant})[0], atol=1e-5)

    good, form = defences.build("quantise", strength=4, split=split).apply(activation, None)
    cases = [
        ({"activation": good["activation"]}, form, "UINT8 'activation' needs inputs 'scale' (FP32) and 'zero_point'"),
        (
            {**good, "scale": np.ones((2, 7), np.float32)},
            form,
            "'scale' is FP32 [2, 7]; expected FP32 [2, 1] or [2, 32]",
        ),
        ({**good, "scale": -good["scale"]}, form, "'scale' must be positive and finite"),
        ({**good, "zero_point": np.full((2, 1), 16, np.uint8)}, form, "'zero_point' must be a 4-bit level"),
        ({**good, "activation": good["activation"][:, :-1]}, form, "got shape [2, 4095] for 4-bit UINT8 'activation'"),
        (good, {"bits": 9}, "request parameter 'bits' is 9; expected an integer from 1 to 8"),
        (good, {}, "got shape [2, 4096] for 8-bit UINT8 'activation'"),
        ({"activation": activation, "scale": good["scale"]}, {}, "'scale' and 'zero_point' go with UINT8 levels"),
        (
            {"activation": activation[:, :2], "channels": np.array([[0, 40]] * 2, np.int32)},
            {},
            "'channels' must name 1 to 32 channels, each in [0, 32)",
        ),
        ({"activation": activation[:, :2], "channels": np.array([[3, 3]] * 2, np.int32)}, {}, "names a channel twice"),
        ({"activation": activation[:, :2], "channels": np.array([[0, 1]] * 2, np.int64)}, {}, "expected INT32 [2, k]"),
        ({"activation": activation.astype(np.int8)}, {}, "got datatype 'INT8'"),
        ({"activation": activation, "noise": activation}, {}, "got inputs ['activation', 'noise']"),
    ]
    for tensors, parameters, message in cases:
        with pytest.raises(grpc.RpcError) as error:
            infer(tensors, parameters)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, message
        details = error.value.details()
        assert message in details, details
        # Every refusal names what the cloud takes, defended forms included.
        assert "expected one input 'activation' of datatype FP32 and shape [-1, 32, 16, 16]" in details
        assert "UINT8 levels of that shape, or packed to [-1, ceil(8192 * bits / 8)]" in details
    assert infer(good, form)["logits"].shape == (2, 10)  # still serving
