"""A fuzz of the cloud: ten thousand hostile requests against a real `splitleak cloud`, unary and on streams.

The requests are random bytes, valid requests with bytes overwritten, and valid requests (real activations, plain
and in the defended forms) with one to three fields set to something a device never sends: a name, version or id
of any length, an unknown datatype, a shape that is negative, overflows int64 or has a hundred dimensions, too few or
too many bytes, parameters of any type, NaN and infinite values, extra inputs and outputs. Then the expensive kind:
names of 1 to 20 MiB, sixteen at a time as in the issue, and messages just over the 64 MiB limit.

Half go as unary ModelInfer, half on streams where a valid frame follows each bad one. It reports the answers by
status code, that none was UNKNOWN or INTERNAL, that every stream answered every frame it was sent and ended OK,
that the cloud wrote one log line per error, and the cloud's memory before and after (VmRSS), at its peak
(VmHWM), and after / before as the ratio to watch.

    nice -n 5 .venv/bin/python bench/cloud_fuzz.py     # docs/cloud.md has the figures
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
from cloud_load import memory_mib, real_requests

from splitleak.core import codec, defences, manifest, transport
from splitleak.core.process import start_cloud, stop
from splitleak.protos import inference_pb2 as pb

REQUESTS = 10_000  # the small ones; the huge names and over-limit messages come on top
STREAM_LENGTH = 20  # requests a stream carries: a bad one, then a valid one, ten times
HUGE_ROUNDS = 3  # rounds of 16 requests at once, each with a model name of 20 MiB, as in the issue
OVER_LIMIT = 4  # messages a little over 64 MiB, half unary and half on a stream
CLIENTS = 8  # client threads, each with a connection of its own
SEED = 0
METHOD = f"/{transport.SERVICE_NAME}/"
UNEXPECTED = ("UNKNOWN", "INTERNAL")

DIMENSIONS = [0, 1, 3, 16, 64, -1, -(2**63), 2**31, 2**32, 2**62, 2**63 - 1]
VALUES = [np.nan, np.inf, -np.inf, 3e38]


def valid_forms(model_dir: Path) -> list[pb.ModelInferRequest]:
    """Real activations at every split, plain and in each defended form a device may send."""
    m = manifest.load(model_dir)
    found = []
    for split in m.splits.values():
        for raw in real_requests(model_dir, split.name, 4):
            activation = codec.decode_request(pb.ModelInferRequest.FromString(raw))["activation"]
            for form, strength in (("none", None), ("fp16", None), ("quantise", 4), ("topk", 0.5)):
                defence = defences.build(form, strength=strength, split=split)
                tensors, params = defence.apply(activation, np.random.default_rng(SEED))
                found.append(
                    codec.encode_request(m.served_name(split.name), tensors, request_id="v", parameters=params)
                )
    return found


def a_string(rng: random.Random) -> str:
    return rng.choice(["", "activation", "scale", "logits", "é" * rng.randint(1, 300), "x" * rng.randint(1, 9000)])


def mutate(rng: random.Random, request: pb.ModelInferRequest) -> None:
    """One change a device never makes."""
    tensor = request.inputs[rng.randrange(len(request.inputs))] if request.inputs else request.inputs.add()
    change = rng.randrange(12)
    if change == 0:
        request.model_name = a_string(rng)
    elif change == 1:
        request.model_version = rng.choice(["2", "-1", a_string(rng)])
    elif change == 2:
        request.id = "i" * rng.choice([257, 5000, 100_000])
    elif change == 3:
        tensor.name = a_string(rng)
    elif change == 4:
        tensor.datatype = rng.choice([*codec.DATATYPES, "FP8", a_string(rng)])
    elif change == 5:
        tensor.shape[:] = [rng.choice(DIMENSIONS) for _ in range(rng.choice([0, 1, 2, 4, 100]))]
    elif change == 6 and tensor.shape:
        tensor.shape[rng.randrange(len(tensor.shape))] = rng.choice(DIMENSIONS)
    elif change == 7 and request.raw_input_contents:
        i = rng.randrange(len(request.raw_input_contents))
        cut = rng.randint(-len(request.raw_input_contents[i]), 64)
        raw = request.raw_input_contents[i]
        request.raw_input_contents[i] = raw[:cut] if cut < 0 else raw + bytes(cut)
    elif change == 8:
        key = rng.choice(["bits", "frame_id", "defence", a_string(rng)])
        value = rng.choice([True, -1, 0, 9, 2**63 - 1, 0.5, float("nan"), a_string(rng)])
        codec.set_parameters(request.parameters, {key: value})
    elif change == 9:
        request.inputs.add(name=a_string(rng), datatype="INT32", shape=[1, rng.choice(DIMENSIONS)])
    elif change == 10:
        request.outputs.add(name=a_string(rng))
    elif tensor.datatype == "FP32" and request.raw_input_contents and len(request.raw_input_contents[0]) >= 4:
        raw = request.raw_input_contents[0]
        values = np.frombuffer(raw, np.float32, count=len(raw) // 4).copy()
        values[rng.randrange(len(values))] = rng.choice(VALUES)
        request.raw_input_contents[0] = values.tobytes() + raw[values.nbytes :]


def hostile(rng: random.Random, forms: list[pb.ModelInferRequest]) -> bytes:
    kind = rng.random()
    if kind < 0.1:
        return rng.randbytes(rng.randint(0, 2048))
    raw = bytearray(rng.choice(forms).SerializeToString())
    if kind < 0.2:
        for _ in range(rng.randint(1, 8)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        return bytes(raw)
    request = pb.ModelInferRequest.FromString(bytes(raw))
    for _ in range(rng.randint(1, 3)):
        mutate(rng, request)
    return request.SerializeToString()


class Client:
    """Calls from threads, each thread with a connection of its own; tallies every answer."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.local = threading.local()
        self.lock = threading.Lock()
        self.codes: Counter[str] = Counter()  # unary status, or in-band error code on a stream
        self.streams = Counter()  # "whole": every frame answered, every valid one with logits, ended OK

    def channel(self) -> grpc.Channel:
        if not hasattr(self.local, "channel"):
            options = [option for option in transport.OPTIONS if option[0] != "grpc.max_send_message_length"]
            options += [("grpc.max_send_message_length", transport.MAX_RECEIVE_BYTES)]
            options += [("grpc.use_local_subchannel_pool", 1)]
            self.local.channel = grpc.insecure_channel(self.target, options=options)
        return self.local.channel

    def unary(self, raw: bytes) -> None:
        try:
            self.channel().unary_unary(METHOD + "ModelInfer")(raw, timeout=120)
            code = "OK"
        except grpc.RpcError as e:
            code = e.code().name
        with self.lock:
            self.codes[f"unary {code}"] += 1

    def stream(self, requests: list[bytes], valid: set[int]) -> None:
        call = self.channel().stream_stream(METHOD + "ModelStreamInfer", None, pb.ModelStreamInferResponse.FromString)
        try:
            answers = list(call(iter(requests), timeout=300))
            whole = len(answers) == len(requests)
        except grpc.RpcError as e:
            answers, whole = [], False
            with self.lock:
                self.codes[f"stream ended {e.code().name}"] += 1
        codes = [a.error_message.split(":", 1)[0] if a.error_message else "OK" for a in answers]
        whole = whole and all(codes[i] == "OK" for i in valid if i < len(codes))
        with self.lock:
            self.codes.update(f"in-band {code}" for i, code in enumerate(codes) if i not in valid)
            self.streams["whole" if whole else "lost"] += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=manifest.DEFAULT_MODEL_DIR)
    args = parser.parse_args()
    rng = random.Random(SEED)
    forms = valid_forms(args.model_dir)
    good = forms[0].SerializeToString()
    with tempfile.TemporaryDirectory() as tmp, open(Path(tmp) / "stderr", "w+") as log:
        proc, port = start_cloud([args.model_dir], stderr=log)
        client = Client(f"127.0.0.1:{port}")
        try:
            client.unary(good)
            before = memory_mib(proc.pid)
            with ThreadPoolExecutor(CLIENTS) as pool:
                for _ in range(REQUESTS // 2):
                    pool.submit(client.unary, hostile(rng, forms))
                for _ in range(REQUESTS // STREAM_LENGTH):
                    requests = [r for _ in range(STREAM_LENGTH // 2) for r in (hostile(rng, forms), good)]
                    pool.submit(client.stream, requests, set(range(1, STREAM_LENGTH, 2)))
            fuzzed = memory_mib(proc.pid)
            huge = pb.ModelInferRequest.FromString(good)
            huge.model_name = "n" * (20 << 20)
            rounds = []
            with ThreadPoolExecutor(16) as pool:
                for _ in range(HUGE_ROUNDS):
                    list(pool.map(client.unary, [huge.SerializeToString()] * 16))
                    rounds.append(memory_mib(proc.pid)["VmRSS"])
            over = pb.ModelInferRequest.FromString(good)
            over.raw_input_contents.append(bytes(transport.MAX_MESSAGE_BYTES))
            for _ in range(OVER_LIMIT // 2):
                client.unary(over.SerializeToString())
                client.stream([over.SerializeToString(), good], {1})
            after = memory_mib(proc.pid)
        finally:
            stop(proc)
        log.seek(0)
        logged = sum(" ModelInfer " in line or " ModelStreamInfer " in line for line in log)
    errors = sum(n for code, n in client.codes.items() if not code.endswith(" OK"))
    unexpected = sum(n for code, n in client.codes.items() if code.endswith(UNEXPECTED))
    print("| answer | count |\n|---|---|")
    for code, n in sorted(client.codes.items()):
        print(f"| {code} | {n:,} |")
    answers = sum(client.codes.values())
    print(f"\nanswers: {answers:,} (the valid frames on the streams aside), UNKNOWN or INTERNAL: {unexpected}")
    print(f"streams: {client.streams['whole']:,} answered every frame, {client.streams['lost']} lost one")
    print(f"log lines: {logged:,} for {errors:,} errors answered")
    print(
        f"cloud MiB: VmRSS {before['VmRSS']:.0f} before, {fuzzed['VmRSS']:.0f} after the fuzz, after each round of "
        f"huge names {', '.join(f'{r:.0f}' for r in rounds)}, {after['VmRSS']:.0f} at the end "
        f"({after['VmRSS'] / before['VmRSS']:.2f}x before), peak VmHWM {after['VmHWM']:.0f}"
    )
    print(f"load average: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
