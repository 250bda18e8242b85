"""The capture: what a tap on the channel keeps, in one format that both taps write and every attack reads.

A capture is a folder:

- `meta.json`: `{"format": "splitleak-capture", "version": 1, "tap": "proxy" | "cloud", "created": ISO 8601 time,
  "cloud": the cloud's HOST:PORT (or null), "dataset": the data set the device's frames come from when the
  simulation knows it (or null), ...}`; on a clean close the writer adds `records` (how many it wrote) and the tap's
  counters, such as `dropped` (requests the tap let pass without keeping a copy because its queue was full).
- `requests.bin`: the requests, one record each, in the order the tap saw them. A record is a little-endian
  `uint32` length `n`, an `int64` `captured_ns` (wall clock, ns, when the tap saw the request), then `n` bytes: the
  serialized `inference.ModelInferRequest` (protos/inference.proto) exactly as the tap holds it, so anything that
  reads the Open Inference Protocol reads the payload. The split facts (`split_point`, `frame_id`, ...) are in its
  `parameters`; see splitleak.core.codec.

- `responses.bin` (the proxy's captures): the cloud's answers to those requests, in the order they came back, framed
  the same way, each payload one byte saying what follows (`U`: a serialized `inference.ModelInferResponse`, the
  answer to a ModelInfer; `S`: a `ModelStreamInferResponse`, an answer on Triton's stream) then the message. An answer
  names its request by `id`, which is how `Capture.logits` pairs the tail's logits with the activation they answer:
  what a tap sees of the model's output, the other half of a membership test (splitleak.attacker.membership).

The writer flushes every record, so a reader of a live capture, or of one whose tap crashed, loses at most the last
record, which `read` recognises as cut short and leaves out.

`frame_id` names the frame's image in `meta["dataset"]` (splitleak.core.data.frames: ids below the test split's length
are its images, the train split's come after), which is how `Capture.originals` finds the private input behind each
activation, the ground truth an attack is scored against.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import struct
import sys
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from google.protobuf.message import DecodeError

from splitleak.core import codec, data, defences
from splitleak.core.manifest import Manifest
from splitleak.protos import inference_pb2 as pb

FORMAT = "splitleak-capture"
VERSION = 1
TAPS = ("proxy", "cloud")
RECORD_HEADER = struct.Struct("<Iq")  # length of the request in bytes, captured_ns
UNARY, STREAM = b"U", b"S"  # what an answer in responses.bin is: a ModelInferResponse, a ModelStreamInferResponse

WARN_EVERY = 1000

# Called with every captured request (serialized ModelInferRequest) and the wall clock (ns) when the tap saw it.
OnCapture = Callable[[bytes, int], None]


class CaptureWriter:
    """Writes a capture folder; one writer per capture, used from one thread (CaptureSink's)."""

    def __init__(self, path: str | Path, *, tap: str, dataset: str | None, cloud: str | None) -> None:
        if tap not in TAPS:
            raise ValueError(f"unknown tap {tap!r}; taps: {', '.join(TAPS)}")
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        # Refuse to append to an old capture: its meta would describe the wrong run.
        try:
            self._file = open(self.path / "requests.bin", "xb")
        except FileExistsError:
            raise FileExistsError(f"{self.path} already holds a capture (requests.bin); pick another folder") from None
        self.meta = {
            "format": FORMAT,
            "version": VERSION,
            "tap": tap,
            "created": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "cloud": cloud,
            "dataset": dataset,
        }
        self.records = 0
        self.responses = 0
        self._responses_file = None  # opened with the first answer: a cloud's own capture has none
        self._closed = False
        self._failure: BaseException | None = None  # what stopped the writes (a full disk, say)
        self._write_meta()

    def write(self, request_bytes: bytes, captured_ns: int) -> None:
        if self._failure is not None:
            raise OSError(f"{self.path} stopped taking records after {self.records}: {self._failure}")
        try:
            self._file.write(RECORD_HEADER.pack(len(request_bytes), captured_ns))
            self._file.write(request_bytes)
            self._file.flush()
        except BaseException as e:
            # A half-written record must stay the last one, or every record after it would be misread.
            self._failure = e
            with contextlib.suppress(OSError):  # closing flushes what the failed write left, and fails the same way
                self._file.close()
            raise
        self.records += 1

    def write_response(self, kind: bytes, response_bytes: bytes, captured_ns: int) -> None:
        """Keep one of the cloud's answers (`kind`: UNARY or STREAM, as the call it came on)."""
        if self._failure is not None:
            raise OSError(f"{self.path} stopped taking records after {self.records}: {self._failure}")
        if self._responses_file is None:
            self._responses_file = open(self.path / "responses.bin", "xb")
        self._responses_file.write(RECORD_HEADER.pack(len(response_bytes) + 1, captured_ns))
        self._responses_file.write(kind + response_bytes)
        self._responses_file.flush()
        self.responses += 1

    def close(self) -> None:
        """Close the files and write the counts into meta.json, also after a write failed (a full disk, say)."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError):
            self._file.close()
            if self._responses_file is not None:
                self._responses_file.close()
        self.meta["records"] = self.records
        self.meta["responses"] = self.responses
        self._write_meta()

    def _write_meta(self) -> None:
        # Replaced whole, never rewritten in place, so a reader never sees half a file.
        tmp = self.path / "meta.json.tmp"
        tmp.write_text(json.dumps(self.meta, indent=1) + "\n")
        os.replace(tmp, self.path / "meta.json")

    def __enter__(self) -> CaptureWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class CaptureSink:
    """A bounded queue between a tap and its consumers (a CaptureWriter, callbacks), drained by one thread.

    `put` never blocks: the tap sits on the path of every request, so when the consumers fall behind and the queue
    is full the copy is dropped and counted, and the request itself goes on as if nobody had looked.
    """

    def __init__(
        self,
        writer: CaptureWriter | None = None,
        *,
        maxsize: int = 1024,
        on_capture: list[OnCapture] | None = None,
        warn: Callable[[str], None] | None = None,
    ) -> None:
        if maxsize < 1:
            raise ValueError(f"maxsize must be at least 1, got {maxsize}")
        self.writer = writer
        self.callbacks: list[OnCapture] = list(on_capture or [])
        self.captured = 0  # handed to every consumer
        self.dropped = 0  # not kept: the queue was full
        self.errors = 0  # a consumer raised; the others still got the request
        self.last_error: Exception | None = None
        # Told of a failing consumer as it happens (the first time, then every WARN_EVERY), not only at the end.
        self.warn = warn or (lambda line: print(f"capture: {line}", file=sys.stderr, flush=True))
        # (request bytes, captured_ns), or (kind, response bytes, captured_ns) for an answer, which goes to the writer
        self._queue: queue.Queue[tuple | None] = queue.Queue(maxsize=maxsize)
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._drain, name="capture-sink", daemon=True)
        self._thread.start()

    def subscribe(self, callback: OnCapture) -> None:
        """Also hand every request captured from now on to `callback` (on the sink's thread: keep it quick)."""
        self.callbacks.append(callback)

    def put(self, request_bytes: bytes, captured_ns: int) -> bool:
        """Queue a copy for the consumers; False if it was dropped because the queue is full."""
        return self._offer((request_bytes, captured_ns))

    def put_response(self, kind: bytes, response_bytes: bytes, captured_ns: int) -> bool:
        """Queue a copy of one of the cloud's answers for the writer; False if it was dropped (the queue is full)."""
        return self.writer is None or self._offer((kind, response_bytes, captured_ns))

    def _offer(self, item: tuple) -> bool:
        try:
            self._queue.put_nowait(item)
            return True
        except queue.Full:
            with self._lock:
                self.dropped += 1
            return False

    @property
    def stats(self) -> dict[str, int]:
        return {"captured": self.captured, "dropped": self.dropped, "errors": self.errors}

    def close(self) -> None:
        """Hand the consumers what is queued, stop the thread, and close the writer (with the counters in meta)."""
        if self._thread.is_alive():
            self._queue.put(None)  # after everything queued; blocks only until there is room
            self._thread.join()
        if self.writer is not None:
            self.writer.meta.update(dropped=self.dropped, errors=self.errors)
            self.writer.close()

    def _drain(self) -> None:
        while (item := self._queue.get()) is not None:
            if len(item) == 3:  # an answer: only the writer keeps those
                consumers = [self.writer.write_response]
            else:
                consumers = ([self.writer.write] if self.writer is not None else []) + self.callbacks
            for consume in consumers:
                try:
                    consume(*item)
                except Exception as e:  # noqa: BLE001 - one failing consumer must not stop the others
                    self.errors += 1
                    self.last_error = e
                    if self.errors == 1 or self.errors % WARN_EVERY == 0:
                        self.warn(
                            f"a copy was not kept ({self.errors} so far): {e}; the traffic itself goes on untouched"
                        )
            self.captured += len(item) == 2

    def __enter__(self) -> CaptureSink:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class CapturedRequest:
    request_id: str
    captured_ns: int
    model_name: str
    split_point: str | None
    frame_id: int | None
    activation: np.ndarray  # batch-first, as sent (for a defended request, in the form it travelled)
    tensors: dict[str, np.ndarray]  # every input of the request, by name
    parameters: dict  # the request's parameters (split_point, frame_id, defence, ...)

    def restored(self, shape: tuple[int, ...]) -> np.ndarray:
        """The float32 activation (B, *shape) the tail takes, whatever form a defence sent it in (as the cloud)."""
        return defences.restore(self.tensors, self.parameters, shape=shape)


@dataclass
class Capture:
    path: Path
    meta: dict  # meta.json, plus `skipped` (requests whose tensors do not decode) and `truncated` (a cut last record)
    records: list[CapturedRequest]
    answers: dict[str, dict[str, np.ndarray]]  # the cloud's answers by request id (the proxy's captures): its outputs

    def logits(self, model_name: str) -> tuple[np.ndarray, np.ndarray]:
        """(frame_ids (N,), logits (N, classes)) of every answered request to `model_name` that names one frame: what
        the tap read of the model's output, frame by frame."""
        rows = [
            (r.frame_id, self.answers[r.request_id]["logits"])
            for r in self.records
            if r.model_name == model_name and r.frame_id is not None and "logits" in self.answers.get(r.request_id, {})
        ]
        if not rows:
            raise KeyError(f"{self.path} holds no answered request to {model_name!r} (only the proxy keeps answers)")
        return np.array([f for f, _ in rows], np.int64), np.concatenate([logits for _, logits in rows])

    def models(self) -> list[str]:
        return sorted({r.model_name for r in self.records})

    def activations(self, model_name: str, *, shape: tuple[int, ...] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(frame_ids (N,), activations (N, ...)) of every request to `model_name`, batches concatenated.

        With `shape` (the split's activation shape, from the manifest), each activation is restored to float32 as
        the cloud restores it, undoing the form a quantising or pruning defence sent it in; without it, the first
        input is returned as it travelled.
        A frame id is -1 where the request carries none, and for every row of a batch larger than one, since one
        `frame_id` cannot name several frames. Requests whose per-frame shape or dtype differs from that of most
        requests (which the cloud rejects anyway) are left out, so the rows stack."""
        records = [r for r in self.records if r.model_name == model_name]
        if not records:
            raise KeyError(f"{self.path} has no requests for {model_name!r}; models: {', '.join(self.models())}")
        if shape is not None:
            rows = [r.restored(shape) for r in records]
            frame_ids = np.concatenate([_frame_ids(r, len(a)) for r, a in zip(records, rows, strict=True)])
            return frame_ids, np.concatenate(rows)
        kinds = Counter((r.activation.shape[1:], r.activation.dtype) for r in records)
        kind = kinds.most_common(1)[0][0]
        records = [r for r in records if (r.activation.shape[1:], r.activation.dtype) == kind]
        frame_ids = np.concatenate([_frame_ids(r, len(r.activation)) for r in records])
        return frame_ids, np.concatenate([r.activation for r in records])

    def originals(self, frame_ids: np.ndarray, manifest: Manifest) -> np.ndarray:
        """The private frames behind `frame_ids`, as the device's head saw them: uint8 (N, H, W, C)."""
        dataset = self.meta.get("dataset")
        if dataset is None:
            raise ValueError(
                f"{self.path} does not say which data set its frames come from (meta.json has no "
                "dataset): capture with --dataset NAME to score an attack against the originals"
            )
        frame_ids = np.asarray(frame_ids, np.int64)
        if (frame_ids < 0).any():
            raise ValueError(
                f"{int((frame_ids < 0).sum())} frame ids are -1 (the request named no single frame); "
                "leave those rows out before asking for originals"
            )
        channels, size = manifest.input_shape[0], manifest.input_shape[1]
        return data.resize(data.frames(dataset, frame_ids).images, size, channels)


def _frame_ids(record: CapturedRequest, rows: int) -> np.ndarray:
    """The frame id of each of a request's `rows` rows: -1 unless it is one frame that names itself."""
    known = record.frame_id is not None and rows == 1
    return np.full(rows, record.frame_id if known else -1, np.int64)


def _split(buffer: bytes) -> tuple[list[tuple[int, bytes]], int]:
    """The whole records in the contents of `requests.bin`, as (captured_ns, request bytes), and where they end."""
    records, offset = [], 0
    while offset + RECORD_HEADER.size <= len(buffer):
        length, captured_ns = RECORD_HEADER.unpack_from(buffer, offset)
        end = offset + RECORD_HEADER.size + length
        if end > len(buffer):
            break
        records.append((captured_ns, buffer[end - length : end]))
        offset = end
    return records, offset


def read(path: str | Path) -> Capture:
    """Read a capture, live or finished; a cut-short last record and requests that do not decode are left out."""
    path = Path(path)
    if not (path / "meta.json").is_file():
        raise FileNotFoundError(f"{path} is not a capture: no meta.json (splitleak attacker proxy --capture makes one)")
    try:
        meta = json.loads((path / "meta.json").read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path / 'meta.json'} is not JSON ({e}): not a capture, or one cut short") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path / 'meta.json'} holds {type(meta).__name__}, not the object a capture's meta.json is")
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(
            f"{path} is not a version {VERSION} {FORMAT} (meta.json says {meta.get('format')!r} "
            f"version {meta.get('version')!r})"
        )
    if meta.get("encrypted"):
        raise ValueError(
            f"{path} holds only TLS ciphertext ({meta.get('bytes_up')} bytes from devices): the proxy had no key the "
            f"device trusts, so there is nothing to invert; the cloud itself (splitleak cloud --record) still sees "
            f"every activation"
        )
    buffer = (path / "requests.bin").read_bytes()
    raw, end = _split(buffer)
    records, skipped = [], 0
    for captured_ns, request_bytes in raw:
        try:
            request = pb.ModelInferRequest.FromString(request_bytes)
            tensors = codec.decode_request(request)
        except (DecodeError, codec.CodecError):
            skipped += 1
            continue
        if not tensors:
            skipped += 1
            continue
        params = codec.get_parameters(request.parameters)
        split_point, frame_id = params.get("split_point"), params.get("frame_id")
        # The cloud's tails take one input named `activation`; a stock OIP request's first input stands in for it.
        activation = tensors.get("activation", next(iter(tensors.values())))
        records.append(
            CapturedRequest(
                request.id,
                captured_ns,
                request.model_name,
                None if split_point is None else str(split_point),
                None if frame_id is None else int(frame_id),
                activation,
                tensors,
                params,
            )
        )
    meta.update(skipped=skipped, truncated=end < len(buffer))
    return Capture(path, meta, records, _answers(path / "responses.bin"))


def _answers(path: Path) -> dict[str, dict[str, np.ndarray]]:
    """The outputs of each answer in `responses.bin` by the id of the request it answers ({} where there is none).
    An in-band error, and an answer that does not decode, are left out."""
    if not path.is_file():
        return {}
    answers = {}
    for _, payload in _split(path.read_bytes())[0]:
        kind, body = payload[:1], payload[1:]
        try:
            if kind == STREAM:
                answer = pb.ModelStreamInferResponse.FromString(body)
                if answer.error_message:
                    continue
                response = answer.infer_response
            else:
                response = pb.ModelInferResponse.FromString(body)
            answers[response.id] = codec.decode_response(response)
        except (DecodeError, codec.CodecError):
            continue
    return answers
