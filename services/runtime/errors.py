"""The one error hierarchy. Each error carries its gRPC status code; the gRPC
interceptor (services.runtime.grpc_server) maps them in one place, and the Kafka
stage loop uses ``dead_letter_reason`` to label dead-lettered messages."""

from __future__ import annotations

import grpc


class SluiceError(Exception):
    """Base of every error Sluice raises on purpose."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    dead_letter_reason: str = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(SluiceError):
    """The caller sent something malformed: a bad request or an undecodable batch."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    dead_letter_reason = "invalid"


class DecodeError(InvalidArgument):
    """A Kafka message value or header could not be decoded into a SampleBatch."""

    dead_letter_reason = "decode_error"


class SchemaVersionError(InvalidArgument):
    """A message carries a schema version this build does not understand."""

    dead_letter_reason = "schema_version"


class TooLarge(InvalidArgument):
    """A message or request exceeds the configured size limits."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    dead_letter_reason = "too_large"


class NotFound(SluiceError):
    """A named object (sketch, model, key) does not exist."""

    code = grpc.StatusCode.NOT_FOUND
    dead_letter_reason = "not_found"


class FailedPrecondition(SluiceError):
    """The system is not in a state to do this (e.g. merging incompatible sketches)."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    dead_letter_reason = "failed_precondition"


class Unavailable(SluiceError):
    """A dependency (broker, object store, model) is unreachable; retrying may help."""

    code = grpc.StatusCode.UNAVAILABLE
    dead_letter_reason = "unavailable"


class ConfigError(SluiceError):
    """Settings are inconsistent or name something that does not exist."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    dead_letter_reason = "config"
