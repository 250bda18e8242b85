"""The capture format and the bounded queue in front of it, without any network."""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splitleak.core import capture, codec, data, manifest
from splitleak.protos import inference_pb2 as pb


def request_bytes(activation: np.ndarray, frame_id: int | None = None, model: str = "m.layer1") -> bytes:
    params = {"split_point": "layer1"} | ({} if frame_id is None else {"frame_id": frame_id})
    return codec.encode_request(model, {"activation": activation}, parameters=params).SerializeToString()


def activation(seed: int, batch: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 4, 3, 3)).astype(np.float32)


@settings(max_examples=30, deadline=None)
@given(frames=st.integers(1, 6), cut=st.floats(0, 1))
def test_a_capture_cut_anywhere_reads_back_every_whole_record_and_nothing_else(frames, cut):
    with tempfile.TemporaryDirectory() as tmp:
        with capture.CaptureWriter(tmp, tap="proxy", dataset="cifar10", cloud="127.0.0.1:1") as writer:
            ends = []
            for i in range(frames):
                writer.write(request_bytes(activation(i), frame_id=100 + i), captured_ns=1_000 + i)
                ends.append((Path(tmp) / "requests.bin").stat().st_size)
        path = Path(tmp) / "requests.bin"
        keep = int(cut * ends[-1])
        path.write_bytes(path.read_bytes()[:keep])

        got = capture.read(tmp)

        whole = sum(end <= keep for end in ends)
        assert [r.frame_id for r in got.records] == [100 + i for i in range(whole)]
        assert [r.captured_ns for r in got.records] == [1_000 + i for i in range(whole)]
        for i, record in enumerate(got.records):
            np.testing.assert_array_equal(record.activation, activation(i))
            assert (record.model_name, record.split_point) == ("m.layer1", "layer1")
        assert got.meta["truncated"] == (keep not in [0, *ends])
        assert got.meta["tap"] == "proxy" and got.meta["dataset"] == "cifar10" and got.meta["skipped"] == 0


def test_a_live_capture_can_be_read_while_the_tap_is_still_writing(tmp_path):
    writer = capture.CaptureWriter(tmp_path, tap="cloud", dataset=None, cloud=None)
    for i in range(3):
        writer.write(request_bytes(activation(i), frame_id=i), captured_ns=i)

    assert [r.frame_id for r in capture.read(tmp_path).records] == [0, 1, 2]
    writer.close()
    assert capture.read(tmp_path).meta["records"] == 3


def test_a_writer_refuses_to_overwrite_an_existing_capture(tmp_path):
    capture.CaptureWriter(tmp_path, tap="proxy", dataset=None, cloud=None).close()
    with pytest.raises(FileExistsError, match="already holds a capture"):
        capture.CaptureWriter(tmp_path, tap="proxy", dataset=None, cloud=None)


def test_requests_whose_tensors_do_not_decode_are_skipped_and_counted(tmp_path):
    broken = codec.encode_request("m.layer1", {"activation": activation(0)})
    broken.raw_input_contents[0] = broken.raw_input_contents[0][:-4]  # one float short of the shape
    with capture.CaptureWriter(tmp_path, tap="proxy", dataset=None, cloud=None) as writer:
        writer.write(request_bytes(activation(1), frame_id=1), 1)
        writer.write(broken.SerializeToString(), 2)
        writer.write(b"\xff\xff not a protobuf", 3)
        writer.write(request_bytes(activation(4), frame_id=4), 4)

    got = capture.read(tmp_path)

    assert [r.frame_id for r in got.records] == [1, 4]
    assert got.meta["skipped"] == 2 and not got.meta["truncated"]


def test_activations_concatenate_batches_and_mark_frames_a_request_cannot_name(tmp_path):
    with capture.CaptureWriter(tmp_path, tap="proxy", dataset=None, cloud=None) as writer:
        writer.write(request_bytes(activation(0), frame_id=7), 1)
        writer.write(request_bytes(activation(1, batch=2), frame_id=8), 2)  # one frame_id for two frames
        writer.write(request_bytes(activation(2)), 3)  # no frame_id at all
        writer.write(request_bytes(np.zeros((1, 5), np.float32), frame_id=9), 4)  # a shape the cloud rejects
        writer.write(request_bytes(activation(3), frame_id=10, model="other.stem"), 5)

    got = capture.read(tmp_path)
    frame_ids, activations = got.activations("m.layer1")

    assert got.models() == ["m.layer1", "other.stem"]
    np.testing.assert_array_equal(frame_ids, [7, -1, -1, -1])
    np.testing.assert_array_equal(activations, np.concatenate([activation(0), activation(1, batch=2), activation(2)]))
    with pytest.raises(KeyError, match="no requests for 'nope'"):
        got.activations("nope")


def a_manifest(input_shape: tuple[int, int, int]) -> manifest.Manifest:
    return manifest.Manifest(
        Path("."),
        "m",
        "resnet20",
        "embedded",
        (),
        input_shape,
        np.zeros(3, np.float32),
        np.ones(3, np.float32),
        None,
        "layer1",
        {},
    )


def test_originals_are_the_data_set_s_test_frames_at_the_head_s_input_size(tmp_path):
    with capture.CaptureWriter(tmp_path, tap="proxy", dataset="embedded", cloud=None) as writer:
        writer.write(request_bytes(activation(0), frame_id=0), 1)
    got = capture.read(tmp_path)
    frames = data.load("embedded", "test").images

    np.testing.assert_array_equal(got.originals(np.array([3, 0]), a_manifest((3, 32, 32))), frames[[3, 0]])
    np.testing.assert_array_equal(
        got.originals(np.array([5]), a_manifest((1, 16, 16))), data.resize(frames[[5]], 16, 1)
    )
    with pytest.raises(ValueError, match="-1"):
        got.originals(np.array([0, -1]), a_manifest((3, 32, 32)))


def test_originals_of_a_frame_id_past_the_test_split_are_training_images(tmp_path):
    with capture.CaptureWriter(tmp_path, tap="proxy", dataset="cifar10", cloud=None) as writer:
        writer.write(request_bytes(activation(0), frame_id=0), 1)
    test, train = data.load("cifar10", "test"), data.load("cifar10", "train")

    got = capture.read(tmp_path).originals(np.array([len(test) + 9, 2]), a_manifest((3, 32, 32)))
    np.testing.assert_array_equal(got, np.stack([train.images[9], test.images[2]]))


def test_originals_need_a_capture_that_knows_its_data_set(tmp_path):
    with capture.CaptureWriter(tmp_path, tap="proxy", dataset=None, cloud=None) as writer:
        writer.write(request_bytes(activation(0), frame_id=0), 1)

    with pytest.raises(ValueError, match="--dataset"):
        capture.read(tmp_path).originals(np.array([0]), a_manifest((3, 32, 32)))


def test_a_full_queue_drops_and_counts_copies_instead_of_blocking_the_tap():
    taken, release = threading.Event(), threading.Event()

    def slow_consumer(request: bytes, captured_ns: int) -> None:
        taken.set()
        release.wait(10)

    sink = capture.CaptureSink(maxsize=2, on_capture=[slow_consumer])
    assert sink.put(b"first", 0)
    assert taken.wait(5)  # the consumer is stuck on the first copy; the queue is empty
    start = time.perf_counter()
    kept = [sink.put(b"next", i) for i in range(10)]
    elapsed = time.perf_counter() - start

    assert kept == [True, True] + [False] * 8
    assert elapsed < 0.5
    release.set()
    sink.close()
    assert sink.stats == {"captured": 3, "dropped": 8, "errors": 0}


def test_a_failing_consumer_is_counted_and_the_writer_still_gets_every_request(tmp_path):
    def broken(request: bytes, captured_ns: int) -> None:
        raise RuntimeError("live attack crashed")

    sink = capture.CaptureSink(
        capture.CaptureWriter(tmp_path, tap="proxy", dataset=None, cloud=None), on_capture=[broken]
    )
    for i in range(3):
        sink.put(request_bytes(activation(i), frame_id=i), i)
    sink.close()

    assert sink.stats == {"captured": 3, "dropped": 0, "errors": 3}
    assert isinstance(sink.last_error, RuntimeError)
    got = capture.read(tmp_path)
    assert len(got.records) == 3 and got.meta["errors"] == 3 and got.meta["dropped"] == 0


def test_a_full_disk_is_reported_as_it_happens_and_the_meta_still_gets_its_counts(tmp_path):
    writer = capture.CaptureWriter(tmp_path, tap="proxy", dataset=None, cloud=None)
    warnings: list[str] = []
    sink = capture.CaptureSink(writer, warn=warnings.append)
    sink.put(request_bytes(activation(0), frame_id=0), 0)
    deadline = time.monotonic() + 10
    while writer.records < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    # The disk fills up: from here on every write gets the kernel's ENOSPC (/dev/full), unbuffered as a flush is.
    writer._file.close()
    writer._file = open("/dev/full", "wb", buffering=0)  # noqa: SIM115 - the writer closes it
    for i in range(1, 4):
        sink.put(request_bytes(activation(i), frame_id=i), i)
    deadline = time.monotonic() + 10
    while sink.errors < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(warnings) == 1  # as it happened, once, not a line per request
    assert "No space left on device" in warnings[0] and "a copy was not kept (1 so far)" in warnings[0]
    sink.close()

    got = capture.read(tmp_path)
    assert [r.frame_id for r in got.records] == [0]
    assert (got.meta["records"], got.meta["errors"], got.meta["dropped"]) == (1, 3, 0)


def test_the_cloud_s_answers_pair_with_their_requests_by_id_on_either_call_and_errors_are_left_out(tmp_path):
    def answered(frame_id: int, logits: np.ndarray) -> tuple[bytes, bytes]:
        request = pb.ModelInferRequest.FromString(request_bytes(activation(frame_id), frame_id=frame_id))
        request.id = f"r{frame_id}"
        return request.SerializeToString(), codec.encode_response(request, {"logits": logits}).SerializeToString()

    logits = np.arange(30, dtype=np.float32).reshape(3, 1, 10)
    with capture.CaptureWriter(tmp_path, tap="proxy", dataset=None, cloud=None) as writer:
        for frame_id, kind in [(0, capture.UNARY), (1, capture.STREAM), (2, capture.STREAM)]:
            request, response = answered(frame_id, logits[frame_id])
            writer.write(request, frame_id)
            if kind == capture.STREAM:
                wrapped = pb.ModelStreamInferResponse(infer_response=pb.ModelInferResponse.FromString(response))
                if frame_id == 2:  # answered in-band with an error: no logits to read
                    wrapped.error_message = "INVALID_ARGUMENT: no"
                response = wrapped.SerializeToString()
            writer.write_response(kind, response, frame_id)

    got = capture.read(tmp_path)
    frame_ids, read = got.logits("m.layer1")
    assert got.meta["responses"] == 3 and frame_ids.tolist() == [0, 1]
    np.testing.assert_array_equal(read, logits[:2, 0])
