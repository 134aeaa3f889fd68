"""TLS: the server serves --tls-cert/--tls-key; DatastoreClient(tls=True) and the healthcheck connect."""
from __future__ import annotations

import shutil
import subprocess

import pytest

from specstore.datastore.healthcheck import check
from specstore.datastore.server import ServerOptions
from specstore.datastore.servicer import ServiceConfig
from tests.datastore_fake_index import FakeIndex, write_fake_index
from tests.integration.datastore_support import ServerThread


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
