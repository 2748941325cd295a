"""Identifier validation with containerd's rules (container ids, exec ids, namespaces).

An id becomes a path component (bundle files, exit records, runc state), so a bad one
must be refused before anything touches the filesystem.
"""

from __future__ import annotations

import re

from protocol.ttrpc.status import Code, TtrpcError

__all__ = ["MAX_LENGTH", "InvalidIdentifierError", "is_valid_id", "validate_id"]

MAX_LENGTH = 76
_PATTERN = r"[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*"
_IDENTIFIER = re.compile(_PATTERN)


class InvalidIdentifierError(TtrpcError, ValueError):
    """An id that breaks containerd's rules; status InvalidArgument (3) on the wire.

    Also a ``ValueError`` so code with no ttrpc in sight can catch it naturally.
    """

    def __init__(self, message: str) -> None:
        super().__init__(Code.INVALID_ARGUMENT, message)


def is_valid_id(value: str) -> bool:
    return len(value) <= MAX_LENGTH and _IDENTIFIER.fullmatch(value) is not None


def validate_id(kind: str, value: str) -> str:
    """Return ``value`` unchanged, or raise ``InvalidIdentifierError`` naming ``kind``."""
    if not value:
        raise InvalidIdentifierError(f"{kind}: identifier must not be empty")
    if len(value) > MAX_LENGTH:
        raise InvalidIdentifierError(
            f"{kind}: identifier {value!r} greater than maximum length ({MAX_LENGTH} characters)"
        )
    if _IDENTIFIER.fullmatch(value) is None:
        raise InvalidIdentifierError(f"{kind}: identifier {value!r} must match {_PATTERN}")
    return value
