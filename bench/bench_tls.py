"""What mutual TLS costs per frame: the device's round trip to a real `splitleak cloud` in plain text and over mutual
TLS, side by side in one run, at the split with the largest activation (`stem`, 64 KiB) and the smallest (`layer3`).

Both clouds are the same command, one with `--tls DIR` (certificates from splitleak.certs, as `splitleak tls make`
writes them); the channel is opened once, so the handshake is paid once per connection, not per frame, as on the
device's stream. What remains per frame is encrypting and authenticating the bytes each way (AES-GCM).

    .venv/bin/pytest bench/bench_tls.py -o python_files='bench_*.py' --benchmark-enable
"""

from __future__ import annotations

import pytest
from bench_pipeline import ROUNDS, WARMUP_ROUNDS, frame_request

from splitleak import certs
from splitleak.core import codec, transport
from splitleak.core.process import start_cloud, stop
from splitleak.core.tls import Tls
from splitleak.protos import inference_pb2_grpc as pb_grpc


@pytest.fixture(scope="module")
def clouds(model_dir, tmp_path_factory):
    """{wire: (port, the device's TLS or None)}: one cloud in plain text, one with mutual TLS."""
    folder = certs.ensure(tmp_path_factory.mktemp("tls") / "certs")
    plain, plain_port = start_cloud([model_dir])
    secure, secure_port = start_cloud([model_dir], ["--tls", str(folder)])
    yield {"plain": (plain_port, None), "mutual TLS": (secure_port, Tls.from_folder(folder, "device"))}
    stop(plain)
    stop(secure)


@pytest.mark.parametrize("split", ("stem", "layer3"))
@pytest.mark.parametrize("wire", ["plain", "mutual TLS"])
def test_round_trip_of_one_frame(benchmark, ratios, model_dir, clouds, split, wire):
    benchmark.group = f"round trip, one frame at {split}, plain or TLS"
    request = frame_request(model_dir, split)
    port, tls = clouds[wire]
    with transport.channel(f"127.0.0.1:{port}", tls) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        stub.ModelInfer(request, wait_for_ready=True)
        benchmark.pedantic(
            lambda: codec.decode_response(stub.ModelInfer(request)), rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS
        )
    ratios.record(benchmark, f"{wire} {split}", baseline=None if wire == "plain" else f"plain {split}")
