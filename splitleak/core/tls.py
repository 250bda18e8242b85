"""Mutual TLS between device, proxy and cloud: the files each role reads and the gRPC credentials made from them.

Every role takes the same three files: its own certificate and private key, and the CA that signs its peers'
certificates. The cloud asks each device for a certificate signed by that CA and refuses a connection without one
(mutual TLS); the device checks that the cloud's certificate is signed by the CA and names the address it dialled.
`--tls DIR` reads them from a folder made by `splitleak tls make DIR` (splitleak.certs): `ca.pem`, and
`ROLE.pem`/`ROLE.key` for the role that reads it.

TLS protects the wire, not the input: a man in the middle without a key the device trusts sees only ciphertext, but
the cloud, which holds its own key, still sees every activation the device sends.
"""

from __future__ import annotations

import argparse
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc

from splitleak.core.options import address

CA_FILE = "ca.pem"


class TlsError(ValueError):
    """A certificate, key or CA that cannot be used; the message says which file and why."""


@dataclass(frozen=True)
class Tls:
    cert: bytes  # PEM, this role's certificate chain
    key: bytes  # PEM, this role's private key
    ca: bytes  # PEM, the CA its peers' certificates are signed by
    files: tuple[Path, Path, Path]  # where cert, key and CA were read from

    @classmethod
    def read(cls, cert: Path, key: Path, ca: Path) -> Tls:
        pems = _pem(cert, "CERTIFICATE"), _pem(key, "PRIVATE KEY"), _pem(ca, "CERTIFICATE")
        return cls(*pems, (cert, key, ca))

    @classmethod
    def from_folder(cls, folder: Path, role: str) -> Tls:
        return cls.read(folder / f"{role}.pem", folder / f"{role}.key", folder / CA_FILE)

    def server_credentials(self) -> grpc.ServerCredentials:
        """Serve with this certificate and require a client certificate signed by the CA."""
        return grpc.ssl_server_credentials([(self.key, self.cert)], root_certificates=self.ca, require_client_auth=True)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Dial with this certificate, trusting only servers whose certificate the CA signed."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert
        )

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser, role: str) -> None:
        group = parser.add_argument_group("mutual TLS (off unless given)")
        group.add_argument(
            "--tls", type=Path, metavar="DIR", help=f"read {CA_FILE}, {role}.pem and {role}.key from DIR"
        )
        group.add_argument("--tls-cert", type=Path, metavar="PEM", help="this side's certificate")
        group.add_argument("--tls-key", type=Path, metavar="PEM", help="this side's private key")
        group.add_argument("--tls-ca", type=Path, metavar="PEM", help="the CA that signs the other side's certificate")

    @classmethod
    def from_args(cls, args: argparse.Namespace, role: str) -> Tls | None:
        """The TLS files the arguments name, or None for plain text; TlsError if they are given but unusable."""
        files = (args.tls_cert, args.tls_key, args.tls_ca)
        if args.tls is not None:
            if any(files):
                raise TlsError("give either --tls DIR or --tls-cert/--tls-key/--tls-ca, not both")
            return cls.from_folder(args.tls, role)
        if not any(files):
            return None
        if not all(files):
            raise TlsError("mutual TLS needs all three of --tls-cert, --tls-key and --tls-ca")
        return cls.read(*files)


def _pem(path: Path, kind: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise TlsError(f"cannot read {path}: {e.strerror or e}") from None
    if b"-----BEGIN " not in data or kind.encode() not in data:
        raise TlsError(f"{path} is not a PEM file holding a {kind.lower()}")
    return data


def speaks_tls(target: str, timeout_s: float = 2.0) -> bool | None:
    """Whether the server at HOST:PORT answers a TLS handshake (its certificate unchecked); None if nothing answers
    there at all, or the target is not a plain HOST:PORT."""
    try:
        sock = socket.create_connection(address(target), timeout=timeout_s)
    except (ValueError, OSError):
        return None
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    probe.check_hostname, probe.verify_mode = False, ssl.CERT_NONE
    try:
        with probe.wrap_socket(sock) as tls_sock:
            tls_sock.do_handshake()
        return True
    except OSError:  # ssl.SSLError among them: a plain-text gRPC server closes on a TLS hello
        return False
    finally:
        sock.close()


def why_unreachable(target: str, tls: Tls | None) -> str:
    """What a failed connection to `target` most likely comes from where TLS is concerned; '' if not TLS."""
    listens_tls = speaks_tls(target)
    if listens_tls is None:
        return ""
    if listens_tls and tls is None:
        return "it speaks TLS: give --tls DIR (or --tls-cert, --tls-key and --tls-ca)"
    if not listens_tls and tls is not None:
        return "it does not speak TLS: leave out the --tls options"
    if tls is None:
        return ""
    return _handshake_error(target, tls)


def _handshake_error(target: str, tls: Tls) -> str:
    """The TLS handshake with these files, as gRPC would make it, and what fails in it."""
    cert, key, ca = tls.files
    host, port = address(target)  # speaks_tls has answered for it: a HOST:PORT
    context = ssl.create_default_context(cafile=str(ca))
    context.load_cert_chain(cert, key)
    try:
        with socket.create_connection((host, port), timeout=2.0) as sock:
            with context.wrap_socket(sock, server_hostname=host) as tls_sock:
                tls_sock.settimeout(0.5)
                try:
                    # TLS 1.3: a server that refuses the client's certificate says so, or hangs up, only after the
                    # client has finished its side of the handshake.
                    closed = tls_sock.recv(1) == b""
                except TimeoutError:
                    closed = False
    except ssl.SSLCertVerificationError as e:
        return f"its certificate does not check out against {ca}: {e.verify_message}"
    except ssl.SSLError as e:
        return f"it refused the TLS handshake ({e.reason}): is {cert} signed by the CA the cloud trusts?"
    except OSError:
        return ""
    return f"it hung up after the TLS handshake: is {cert} signed by the CA the cloud trusts?" if closed else ""
