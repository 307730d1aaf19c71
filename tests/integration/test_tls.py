"""TLS and mutual TLS on core's gRPC port, with certificates made for the test."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from lodestar.common.auth import Role
from lodestar.common.config import TlsSettings
from lodestar.common.events import new_event
from lodestar.common.sdk import connect
from lodestar.core.v1 import bus_pb2, bus_pb2_grpc
from lodestar.usage.v1 import events_pb2 as usage

SERVER_NAME = "core.lodestar.test"


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


def _write_cert(path: Path, cert: x509.Certificate) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _issue(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_name: x509.Name,
    subject: str,
    usage_oid: x509.ObjectIdentifier,
    sans: list[x509.GeneralName],
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage_oid]), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    """A CA, a server certificate for SERVER_NAME and 127.0.0.1, and a client certificate."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("lodestar test CA")
    now = datetime.datetime.now(datetime.UTC)
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
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
        .sign(ca_key, hashes.SHA256())
    )
    server_key, server_cert = _issue(
        ca_key,
        ca_name,
        SERVER_NAME,
        ExtendedKeyUsageOID.SERVER_AUTH,
        [x509.DNSName(SERVER_NAME), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
    )
    client_key, client_cert = _issue(
        ca_key, ca_name, "usage-tracker", ExtendedKeyUsageOID.CLIENT_AUTH, []
    )
    return {
        "ca": _write_cert(tmp_path / "ca.pem", ca_cert),
        "server_cert": _write_cert(tmp_path / "server.pem", server_cert),
        "server_key": _write_key(tmp_path / "server.key", server_key),
        "client_cert": _write_cert(tmp_path / "client.pem", client_cert),
        "client_key": _write_key(tmp_path / "client.key", client_key),
    }


def _tls_settings(core_settings, pki, *, mutual: bool):  # type: ignore[no-untyped-def]
    tls = TlsSettings(
        enabled=True,
        cert_file=pki["server_cert"],
        key_file=pki["server_key"],
        client_ca_file=pki["ca"] if mutual else None,
    )
    return core_settings.model_copy(update={"tls": tls, "health_port": 0})


def an_event():  # type: ignore[no-untyped-def]
    return new_event(usage.RequestCompleted(model="m", provider="t"), source="test://tls")


async def _publish(channel: grpc.aio.Channel) -> bus_pb2.PublishResponse:
    stub = bus_pb2_grpc.EventBusServiceStub(channel)
    return await stub.Publish(bus_pb2.PublishRequest(events=[an_event()]), timeout=5)


async def test_tls_client_publishes_and_plaintext_fails(core_starter, core_settings, pki, tokens):
    core = await core_starter(_tls_settings(core_settings, pki, mutual=False))
    token = tokens[Role.PUBLISHER]
    async with connect(
        core.target, token, tls=True, root_ca=pki["ca"], server_name=SERVER_NAME
    ) as channel:
        assert (await _publish(channel)).accepted == 1
    async with connect(core.target, token) as plaintext:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _publish(plaintext)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    # a client that does not trust the CA is refused too
    async with connect(core.target, token, tls=True, server_name=SERVER_NAME) as untrusting:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _publish(untrusting)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    # and the token is still required over TLS
    async with connect(
        core.target, None, tls=True, root_ca=pki["ca"], server_name=SERVER_NAME
    ) as anonymous:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _publish(anonymous)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_mutual_tls_requires_a_client_certificate(core_starter, core_settings, pki, tokens):
    core = await core_starter(_tls_settings(core_settings, pki, mutual=True))
    token = tokens[Role.PUBLISHER]
    async with connect(
        core.target,
        token,
        tls=True,
        root_ca=pki["ca"],
        client_cert=pki["client_cert"],
        client_key=pki["client_key"],
        server_name=SERVER_NAME,
    ) as channel:
        assert (await _publish(channel)).accepted == 1
    async with connect(
        core.target, token, tls=True, root_ca=pki["ca"], server_name=SERVER_NAME
    ) as no_cert:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _publish(no_cert)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    async with connect(core.target, token) as plaintext:
        with pytest.raises(grpc.aio.AioRpcError):
            await _publish(plaintext)
