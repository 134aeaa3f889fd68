"""Exit 0 when a datastore server answers SERVING on grpc.health.v1, else 1 (docker healthcheck).

    python -m specstore.datastore.healthcheck 127.0.0.1:50051 [--service NAME] [--timeout 2] [--tls --ca FILE]
        [--cert FILE --key FILE]     # mutual TLS: a server with --tls-client-ca refuses a probe without them
"""
from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


from .tls import channel_credentials, client_tls_options


def check(address: str, service: str = "", timeout: float = 2.0, tls: bool = False, ca: str | None = None,
          cert: str | None = None, key: str | None = None) -> bool:
    if tls or cert:
        o = client_tls_options(ca, cert, key)
        channel = grpc.secure_channel(address, channel_credentials(o.get("root_certificates"),
                                                                   o.get("certificate_chain"), o.get("private_key")))
    else:
        channel = grpc.insecure_channel(address)
    with channel:
        try:
            resp = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError as e:
            print(f"unhealthy: {e.code().name}: {e.details()}", file=sys.stderr)
            return False
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    print(status)
    return resp.status == health_pb2.HealthCheckResponse.SERVING


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m specstore.datastore.healthcheck", description=__doc__.splitlines()[0])
    ap.add_argument("address", help="HOST:PORT")
    ap.add_argument("--service", default="", help="service name ('' = the whole server)")
    ap.add_argument("--timeout", type=float, default=2.0)
    ap.add_argument("--tls", action="store_true")
    ap.add_argument("--ca", default=None, help="PEM root certificate for --tls")
    ap.add_argument("--cert", default=None, help="PEM client certificate (mutual TLS; implies --tls)")
    ap.add_argument("--key", default=None, help="PEM key of --cert")
    a = ap.parse_args(argv)
    return 0 if check(a.address, a.service, a.timeout, a.tls, a.ca, a.cert, a.key) else 1


if __name__ == "__main__":
    sys.exit(main())
