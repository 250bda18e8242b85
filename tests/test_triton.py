"""The tail on a stock NVIDIA Triton server: `tritonserver` from the nvidia-pytriton wheel in .venv-triton (which
`make test` builds), serving the repository `splitleak triton repo` writes, on loopback, with the device, the proxy
and its capture unchanged in front of it. Skipped, saying why, where Triton's venv is missing or tritonserver cannot
start here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_proxy import head_on_originals

from splitleak.attacker import proxy
from splitleak.cloud.engine import EngineError, Server, site_packages
from splitleak.cloud.triton import Triton
from splitleak.core import capture, codec, manifest
from splitleak.core.process import start_listening, stop
from splitleak.core.records import NETWORK_CLOUD
from splitleak.core.transport import channel
from splitleak.device.head import Head
from splitleak.protos import inference_pb2 as pb
from splitleak.protos import inference_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / Triton.venv
DATASET = "cifar10"


def serving(engine: type[Server], model_dir: Path, root: Path):
    """A real server of `engine` serving every split of `model_dir`: yields its gRPC port (a generator for a fixture);
    skips, saying why, where the engine's venv is missing or the server cannot start here."""
    venv = ROOT / engine.venv
    if not (venv / ".installed").exists():
        pytest.skip(f"no {engine.name} venv in {venv}: `make {engine.name}-venv` (part of `make test`) builds it")
    names = engine.write_repo(root / "repo", [model_dir], venv)
    log = root / f"{engine.name}.log"
    with open(log, "w") as out, engine(root / "repo", venv=venv, log=out) as server:
        try:
            port = server.start(names)
        except EngineError as e:
            pytest.skip(f"{e}; its log ends: {' | '.join(log.read_text().strip().splitlines()[-3:])}")
        yield port


@pytest.fixture(scope="module")
def triton_port(shipped_model_dir, tmp_path_factory):
    """A real tritonserver serving every split of the shipped model; yields its gRPC port."""
    yield from serving(Triton, shipped_model_dir, tmp_path_factory.mktemp("triton"))


def run_device(port: int, out: Path, *options: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "splitleak.cli", "device", "--cloud", f"127.0.0.1:{port}", "--dataset", DATASET]
    cmd += ["--json", str(out), *options]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


def predictions(port: int, out: Path, *options: str) -> tuple[dict[int, int], dict]:
    """Each frame's prediction, and the run's summary."""
    done = run_device(port, out, *options)
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert all(f.get("error") is None for f in report["frames"])
    return {f["frame"]: f["prediction"] for f in report["frames"]}, report["summary"]


def agrees_with_splitleak_s_cloud(port: int, cloud_port: int, model_dir: Path, tmp_path: Path) -> None:
    """200 frames at every split through the server on `port` get the predictions splitleak's cloud gives them;
    the server reports no times, so the device times its round trip as one stage."""
    for split in manifest.load(model_dir).splits:
        on_server, summary = predictions(port, tmp_path / f"server-{split}.json", "--split", split)
        on_cloud, cloud_summary = predictions(cloud_port, tmp_path / f"cloud-{split}.json", "--split", split)
        assert len(on_server) == 200 and on_server == on_cloud, split
        assert NETWORK_CLOUD in summary["stages_ms"] and "cloud" not in summary["stages_ms"]
        assert "cloud" in cloud_summary["stages_ms"] and NETWORK_CLOUD not in cloud_summary["stages_ms"]


@pytest.mark.slow
def test_the_device_streams_200_frames_at_every_split_to_triton_with_the_predictions_of_splitleak_s_cloud(
    triton_port, shipped_cloud, shipped_model_dir, tmp_path
):
    agrees_with_splitleak_s_cloud(triton_port, shipped_cloud, shipped_model_dir, tmp_path)


def test_the_device_sends_one_model_infer_a_frame_with_stream_off_and_gets_the_same_predictions(triton_port, tmp_path):
    streamed, _ = predictions(triton_port, tmp_path / "stream.json", "--limit", "10", "--split", "layer3")
    done = run_device(triton_port, tmp_path / "unary.json", "--limit", "10", "--split", "layer3", "--stream", "off")
    assert done.returncode == 0, done.stderr
    assert "triton, one ModelInfer a frame" in done.stdout
    assert {f["frame"]: f["prediction"] for f in json.loads((tmp_path / "unary.json").read_text())["frames"]} == (
        streamed
    )


def test_triton_answers_a_bad_shape_and_an_unknown_model_in_band_and_the_stream_goes_on(triton_port):
    def request(name: str, shape: tuple[int, ...], request_id: str) -> pb.ModelInferRequest:
        return codec.encode_request(name, {"activation": np.zeros(shape, np.float32)}, request_id=request_id)

    good = request("resnet20-cifar10.layer3", (1, 64, 8, 8), "good")
    bad_shape = request("resnet20-cifar10.layer3", (1, 64, 8, 7), "bad-shape")
    unknown = request("resnet20-cifar10.nowhere", (1, 64, 8, 8), "unknown")
    with channel(f"127.0.0.1:{triton_port}") as ch:
        answers = list(pb_grpc.GRPCInferenceServiceStub(ch).ModelStreamInfer(iter([bad_shape, unknown, good])))
    assert [a.infer_response.id for a in answers] == ["bad-shape", "unknown", "good"]
    assert "unexpected shape for input 'activation'" in answers[0].error_message
    assert "Expected [-1,64,8,8], got [1,64,8,7]" in answers[0].error_message
    assert "unknown model: 'resnet20-cifar10.nowhere'" in answers[1].error_message
    assert not answers[2].error_message and codec.decode_response(answers[2].infer_response)["logits"].shape == (1, 10)


@pytest.mark.parametrize("defence", [["fp16"], ["quantise", "--strength", "4"], ["topk", "--strength", "0.5"]])
def test_a_defended_form_triton_cannot_take_is_refused_in_one_line_before_the_first_frame(
    triton_port, tmp_path, defence
):
    done = run_device(triton_port, tmp_path / "device.json", "--split", "layer3", "--defence", *defence)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert f"defence {defence[0]} sends" in done.stderr
    assert "triton at 127.0.0.1" in done.stderr and "takes only what its model declares" in done.stderr
    assert json.loads((tmp_path / "device.json").read_text())["frames"] == []


def captured_through_the_proxy(server_port: int, model_dir: Path, split: str, frames: int, tmp_path: Path) -> None:
    """The device through the attacker's proxy in front of the server gets the server's predictions, and the capture
    holds every activation the device sent, in splitleak's format."""
    direct, _ = predictions(server_port, tmp_path / "direct.json", "--limit", str(frames), "--split", split)
    proc, port = proxy.start_process(f"127.0.0.1:{server_port}", tmp_path / "capture", dataset=DATASET)
    try:
        proxied, _ = predictions(port, tmp_path / "proxied.json", "--limit", str(frames), "--split", split)
    finally:
        assert stop(proc) == 0
    assert proxied == direct and len(direct) == frames
    got = capture.read(tmp_path / "capture")
    head = Head(model_dir, split)
    assert got.models() == [head.served_name] and got.meta["records"] == frames and got.meta["errors"] == 0
    frame_ids, activations = got.activations(head.served_name)
    assert sorted(frame_ids.tolist()) == sorted(direct)
    np.testing.assert_array_equal(activations, head_on_originals(head, got, frame_ids))


@pytest.mark.slow
def test_the_proxy_in_front_of_triton_captures_every_activation_and_the_device_gets_triton_s_predictions(
    triton_port, shipped_model_dir, tmp_path
):
    captured_through_the_proxy(triton_port, shipped_model_dir, "layer2", 30, tmp_path)


def test_the_repository_holds_a_python_model_and_the_onnxruntime_config_for_every_split(shipped_model_dir, tmp_path):
    names = Triton.write_repo(tmp_path, [shipped_model_dir], VENV)
    m = manifest.load(shipped_model_dir)
    assert names == [m.served_name(split) for split in m.splits]
    for split in m.splits.values():
        model = tmp_path / m.served_name(split.name)
        assert (model / "1" / "model.onnx").read_bytes() == split.tail.read_bytes()
        assert str(site_packages(VENV)) in (model / "1" / "model.py").read_text()
        dims = f"dims: [{', '.join(map(str, split.activation_shape))}]"
        for config, backend in (("config.pbtxt", "python"), ("config.onnxruntime.pbtxt", "onnxruntime")):
            text = (model / config).read_text()
            assert f'backend: "{backend}"' in text and f'name: "{m.served_name(split.name)}"' in text and dims in text


def processes_naming(text: str) -> list[int]:
    """The ids of live processes whose command line holds `text`."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and text.encode() in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
        except OSError:
            continue  # ended while we looked
    return found


@pytest.mark.slow
def test_triton_serve_answers_the_device_and_sigterm_stops_the_server_and_its_stubs(triton_port, tmp_path):
    repo = tmp_path / "repo"
    with open(tmp_path / "serve.log", "w") as log:
        proc, port = start_listening(
            ["triton", "serve", str(repo), "--venv", str(VENV), "--port", "0"], "triton", 120, stderr=log
        )
        try:
            answers, _ = predictions(port, tmp_path / "device.json", "--limit", "5")
            assert len(answers) == 5 and processes_naming(str(repo))  # the server and a stub per split
        finally:
            assert stop(proc, timeout_s=Triton.exit_timeout_s + 20) == 0
    assert processes_naming(str(repo)) == []


CURIOUS = """            activation = pb_utils.get_input_tensor_by_name(request, "activation").as_numpy()
            seen = os.path.join({out!r}, request.request_id())
            np.save(seen + ".npy", activation)
            with open(seen + ".json", "w") as f:
                f.write(request.parameters())
"""


@pytest.mark.slow
def test_a_curious_triton_operator_records_each_activation_and_every_parameter_the_device_sends(
    triton_port, shipped_model_dir, tmp_path
):
    """Three lines in model.py: what a tap on Triton gets, with no proxy and no splitleak on the server."""
    names = Triton.write_repo(tmp_path / "repo", [shipped_model_dir], VENV)
    model = tmp_path / "repo" / "resnet20-cifar10.layer2" / "1" / "model.py"
    line = '            activation = pb_utils.get_input_tensor_by_name(request, "activation").as_numpy()\n'
    seen = tmp_path / "seen"
    seen.mkdir()
    text = (
        model.read_text()
        .replace(line, CURIOUS.format(out=str(seen)))
        .replace("import onnxruntime as ort", "import numpy as np  # noqa: E402\nimport onnxruntime as ort")
    )
    model.write_text(text)
    with open(tmp_path / "triton.log", "w") as log, Triton(tmp_path / "repo", venv=VENV, log=log) as server:
        port = server.start(names)
        cmd = ["--split", "layer2", "--limit", "5", "--defence", "gaussian", "--strength", "0.5", "--seed", "3"]
        answers, _ = predictions(port, tmp_path / "device.json", *cmd)
    frames = json.loads((tmp_path / "device.json").read_text())["frames"]
    for i, frame in enumerate(frames):
        parameters = json.loads((seen / f"{i}.json").read_text())
        assert parameters["frame_id"] == frame["frame"] and parameters["device_send_ns"] == frame["device_send_ns"]
        assert (parameters["split_point"], parameters["defence"], parameters["defence_strength"]) == (
            "layer2", "gaussian", 0.5,
        )  # fmt: skip
        assert np.load(seen / f"{i}.npy").shape == (1, 32, 16, 16)
    assert len(answers) == 5
