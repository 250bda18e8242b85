"""Mutual TLS on real processes: device and cloud agree as in plain text, a client without a certificate is refused,
the man in the middle without a key sees only ciphertext, and the curious cloud still sees everything.

The certificates come from trustme (a test CA that knows nothing of splitleak), and once from `splitleak tls make`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc

from splitleak import cli
from splitleak.attacker import proxy
from splitleak.core import capture, transport
from splitleak.core.process import start_cloud, stop
from splitleak.core.tls import CA_FILE, Tls, speaks_tls
from splitleak.device.head import Head

DATASET = "cifar10"
FRAMES = 20


@pytest.fixture(scope="module")
def tls_dir(tmp_path_factory) -> Path:
    """A folder as `--tls DIR` reads it, made by trustme: a CA, the cloud's certificate, a device's."""
    folder = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(folder / CA_FILE)
    for role, names in (("cloud", ("127.0.0.1", "localhost")), ("device", ("device",))):
        issued = ca.issue_cert(*names)
        issued.cert_chain_pems[0].write_to_path(folder / f"{role}.pem")
        issued.private_key_pem.write_to_path(folder / f"{role}.key")
    return folder


@pytest.fixture(scope="module")
def tls_cloud(shipped_model_dir, tls_dir, tmp_path_factory):
    """The shipped model served with mutual TLS by a curious cloud that records every request."""
    record = tmp_path_factory.mktemp("curious") / "capture"
    proc, port = start_cloud([shipped_model_dir], ["--tls", str(tls_dir), "--record", str(record)])
    yield port, record
    stop(proc)


def run_device(target: str, model_dir: Path, out: Path, *options: str) -> dict[int, int]:
    cmd = [sys.executable, "-m", "splitleak.cli", "device", "--cloud", target, "--dataset", DATASET]
    cmd += ["--model-dir", str(model_dir), "--limit", str(FRAMES), "--json", str(out), *options]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    return {f["frame"]: f["prediction"] for f in json.loads(out.read_text())["frames"]}


def test_a_device_over_mutual_tls_gets_what_it_gets_in_plain_text(
    shipped_cloud, tls_cloud, shipped_model_dir, tls_dir, tmp_path
):
    plain = run_device(f"127.0.0.1:{shipped_cloud}", shipped_model_dir, tmp_path / "plain.json")
    over_tls = run_device(f"127.0.0.1:{tls_cloud[0]}", shipped_model_dir, tmp_path / "tls.json", "--tls", str(tls_dir))
    assert over_tls == plain and len(plain) == FRAMES
    assert speaks_tls(f"127.0.0.1:{tls_cloud[0]}") is True
    assert speaks_tls(f"127.0.0.1:{shipped_cloud}") is False


def test_a_client_without_a_certificate_the_ca_signed_is_refused(tls_cloud, tls_dir, tmp_path):
    target = f"127.0.0.1:{tls_cloud[0]}"
    ca = (tls_dir / CA_FILE).read_bytes()
    other = trustme.CA().issue_cert("device")  # a certificate, but from a CA the cloud does not trust
    clients = {
        "plain text": grpc.insecure_channel(target),
        "no certificate": grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=ca)),
        "another CA's": grpc.secure_channel(
            target,
            grpc.ssl_channel_credentials(
                root_certificates=ca,
                private_key=other.private_key_pem.bytes(),
                certificate_chain=other.cert_chain_pems[0].bytes(),
            ),
        ),
        "the device's": transport.channel(target, Tls.from_folder(tls_dir, "device")),
    }
    answers = {}
    for name, channel in clients.items():
        with channel:
            try:
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
                answers[name] = "SERVING"
            except grpc.RpcError as e:
                answers[name] = e.code().name
    assert answers == {
        "plain text": "UNAVAILABLE",
        "no certificate": "UNAVAILABLE",
        "another CA's": "UNAVAILABLE",
        "the device's": "SERVING",
    }


def test_a_device_in_plain_text_is_told_the_cloud_speaks_tls(tls_cloud, shipped_model_dir, tmp_path):
    cmd = [sys.executable, "-m", "splitleak.cli", "device", "--cloud", f"127.0.0.1:{tls_cloud[0]}", "--limit", "1"]
    done = subprocess.run([*cmd, "--model-dir", str(shipped_model_dir)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        f"device: cannot reach the cloud at 127.0.0.1:{tls_cloud[0]}: it speaks TLS: give --tls DIR "
        "(or --tls-cert, --tls-key and --tls-ca)"
    )


def test_the_proxy_without_a_key_sees_only_ciphertext_while_the_curious_cloud_sees_every_activation(
    tls_cloud, shipped_model_dir, tls_dir, tmp_path
):
    port, record = tls_cloud
    proc, proxy_port = proxy.start_process(f"127.0.0.1:{port}", tmp_path / "mitm", dataset=DATASET)
    try:
        through = run_device(
            f"127.0.0.1:{proxy_port}", shipped_model_dir, tmp_path / "d.json", "--tls", str(tls_dir), "--seed", "3"
        )
    finally:
        assert stop(proc) == 0
    assert len(through) == FRAMES  # the device works through the relay

    meta = json.loads((tmp_path / "mitm" / "meta.json").read_text())
    head = Head(shipped_model_dir)
    assert meta["encrypted"] is True and meta["records"] == 0
    assert meta["bytes_up"] > FRAMES * head.split.activation_bytes  # every activation went through it...
    ciphertext = (tmp_path / "mitm" / "ciphertext.bin").read_bytes()
    assert len(ciphertext) == meta["ciphertext_kept"] > 0
    # ... and none of it is readable: not the model's name, not a piece of any activation the cloud received.
    assert head.served_name.encode() not in ciphertext
    with pytest.raises(ValueError, match="holds only TLS ciphertext"):
        capture.read(tmp_path / "mitm")

    seen = capture.read(record)  # the cloud's record, live: it decrypted what the device sent
    frame_ids, activations = seen.activations(head.served_name)
    assert set(through) <= set(frame_ids.tolist())
    pieces = activations.reshape(len(activations), -1)[:, :16].astype("<f4")
    assert all(piece.tobytes() not in ciphertext for piece in pieces if np.any(piece))
    assert cli.main(["attack", "--capture", str(tmp_path / "mitm"), "--attack", "decoder"]) == 2


def test_tls_make_makes_what_run_and_an_interception_proxy_with_the_ca_s_blessing_use(shipped_model_dir, tmp_path):
    folder = tmp_path / "certs"
    assert cli.main(["tls", "make", str(folder), "--proxy"]) == 0
    assert sorted(p.name for p in folder.iterdir()) == [
        "ca.key", "ca.pem", "cloud.key", "cloud.pem", "device.key", "device.pem", "proxy.key", "proxy.pem"
    ]  # fmt: skip
    assert cli.main(["tls", "make", str(folder)]) == 2  # never over a CA that signed certificates in use

    # A proxy the CA vouches for terminates TLS on both sides, and reads every request as the cloud does.
    tls = ["--tls", str(folder)]
    cloud, port = start_cloud([shipped_model_dir], tls)
    proc, proxy_port = proxy.start_process(f"127.0.0.1:{port}", tmp_path / "mitm", dataset=DATASET, extra=tls)
    try:
        run_device(f"127.0.0.1:{proxy_port}", shipped_model_dir, tmp_path / "d.json", *tls)
    finally:
        assert stop(proc) == 0
        stop(cloud)
    assert len(capture.read(tmp_path / "mitm").records) == FRAMES

    # `splitleak run --tls DIR` makes the certificates where there are none.
    done = subprocess.run(
        [sys.executable, "-m", "splitleak.cli", "run", "--tls", str(tmp_path / "fresh"), "--limit", "5"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "mutual TLS" in done.stdout and (tmp_path / "fresh" / "device.key").exists()


@pytest.mark.parametrize(
    ("options", "says"),
    [
        (["--tls-cert", "c.pem"], "mutual TLS needs all three of --tls-cert, --tls-key and --tls-ca"),
        (["--tls", "nowhere"], "cannot read nowhere/cloud.pem"),
        (["--tls", "."], "cannot read cloud.pem"),
    ],
)
def test_tls_options_that_cannot_work_get_one_line(options, says, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["cloud", "--port", "0", *options]) == 2
    assert says in capsys.readouterr().err
