"""splitleak's cloud against a stock Triton server on the same tails and frames, one device, one frame in flight.

Each split's tail served by a real `splitleak cloud` process and by a real `tritonserver` (the nvidia-pytriton wheel
in .venv-triton, the Python backend running the same tail ONNX with ONNX Runtime, `splitleak triton repo`), both on
loopback. The device's own call: Triton's ModelStreamInfer, one request, then its answer, then the next, with the
activations of FRAMES test frames drawn from the committed CIFAR-10 sample, sent in turn. Triton reports `ratio` (its
median round trip over splitleak's at the same split).

    make bench    # or: .venv/bin/pytest bench/bench_triton.py --benchmark-enable -p no:randomly
"""

from __future__ import annotations

import queue
from pathlib import Path

import numpy as np
import pytest

from splitleak.cloud.triton import Triton
from splitleak.core import codec, transport
from splitleak.core.process import start_cloud, stop
from splitleak.device.head import Head
from splitleak.protos import inference_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / Triton.venv
SAMPLE = ROOT / "tests" / "data"  # the committed sample, so both servers see the same real frames
SPLITS = ("stem", "layer1", "layer2", "layer3")
FRAMES = 50
ROUNDS = 500
WARMUP_ROUNDS = 50
SEED = 0


@pytest.fixture(scope="module")
def ports(model_dir, tmp_path_factory) -> dict[str, int]:
    if not (VENV / ".installed").exists():
        pytest.skip(f"no Triton venv in {VENV}: `make triton-venv` builds it")
    root = tmp_path_factory.mktemp("bench-triton")
    names = Triton.write_repo(root / "repo", [model_dir], VENV)
    cloud, cloud_port = start_cloud([model_dir])
    with open(root / "tritonserver.log", "w") as log, Triton(root / "repo", venv=VENV, log=log) as server:
        try:
            yield {"splitleak": cloud_port, "triton": server.start(names)}
        finally:
            stop(cloud)


def frame_requests(model_dir: Path, split: str) -> list:
    head = Head(model_dir, split)
    with np.load(SAMPLE / "cifar10" / "test.npz") as sample:  # stored by class: a random draw, as the device's
        images = sample["images"][np.random.default_rng(SEED).permutation(len(sample["images"]))[:FRAMES]]
    activations = head.run(head.manifest.preprocess(images))
    return [
        codec.encode_request(head.served_name, {"activation": activations[i : i + 1]}, request_id=str(i))
        for i in range(FRAMES)
    ]


@pytest.mark.parametrize("engine", ["splitleak", "triton"])
@pytest.mark.parametrize("split", SPLITS)
def test_stream_round_trip_of_one_frame(benchmark, ratios, model_dir, ports, split, engine):
    benchmark.group = f"ModelStreamInfer round trip, one frame at {split}"
    requests = frame_requests(model_dir, split)
    outbox: queue.Queue = queue.Queue()
    sent = iter(range(1 << 62))
    with transport.channel(f"127.0.0.1:{ports[engine]}") as channel:
        answers = pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(iter(outbox.get, None))

        def round_trip():
            outbox.put(requests[next(sent) % FRAMES])
            answer = next(answers)
            assert not answer.error_message, answer.error_message
            return codec.decode_response(answer.infer_response)["logits"]

        benchmark.pedantic(round_trip, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS)
        outbox.put(None)
        answers.cancel()
    ratios.record(benchmark, f"{engine} {split}", baseline=None if engine == "splitleak" else f"splitleak {split}")
