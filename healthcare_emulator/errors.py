"""Google's error envelope: {"error": {"code", "message", "status", "details"}}."""
from __future__ import annotations

# google.rpc.Code name -> (numeric code, HTTP status), from google/rpc/code.proto.
CODES: dict[str, tuple[int, int]] = {
    "CANCELLED": (1, 499),
    "UNKNOWN": (2, 500),
    "INVALID_ARGUMENT": (3, 400),
    "DEADLINE_EXCEEDED": (4, 504),
    "NOT_FOUND": (5, 404),
    "ALREADY_EXISTS": (6, 409),
    "PERMISSION_DENIED": (7, 403),
    "RESOURCE_EXHAUSTED": (8, 429),
    "FAILED_PRECONDITION": (9, 400),
    "ABORTED": (10, 409),
    "OUT_OF_RANGE": (11, 400),
    "UNIMPLEMENTED": (12, 501),
    "INTERNAL": (13, 500),
    "UNAVAILABLE": (14, 503),
    "UNAUTHENTICATED": (16, 401),
}


class ApiError(Exception):
    """An error the API answers with; `status` is a google.rpc.Code name."""

    def __init__(self, status: str, message: str, *, details: list | None = None, http: int | None = None):
        super().__init__(message)
        if status not in CODES:
            raise ValueError(f"unknown status {status}")
        self.status = status
        self.message = message
        self.details = details or []
        self.code, default_http = CODES[status]
        self.http = http or default_http

    def body(self) -> dict:
        err = {"code": self.http, "message": self.message, "status": self.status}
        if self.details:
            err["details"] = self.details
        return {"error": err}

    def rpc_status(self) -> dict:
        """The google.rpc.Status form used in Operation.error."""
        return {"code": self.code, "message": self.message}


def invalid(message: str, field: str | None = None) -> ApiError:
    details = None
    if field:
        details = [{"@type": "type.googleapis.com/google.rpc.BadRequest",
                    "fieldViolations": [{"field": field, "description": message}]}]
    return ApiError("INVALID_ARGUMENT", message, details=details)


def not_found(message: str) -> ApiError:
    return ApiError("NOT_FOUND", message)
