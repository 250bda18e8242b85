"""gRPC settings that the device, the cloud and the attacker's proxy share.

Message-size limits are set on both sides because each side enforces its own: a server that accepts 64 MiB is no
use if the client refuses to send more than gRPC's default 4 MiB. 64 MiB holds a batch of 1,024 ResNet-20 `stem`
activations (16x32x32 fp32, 64 KiB each); anything larger is answered RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import grpc

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
SERVICE_NAME = "inference.GRPCInferenceService"

OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # A stream may sit idle between frames for as long as the device likes; keepalive pings find dead peers
    # without the stream itself timing out.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


def channel(target: str) -> grpc.Channel:
    return grpc.insecure_channel(target, options=OPTIONS)
