"""TLS: the server serves --tls-cert/--tls-key; DatastoreClient(tls=True) and the healthcheck connect.
Mutual TLS (--tls-client-ca): only clients with a certificate of that CA get in."""
from __future__ import annotations

import shutil
import subprocess

import grpc
import pytest

from specstore.client.datastore_client import DatastoreClient
from specstore.datastore.healthcheck import check
from specstore.datastore.server import ServerOptions
from specstore.datastore.servicer import ServiceConfig
from specstore.datastore.tls import channel_credentials, client_tls_options
from specstore.protos import datastore_pb2 as pb
from specstore.protos import datastore_pb2_grpc as pb_grpc
from tests.datastore_fake_index import FakeIndex, write_fake_index
from tests.integration.datastore_support import ServerThread, make_certificates


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_tls_roundtrip(tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    index = write_fake_index(tmp_path / "index", [[1, 2, 3, 4]], fingerprint="fp")
    opts = ServerOptions(tls_cert=str(cert), tls_key=str(key))
    with ServerThread(index, ServiceConfig(), opts, opener=FakeIndex.open) as s:
        from specstore.client.datastore_client import DatastoreClient

        addr = f"localhost:{s.port}"
        with DatastoreClient(addr, timeout_s=5, tls=True, root_certificates=cert.read_bytes()) as c:
            assert c.retrieve([2, 3], 4).tokens.tolist() == [3, 4]
        with DatastoreClient(addr, timeout_s=1) as plain:  # plaintext against TLS fails softly
            assert plain.retrieve([2, 3], 4).num_drafts == 0 and plain.stats["failures"] == 1
        assert check(addr, tls=True, ca=str(cert))


# ----------------------------------------------------------------------------------------- mutual TLS
def _code(address, creds) -> grpc.StatusCode:
    """The status of an Info call over a channel with ``creds`` (None: plaintext); OK when it answers."""
    ch = grpc.secure_channel(address, creds) if creds is not None else grpc.insecure_channel(address)
    with ch:
        try:
            pb_grpc.DatastoreStub(ch).Info(pb.InfoRequest(), timeout=5)
        except grpc.RpcError as e:
            return e.code()
    return grpc.StatusCode.OK


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_mutual_tls_admits_only_clients_of_the_ca(tmp_path):
    """--tls-client-ca: a client certificate of that CA works (DatastoreClient, healthcheck); a TLS client
    without a certificate, one with a certificate of another CA, and a plaintext client are refused at the
    handshake."""
    ours = make_certificates(tmp_path / "ours", "ours-ca", "server", "node")
    theirs = make_certificates(tmp_path / "theirs", "theirs-ca", "rogue")
    cert, key = ours["server"]
    index = write_fake_index(tmp_path / "index", [[1, 2, 3, 4]], fingerprint="fp")
    opts = ServerOptions(tls_cert=str(cert), tls_key=str(key), tls_client_ca=str(ours["ca"]))
    node = client_tls_options(str(ours["ca"]), *map(str, ours["node"]))
    with ServerThread(index, ServiceConfig(), opts, opener=FakeIndex.open) as s:
        addr = f"localhost:{s.port}"
        with DatastoreClient(addr, timeout_s=5, **node) as c:
            assert c.retrieve([2, 3], 4).tokens.tolist() == [3, 4]
        assert _code(addr, channel_credentials(**{k: v for k, v in node.items() if k != "tls"})) == grpc.StatusCode.OK
        ca = ours["ca"].read_bytes()
        refused = {
            "no client certificate": channel_credentials(ca),
            "a certificate of another CA": channel_credentials(ca, *(p.read_bytes() for p in theirs["rogue"])),
            "plaintext": None,
        }
        for what, creds in refused.items():
            assert _code(addr, creds) == grpc.StatusCode.UNAVAILABLE, what
        with DatastoreClient(addr, timeout_s=2, tls=True, root_certificates=ca) as no_cert:   # fails softly
            assert no_cert.retrieve([2, 3], 4).num_drafts == 0 and no_cert.stats["failures"] == 1
        assert check(addr, tls=True, ca=str(ours["ca"]), cert=str(ours["node"][0]), key=str(ours["node"][1]))
        assert not check(addr, tls=True, ca=str(ours["ca"]))


def test_tls_options_are_checked(tmp_path):
    from specstore.datastore.cli import _config_from_args, build_parser
    from specstore.datastore.cli_common import UsageError

    a = build_parser().parse_args(["--index", "x", "--tls-client-ca", "ca.pem"])
    with pytest.raises(UsageError, match="--tls-client-ca needs TLS"):
        _config_from_args(a)
    with pytest.raises(ValueError, match="needs its key"):
        client_tls_options(None, "cert.pem", None)
    with pytest.raises(ValueError, match="cannot read"):
        client_tls_options(str(tmp_path / "missing.pem"))
    assert client_tls_options() == {}
