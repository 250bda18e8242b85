"""`splitleak tls make DIR`: a throwaway CA and the certificates for mutual TLS on this machine.

It writes `ca.pem` (and `ca.key`, kept to sign more), `cloud.pem`/`cloud.key`, valid for localhost, 127.0.0.1 and ::1
and any `--host` given, a client certificate `NAME.pem`/`NAME.key` for each `--client` (default: `device`), and with
`--proxy` one for a man in the middle the CA vouches for (which then reads everything, as the cloud does).
Pass the folder as `--tls DIR` to `splitleak cloud`, `device`, `run` and `demo`. For local use and tests only:
the keys are written unencrypted and the CA signs whatever this command asks.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from splitleak.core.tls import CA_FILE

LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")
VALID_DAYS = 30


def make(folder: Path, hosts: list[str], clients: list[str], proxy: bool = False) -> list[Path]:
    """Write the CA, the cloud's certificate and one per client into `folder` (which must not hold a CA yet); with
    `proxy`, also one for an interception proxy the CA vouches for, good both to serve devices and to dial the
    cloud."""
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / CA_FILE).exists():
        raise FileExistsError(f"{folder / CA_FILE} exists: make the certificates in a new folder")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("splitleak throwaway CA")
    ca = (
        _builder(ca_name, ca_name, ca_key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )  # digital signature, certificate and CRL signing
        .sign(ca_key, hashes.SHA256())
    )
    written = [_write(folder, "ca", ca, ca_key)]
    sans = [_san(h) for h in dict.fromkeys([*LOCAL_NAMES, *hosts])]
    server, client_auth = ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH
    written.append(_issue(folder, "cloud", ca, ca_key, [server], sans))
    for client in clients:
        written.append(_issue(folder, client, ca, ca_key, [client_auth], [x509.DNSName(client)]))
    if proxy:
        written.append(_issue(folder, "proxy", ca, ca_key, [server, client_auth], sans))
    return written


def ensure(folder: Path) -> Path:
    """`folder`, with a CA and certificates made in it first if it holds no CA."""
    if not (folder / CA_FILE).exists():
        make(folder, [], ["device"])
    return folder


def _issue(folder: Path, role: str, ca, ca_key, usages, sans) -> Path:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _builder(_name(role), ca.subject, key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return _write(folder, role, cert, key)


def _builder(subject: x509.Name, issuer: x509.Name, public_key) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # clocks a little apart
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _write(folder: Path, role: str, cert: x509.Certificate, key) -> Path:
    (folder / f"{role}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path = folder / f"{role}.key"
    key_path.touch(mode=0o600)
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return folder / f"{role}.pem"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["make"], help="make: write a throwaway CA and certificates")
    parser.add_argument("folder", type=Path, help="where to write them (a new folder)")
    parser.add_argument(
        "--host", action="append", default=[], help="another name or address the cloud's certificate is valid for"
    )
    parser.add_argument("--client", action="append", help="a client certificate to make, by name (default: device)")
    parser.add_argument(
        "--proxy",
        action="store_true",
        help="also make proxy.pem: an interception proxy the CA vouches for (`attacker proxy --tls DIR`)",
    )
    return parser


def main(args: argparse.Namespace) -> int:
    for path in make(args.folder, args.host, args.client or ["device"], args.proxy):
        print(path)
    return 0
