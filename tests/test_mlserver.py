"""The tail on Seldon's MLServer: `mlserver start` from .venv-mlserver (which `make test` builds), serving the
repository `splitleak mlserver repo` writes, on loopback; the device streams to it over MLServer's ModelStreamInfer,
which answers bare ModelInferResponses (`--stream oip`), or sends one unary ModelInfer a frame. Skipped, saying why,
where MLServer's venv is missing or it cannot start."""

from __future__ import annotations

import json

import grpc
import numpy as np
import pytest
from test_triton import agrees_with_splitleak_s_cloud, captured_through_the_proxy, run_device, serving

from splitleak.cloud.mlserver import MLServer
from splitleak.core import codec
from splitleak.core.transport import channel
from splitleak.protos import inference_pb2_grpc as pb_grpc


@pytest.fixture(scope="module")
def mlserver_port(shipped_model_dir, tmp_path_factory):
    """A real MLServer serving every split of the shipped model; yields its gRPC port."""
    yield from serving(MLServer, shipped_model_dir, tmp_path_factory.mktemp("mlserver"))


@pytest.mark.slow
def test_the_device_sends_200_frames_at_every_split_to_mlserver_with_the_predictions_of_splitleak_s_cloud(
    mlserver_port, shipped_cloud, shipped_model_dir, tmp_path
):
    agrees_with_splitleak_s_cloud(mlserver_port, shipped_cloud, shipped_model_dir, tmp_path)


def test_mlserver_gets_its_own_stream_or_one_model_infer_a_frame_and_triton_s_stream_fails_in_one_line(
    mlserver_port, tmp_path
):
    answers = {}
    for stream, how in [
        ("auto", "over a ModelStreamInfer that answers bare ModelInferResponses, picked by --stream auto"),
        ("off", "one ModelInfer a frame"),
    ]:
        done = run_device(mlserver_port, tmp_path / f"{stream}.json", "--limit", "20", "--stream", stream)
        assert done.returncode == 0, done.stderr
        assert f"(mlserver, {how})" in done.stdout
        report = json.loads((tmp_path / f"{stream}.json").read_text())
        assert report["summary"]["reconnects"] == 0  # one call carries every frame
        answers[stream] = [(f["frame"], f["prediction"], f["error"]) for f in report["frames"]]
    assert len(answers["auto"]) == 20 and answers["auto"] == answers["off"]
    forced = run_device(mlserver_port, tmp_path / "forced.json", "--limit", "5", "--stream", "triton")
    assert forced.returncode == 1 and "Traceback" not in forced.stderr
    last = forced.stderr.strip().splitlines()[-1]
    assert last.endswith("use --stream oip (bare ModelInferResponse answers, as MLServer's) or --stream off")


def test_mlserver_refuses_a_bad_shape_and_an_unknown_model_with_a_status_that_says_why(mlserver_port):
    def infer(name: str, shape: tuple[int, ...]) -> grpc.RpcError:
        request = codec.encode_request(name, {"activation": np.zeros(shape, np.float32)})
        with channel(f"127.0.0.1:{mlserver_port}") as ch, pytest.raises(grpc.RpcError) as refused:
            pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(request)
        return refused.value

    bad_shape = infer("resnet20-cifar10.layer3", (1, 64, 8, 7))
    assert bad_shape.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "got inputs [('activation', 'FP32', [1, 64, 8, 7])]" in bad_shape.details()
    assert "expected one FP32 'activation' of shape [-1, 64, 8, 8]" in bad_shape.details()
    unknown = infer("resnet20-cifar10.nowhere", (1, 64, 8, 8))
    assert unknown.code() == grpc.StatusCode.NOT_FOUND and "resnet20-cifar10.nowhere" in unknown.details()


def test_a_defended_form_mlserver_cannot_take_is_refused_in_one_line_before_the_first_frame(mlserver_port, tmp_path):
    done = run_device(mlserver_port, tmp_path / "device.json", "--split", "layer3", "--defence", "fp16")
    assert done.returncode == 1 and done.stderr.count("\n") == 1
    assert "defence fp16 sends FP16 'activation' [64, 8, 8]; mlserver at 127.0.0.1" in done.stderr
    assert json.loads((tmp_path / "device.json").read_text())["frames"] == []


@pytest.mark.slow
def test_the_proxy_in_front_of_mlserver_captures_every_activation(mlserver_port, shipped_model_dir, tmp_path):
    captured_through_the_proxy(mlserver_port, shipped_model_dir, "layer1", 20, tmp_path)
