"""splitleak's cloud against stock OIP servers on the same tails and frames, one device, one frame in flight.

Each split's tail served by a real `splitleak cloud` process, a real `tritonserver` (the nvidia-pytriton wheel in
.venv-triton, its Python backend running the same tail ONNX with ONNX Runtime, `splitleak triton repo`) and a real
MLServer (.venv-mlserver, `splitleak mlserver repo`), all on loopback, with the activations of FRAMES test frames
drawn from the committed CIFAR-10 sample, sent in turn. Two calls, each timed on every server that has it:
Triton's ModelStreamInfer as the device uses it (one request, then its answer, then the next; MLServer's stream is
not Triton's), and one unary ModelInfer a frame (what the device sends MLServer). Each engine reports `ratio`: its
median round trip over splitleak's, same call, same split.

    make bench    # or: .venv/bin/pytest bench/bench_triton.py --benchmark-enable -p no:randomly -s
"""

from __future__ import annotations

import contextlib
import queue
from pathlib import Path

import numpy as np
import pytest

from splitleak.cloud.engine import Server
from splitleak.cloud.mlserver import MLServer
from splitleak.cloud.triton import Triton
from splitleak.core import codec, transport
from splitleak.core.process import start_cloud, stop
from splitleak.device.head import Head
from splitleak.protos import inference_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "tests" / "data"  # the committed sample, so both servers see the same real frames
SPLITS = ("stem", "layer1", "layer2", "layer3")
FRAMES = 50
ROUNDS = 500
WARMUP_ROUNDS = 50
SEED = 0


def engine_port(stack: contextlib.ExitStack, engine: type[Server], model_dir: Path, root: Path) -> int | None:
    """The gRPC port of `engine` serving `model_dir`, stopped with `stack`; None where its venv is missing."""
    venv = ROOT / engine.venv
    if not (venv / ".installed").exists():
        return None
    names = engine.write_repo(root / engine.name, [model_dir], venv)
    log = stack.enter_context(open(root / f"{engine.name}.log", "w"))
    return stack.enter_context(engine(root / engine.name, venv=venv, log=log)).start(names)


@pytest.fixture(scope="module")
def ports(model_dir, tmp_path_factory) -> dict[str, int | None]:
    root = tmp_path_factory.mktemp("bench-engines")
    cloud, cloud_port = start_cloud([model_dir])
    with contextlib.ExitStack() as stack:
        stack.callback(stop, cloud)
        yield {"splitleak": cloud_port} | {e.name: engine_port(stack, e, model_dir, root) for e in (Triton, MLServer)}


def engine(ports: dict[str, int | None], name: str) -> str:
    """`127.0.0.1:PORT` of the engine; skips where its venv is missing."""
    if ports[name] is None:
        pytest.skip(f"no {name} venv: `make {name}-venv` builds it")
    return f"127.0.0.1:{ports[name]}"


def frame_requests(model_dir: Path, split: str) -> list:
    head = Head(model_dir, split)
    with np.load(SAMPLE / "cifar10" / "test.npz") as sample:  # stored by class: a random draw, as the device's
        images = sample["images"][np.random.default_rng(SEED).permutation(len(sample["images"]))[:FRAMES]]
    activations = head.run(head.manifest.preprocess(images))
    return [
        codec.encode_request(head.served_name, {"activation": activations[i : i + 1]}, request_id=str(i))
        for i in range(FRAMES)
    ]


@pytest.mark.parametrize("name", ["splitleak", "triton"])
@pytest.mark.parametrize("split", SPLITS)
def test_stream_round_trip_of_one_frame(benchmark, ratios, model_dir, ports, split, name):
    benchmark.group = f"ModelStreamInfer round trip, one frame at {split}"
    requests = frame_requests(model_dir, split)
    outbox: queue.Queue = queue.Queue()
    sent = iter(range(1 << 62))
    with transport.channel(engine(ports, name)) as channel:
        answers = pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(iter(outbox.get, None))

        def round_trip():
            outbox.put(requests[next(sent) % FRAMES])
            answer = next(answers)
            assert not answer.error_message, answer.error_message
            return codec.decode_response(answer.infer_response)["logits"]

        benchmark.pedantic(round_trip, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS)
        outbox.put(None)
        answers.cancel()
    ratios.record(
        benchmark, f"stream {name} {split}", baseline=None if name == "splitleak" else f"stream splitleak {split}"
    )


@pytest.mark.parametrize("name", ["splitleak", "triton", "mlserver"])
@pytest.mark.parametrize("split", SPLITS)
def test_unary_round_trip_of_one_frame(benchmark, ratios, model_dir, ports, split, name):
    benchmark.group = f"ModelInfer round trip, one frame at {split}"
    requests = frame_requests(model_dir, split)
    sent = iter(range(1 << 62))
    with transport.channel(engine(ports, name)) as channel:
        infer = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer
        infer(requests[0], wait_for_ready=True)  # connected before the clock starts

        def round_trip():
            return codec.decode_response(infer(requests[next(sent) % FRAMES]))["logits"]

        benchmark.pedantic(round_trip, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS)
    ratios.record(
        benchmark, f"unary {name} {split}", baseline=None if name == "splitleak" else f"unary splitleak {split}"
    )
