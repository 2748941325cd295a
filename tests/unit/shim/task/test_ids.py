from __future__ import annotations

import pytest

from protocol.ttrpc.status import Code, TtrpcError
from shim.task.ids import MAX_LENGTH, InvalidIdentifierError, is_valid_id, validate_id


@pytest.mark.parametrize(
    "value",
    ["a", "c1", "abc.def", "a-b_c.d", "A9", "x" * MAX_LENGTH, "0", "sha256.abc-1"],
)
def test_valid(value: str) -> None:
    assert validate_id("container id", value) == value
    assert is_valid_id(value)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "x" * (MAX_LENGTH + 1),
        "a/b",
        "..",
        ".",
        "../etc",
        "a..b",
        "-a",
        "a-",
        "a__b",
        "a b",
        "a\x00",
        "é",
        "a\n",
    ],
)
def test_invalid(value: str) -> None:
    assert not is_valid_id(value)
    with pytest.raises(InvalidIdentifierError) as info:
        validate_id("exec id", value)
    assert info.value.code == Code.INVALID_ARGUMENT
    assert info.value.message.startswith("exec id: identifier")
    # Callers may catch either family.
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, TtrpcError)
