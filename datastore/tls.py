"""TLS and mutual TLS for the datastore service: the server's credentials and what a client presents.

Server (``datastore-serve --tls-cert F --tls-key F [--tls-client-ca F]``): with ``--tls-client-ca`` the
handshake requires a client certificate signed by that CA; a client without one, or with one from another
CA, fails the handshake (the client sees UNAVAILABLE) before any RPC. A plaintext client of a TLS server
fails the same way.

Clients (``DatastoreClient``, ``spec-generate --datastore-tls-*``, the vLLM proposer's ``SPECSTORE_TLS_*``,
the healthcheck's ``--ca/--cert/--key``) take PEM files through ``client_tls_options``.

No torch, nothing from ``client/`` (the client imports this module, not the other way round).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import grpc


def _read(path: Optional[str], what: str) -> Optional[bytes]:
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"{what} {path}: cannot read it ({e.strerror or e})") from None


def server_credentials(cert: Optional[str], key: Optional[str], client_ca: Optional[str] = None
                       ) -> Optional[grpc.ServerCredentials]:
    """Credentials of a TLS server (None: plaintext). ValueError for an incomplete or unreadable set:
    a certificate without its key, or a client CA without a server certificate (mTLS needs TLS)."""
    if not (cert or key):
        if client_ca:
            raise ValueError("--tls-client-ca needs TLS (--tls-cert and --tls-key)")
        return None
    if not (cert and key):
        raise ValueError("TLS needs both --tls-cert and --tls-key")
    pair = (_read(key, "--tls-key"), _read(cert, "--tls-cert"))
    ca = _read(client_ca, "--tls-client-ca")
    return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=ca is not None)


def client_tls_options(ca: Optional[str] = None, cert: Optional[str] = None, key: Optional[str] = None) -> dict:
    """``DatastoreClient`` keyword arguments for PEM files: ``ca`` the server's root (None: the system's
    roots), ``cert``/``key`` the client's certificate chain and key (mutual TLS; both or neither).
    An empty dict when no file is given (plaintext)."""
    if bool(cert) != bool(key):
        raise ValueError("a client certificate needs its key and a key its certificate (give both)")
    if not (ca or cert):
        return {}
    return {"tls": True, "root_certificates": _read(ca, "TLS CA"), "certificate_chain": _read(cert, "TLS certificate"),
            "private_key": _read(key, "TLS key")}


def channel_credentials(root_certificates: Optional[bytes] = None, certificate_chain: Optional[bytes] = None,
                        private_key: Optional[bytes] = None) -> grpc.ChannelCredentials:
    """A TLS channel's credentials; with ``certificate_chain`` and ``private_key`` the client presents them."""
    return grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)
