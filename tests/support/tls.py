"""A throwaway PKI for TLS tests: a CA, a server certificate for ``localhost`` and
``127.0.0.1``, a client certificate it signed, and a second CA with a client certificate of
its own (trusted by nobody here). Generated with ``cryptography`` (EC P-256, valid one day),
written as PEM files."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address
from pathlib import Path


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    """A CA that signed neither the server's nor the client's certificate."""
    other_client_cert: Path
    """A client certificate signed by ``other_ca``: a mutual-TLS server must refuse it."""
    other_client_key: Path

    def read(self, name: str) -> bytes:
        path: Path = getattr(self, name)
        return path.read_bytes()


def make_pki(root: Path) -> Pki:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    root.mkdir(parents=True, exist_ok=True)
    now = datetime.now(UTC) - timedelta(minutes=5)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def builder(
        subject: str, issuer: x509.Name, key: ec.EllipticCurvePrivateKey
    ) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(name(subject))
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + timedelta(days=1))
        )

    def ca(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            builder(cn, name(cn), key)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(key, hashes.SHA256())
        )
        return key, cert

    def leaf(
        cn: str,
        signer: tuple[ec.EllipticCurvePrivateKey, x509.Certificate],
        usage: x509.ObjectIdentifier,
        san: list[x509.GeneralName] | None = None,
    ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        b = (
            builder(cn, signer[1].subject, key)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if san:
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return key, b.sign(signer[0], hashes.SHA256())

    def write(path: Path, obj: ec.EllipticCurvePrivateKey | x509.Certificate) -> Path:
        if isinstance(obj, x509.Certificate):
            path.write_bytes(obj.public_bytes(serialization.Encoding.PEM))
        else:
            path.write_bytes(
                obj.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
            path.chmod(0o600)
        return path

    the_ca = ca("sluice test CA")
    other = ca("some other CA")
    server = leaf(
        "localhost",
        the_ca,
        ExtendedKeyUsageOID.SERVER_AUTH,
        [x509.DNSName("localhost"), x509.IPAddress(IPv4Address("127.0.0.1"))],
    )
    client = leaf("sluice-client", the_ca, ExtendedKeyUsageOID.CLIENT_AUTH)
    stranger = leaf("stranger", other, ExtendedKeyUsageOID.CLIENT_AUTH)
    return Pki(
        ca=write(root / "ca.pem", the_ca[1]),
        server_cert=write(root / "server.pem", server[1]),
        server_key=write(root / "server.key", server[0]),
        client_cert=write(root / "client.pem", client[1]),
        client_key=write(root / "client.key", client[0]),
        other_ca=write(root / "other-ca.pem", other[1]),
        other_client_cert=write(root / "other-client.pem", stranger[1]),
        other_client_key=write(root / "other-client.key", stranger[0]),
    )
