"""The Datastore service's registration on a gRPC server, with request parsing that never raises.

gRPC's generated ``add_DatastoreServicer_to_server`` parses requests with ``Message.FromString``: bytes that
are no valid message make it raise inside the gRPC runtime, which answers UNKNOWN ("Unexpected
DecodeError") and logs a traceback per call, before the servicer sees the call (so before any auth check).
``add_to_server`` registers the same methods with a parser that returns an ``Undecodable`` in that case;
the servicer's wrappers then answer UNAUTHENTICATED (when the method needs a token the call lacks) or
INVALID_ARGUMENT, and log one rate-limited line.
"""
from __future__ import annotations

from typing import Any, Callable

import grpc

from ..protos import datastore_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["Datastore"]


class Undecodable:
    """What a request parses to when its bytes are no valid ``message`` (its type name), ``size`` bytes long."""

    __slots__ = ("message", "size", "error")

    def __init__(self, message: str, size: int, error: str):
        self.message, self.size, self.error = message, size, error

    def details(self) -> str:
        return f"the request is not a valid {self.message} message ({self.size} bytes)"


def tolerant_parser(cls) -> Callable[[bytes], Any]:
    """``cls.FromString``, but an ``Undecodable`` instead of an exception."""
    parse, name = cls.FromString, cls.DESCRIPTOR.name

    def deserialize(data: bytes):
        try:
            return parse(data)
        except Exception as e:  # noqa: BLE001 - DecodeError, and whatever else bad bytes may raise
            return Undecodable(name, len(data), type(e).__name__)

    return deserialize


_HANDLER_KIND = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def add_to_server(servicer, server) -> None:
    """Register every method of the Datastore service (protos/datastore.proto) of ``servicer`` on
    ``server``, as the generated code does, but with ``tolerant_parser`` request parsing."""
    handlers = {}
    for m in SERVICE.methods:
        req, resp = getattr(pb, m.input_type.name), getattr(pb, m.output_type.name)
        make = _HANDLER_KIND[(m.client_streaming, m.server_streaming)]
        handlers[m.name] = make(getattr(servicer, m.name), request_deserializer=tolerant_parser(req),
                                response_serializer=resp.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))
    server.add_registered_method_handlers(SERVICE.full_name, handlers)


HEALTH_SERVICE_NAME = "grpc.health.v1.Health"


def add_health_to_server(health_servicer, server, on_undecodable: Callable[[str, "Undecodable"], None]) -> None:
    """Register grpc.health.v1 (``health_servicer``: grpc_health's aio ``HealthServicer``) on ``server``, as
    ``health_pb2_grpc.add_HealthServicer_to_server`` does, but with ``tolerant_parser`` request parsing:
    undecodable bytes get INVALID_ARGUMENT and ``on_undecodable(method, request)`` (a rate-limited log line)
    instead of UNKNOWN and a traceback per call. The health service needs no token (load balancers probe it)."""
    from grpc_health.v1 import health_pb2

    service = health_pb2.DESCRIPTOR.services_by_name["Health"]
    handlers = {}
    for m in service.methods:
        impl = getattr(health_servicer, m.name, None)
        if impl is None:
            continue
        req, resp = getattr(health_pb2, m.input_type.name), getattr(health_pb2, m.output_type.name)
        make = _HANDLER_KIND[(m.client_streaming, m.server_streaming)]
        handlers[m.name] = make(_refusing_undecodable(m.name, impl, on_undecodable),
                                request_deserializer=tolerant_parser(req), response_serializer=resp.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


def _refusing_undecodable(method: str, impl, on_undecodable):
    """``impl(request, context)`` (a coroutine function: Check, and Watch, which writes on the context),
    aborting with INVALID_ARGUMENT when the request did not parse."""
    async def handler(request, context):
        if type(request) is Undecodable:
            on_undecodable(method, request)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.details())
        return await impl(request, context)

    return handler
