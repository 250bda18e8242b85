"""Dynamic batching (`splitleak cloud --batch-max N --batch-delay-ms D`): frames from many streams run together, and
each request gets the answer it gets alone; a bad request in the crowd is refused alone.

The cloud runs in this process on a real gRPC port, so that the test can see its batchers count the batches."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

from splitleak.cloud import server
from splitleak.cloud.batcher import Batching
from splitleak.core import codec, data, manifest, transport
from splitleak.device.client import Head, load_frames
from splitleak.protos import inference_pb2 as pb

MODEL = manifest.load()  # the shipped ResNet-20
STREAM = f"/{transport.SERVICE_NAME}/ModelStreamInfer"
DEVICES = 8
FRAMES = 12  # per device


def activations(split: str) -> np.ndarray:
    """Real activations: the committed CIFAR-10 sample through the head."""
    head = Head(MODEL.root, split)
    _, images, _ = load_frames(data.default_dataset(), head.manifest, DEVICES * FRAMES)
    return head.run(head.manifest.preprocess(images))


async def stream(port: int, requests: list[bytes]) -> list[pb.ModelStreamInferResponse]:
    """One device: a connection and a stream of its own, one request in flight."""
    options = [*transport.OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
        call = channel.stream_stream(STREAM)()
        answers = []
        for request in requests:
            await call.write(request)
            answers.append(pb.ModelStreamInferResponse.FromString(await call.read()))
        await call.done_writing()
        return answers


async def crowd(service: server.InferenceService, requests: list[list[bytes]]) -> list[list]:
    grpc_server, port, _ = await server.serve(service)
    try:
        return await asyncio.gather(*(stream(port, r) for r in requests))
    finally:
        await grpc_server.stop(None)


@pytest.mark.parametrize("split", ["layer3", "stem"])  # a tail run on the event loop, and one run on the pool
def test_a_batching_cloud_answers_each_stream_as_each_frame_alone_gets_answered(split):
    tails = server.load_tails([MODEL.root])
    name = MODEL.served_name(split)
    x = activations(split)
    requests = [
        [
            codec.encode_request(
                name, {"activation": x[d * FRAMES + i][None]}, request_id=f"{d}.{i}"
            ).SerializeToString()
            for i in range(FRAMES)
        ]
        for d in range(DEVICES)
    ]
    bad = codec.encode_request(name, {"activation": np.full((1, *x.shape[1:]), np.nan, np.float32)}, request_id="bad")
    requests[3].insert(5, bad.SerializeToString())
    service = server.InferenceService(tails, batching=Batching(max_frames=DEVICES, delay_s=0.005))
    answers = asyncio.run(crowd(service, requests))

    alone = tails[name].run(x)  # every frame at once; the cloud's batches are any mix of them
    for d, device in enumerate(answers):
        if d == 3:
            refused = device.pop(5)
            assert refused.infer_response.id == "bad" and "NaN or infinite" in refused.error_message
        assert [a.infer_response.id for a in device] == [f"{d}.{i}" for i in range(FRAMES)]
        assert not any(a.error_message for a in device)
        logits = np.concatenate([codec.decode_response(a.infer_response)["logits"] for a in device])
        expected = alone[d * FRAMES : (d + 1) * FRAMES]
        assert (logits.argmax(1) == expected.argmax(1)).all()
        np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
    batcher = service.batchers[name]
    assert batcher.frames == DEVICES * FRAMES  # the bad one never reached a batch
    assert batcher.batches < batcher.frames / 2  # frames of different streams did run together
