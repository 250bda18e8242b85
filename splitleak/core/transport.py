"""gRPC settings that the device, the cloud and the attacker's proxy share.

Message-size limits are set on both sides because each side enforces its own: a server that accepts 64 MiB is no
use if the client refuses to send more than gRPC's default 4 MiB. 64 MiB holds a batch of 1,024 ResNet-20 `stem`
activations (16x32x32 fp32, 64 KiB each); anything larger is answered RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import ipaddress

import grpc

from splitleak.core.tls import Tls

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

# A server reads messages up to 16 MiB over the limit, so that one a little too large (a batch a few frames too big,
# an over-long name) is answered in-band, RESOURCE_EXHAUSTED in its stream's error_message, and the stream goes on.
# Past that gRPC refuses the message itself, and that ends the stream: the transport cannot skip a message it does
# not read. The slack is also what one message can cost a server beyond the limit.
RECEIVE_SLACK_BYTES = 16 * 1024 * 1024
MAX_RECEIVE_BYTES = MAX_MESSAGE_BYTES + RECEIVE_SLACK_BYTES

SERVER_OPTIONS = [
    *(option for option in OPTIONS if option[0] != "grpc.max_receive_message_length"),
    ("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
    # gRPC sets SO_REUSEPORT on Linux by default: a second server on a port already held would bind it too, and the
    # kernel would split the devices between the two. Off, the second one fails to start instead.
    ("grpc.so_reuseport", 0),
    # Clients ping every 30 s (keepalive_time_ms), also between calls; below the default 5 minutes the server would
    # count those pings as abuse and close the connection.
    ("grpc.http2.min_ping_interval_without_data_ms", 20_000),
    # What one connection may have open at once, of every kind (inference, health, metadata): HTTP/2's recommended
    # floor (RFC 9113, section 6.5.2). A connection past it waits; other connections do not notice.
    ("grpc.max_concurrent_streams", 100),
]


def clouds(target: str) -> tuple[str, list[tuple[str, object]]]:
    """A gRPC target and the options that spread connections over every cloud `target` names.

    `target` is HOST:PORT, several separated by commas (IP addresses: 127.0.0.1:P1,127.0.0.1:P2), or a DNS name
    (name:PORT, dns:///name:PORT) that may resolve to several addresses. Where it can name more than one, gRPC's
    client-side round_robin connects to all of them and sends each new call to the next one that is up: a stream stays
    on the cloud it began on, and a cloud that goes away is dropped from the turn until it comes back, so a device's
    next stream (splitleak.device.stream reconnects) goes to another. One IP address keeps gRPC's default
    (pick_first)."""
    addresses = [a.strip() for a in target.split(",")]
    if len(addresses) > 1:
        if not all(_is_ip(a) for a in addresses):
            raise ValueError(
                f"several clouds are IP:PORT, comma-separated (127.0.0.1:8001,127.0.0.1:8002), not {target}"
            )
        family = "ipv6" if addresses[0].startswith("[") else "ipv4"
        return f"{family}:{','.join(addresses)}", [("grpc.lb_policy_name", "round_robin")]
    if _is_ip(target) or target.startswith(("ipv4:", "ipv6:", "unix:")):
        return target, []
    return target, [("grpc.lb_policy_name", "round_robin")]  # a name: each of its DNS records is a cloud


def _is_ip(address: str) -> bool:
    host = address.rpartition(":")[0].strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def channel(target: str, tls: Tls | None = None) -> grpc.Channel:
    """A channel to the cloud or clouds `target` names (see `clouds`), with mutual TLS if given."""
    target, balancing = clouds(target)
    if tls is not None:
        return grpc.secure_channel(target, tls.channel_credentials(), options=[*OPTIONS, *balancing])
    return grpc.insecure_channel(target, options=[*OPTIONS, *balancing])
