"""What a failed MLflow call means: retry later, or drop the record (and say why in one line).

Shared by the delivery thread and the records it sends; imports no MLflow at module level.
"""

from __future__ import annotations

# Error codes a retry cannot fix: the record is dropped with a warning instead of retried forever.
_PERMANENT_ERRORS = frozenset({
    "INVALID_PARAMETER_VALUE", "BAD_REQUEST", "RESOURCE_ALREADY_EXISTS",
    "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE",
})
_NETWORK_REASONS = (
    ("Connection refused", "connection refused"),
    ("NewConnectionError", "cannot connect"),
    ("Read timed out", "no answer within the request timeout"),
    ("ConnectTimeout", "connect timed out"),
    ("RemoteDisconnected", "server closed the connection"),
    ("Connection reset", "connection reset"),
    ("Name or service not known", "unknown host"),
)


def is_permanent(exc: BaseException) -> bool:
    """Whether retrying `exc` cannot succeed (bad value, conflicting param, missing run)."""
    from mlflow.exceptions import MlflowException  # loaded by then: MLflow raised `exc`

    return isinstance(exc, MlflowException) and exc.error_code in _PERMANENT_ERRORS


def short_reason(exc: BaseException) -> str:
    """A one-line cause for warnings: the root network error when there is one.

    MLflow wraps connection failures in a long "API request to ... failed with exception
    HTTPConnectionPool(...)" message; the useful part is the last words of it.
    """
    from lmforge.launch.redact import redact_text

    text = redact_text(str(exc).strip())
    for marker, reason in _NETWORK_REASONS:
        if marker in text:
            return reason
    first = text.splitlines()[0] if text else type(exc).__name__
    return first if len(first) <= 240 else first[:237] + "..."
