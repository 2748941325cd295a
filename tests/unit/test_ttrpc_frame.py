"""Frame codec (sans-IO): header layout, the 4 MiB limit, incremental decoding."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.ttrpc.frame import (
    HEADER_SIZE,
    MAX_MESSAGE_SIZE,
    DecoderClosedError,
    Flags,
    Frame,
    FrameDecoder,
    FrameError,
    FrameTooLargeError,
    MessageType,
    OversizedFrame,
    TruncatedFrameError,
    encode_frame,
    encode_header,
)


def test_constants_match_spec() -> None:
    assert HEADER_SIZE == 10
    assert MAX_MESSAGE_SIZE == 4_194_304
    assert [int(t) for t in MessageType] == [1, 2, 3]
    assert (Flags.REMOTE_CLOSED, Flags.REMOTE_OPEN, Flags.NO_DATA) == (1, 2, 4)


def test_header_is_big_endian_length_stream_type_flags() -> None:
    # spec §5: Connect request header, len 40, stream 1, Request, flags 0.
    assert encode_header(40, 1, MessageType.REQUEST) == bytes.fromhex("00000028000000010100")
    assert encode_header(0x01020304, 0xA0B0C0D0, 3, 5) == bytes.fromhex("01020304a0b0c0d00305")


def test_empty_success_frame_is_ten_bytes() -> None:
    frame = encode_frame(5, MessageType.RESPONSE, b"")
    assert frame == bytes.fromhex("00000000000000050200")


@pytest.mark.parametrize(
    ("length", "stream_id", "type_", "flags"),
    [(-1, 1, 1, 0), (1, -1, 1, 0), (1, 1 << 32, 1, 0), (1, 1, 256, 0), (1, 1, 1, 256)],
)
def test_header_fields_out_of_range_rejected(
    length: int, stream_id: int, type_: int, flags: int
) -> None:
    with pytest.raises(ValueError):
        encode_header(length, stream_id, type_, flags)


def test_limit_is_inclusive_when_encoding() -> None:
    data = bytes(MAX_MESSAGE_SIZE)
    assert len(encode_frame(1, 1, data)) == HEADER_SIZE + MAX_MESSAGE_SIZE
    with pytest.raises(FrameTooLargeError) as info:
        encode_frame(1, 1, data + b"x")
    assert str(info.value) == "message length 4194305 exceed maximum message size of 4194304"
    assert isinstance(info.value, FrameError)


def test_limit_is_inclusive_when_decoding() -> None:
    dec = FrameDecoder()
    dec.feed(encode_header(MAX_MESSAGE_SIZE, 7, 1) + bytes(MAX_MESSAGE_SIZE))
    ev = dec.next_event()
    assert isinstance(ev, Frame)
    assert (ev.stream_id, len(ev.data)) == (7, MAX_MESSAGE_SIZE)


def test_two_frames_in_one_chunk_and_byte_by_byte() -> None:
    stream = encode_frame(1, 1, b"abc") + encode_frame(3, 1, b"") + encode_frame(5, 2, b"z", 4)
    expected = [Frame(1, 1, 0, b"abc"), Frame(3, 1, 0, b""), Frame(5, 2, 4, b"z")]
    dec = FrameDecoder()
    dec.feed(stream)
    assert dec.events() == expected
    assert dec.at_boundary

    dec = FrameDecoder()
    got = []
    for i in range(len(stream)):
        dec.feed(stream[i : i + 1])
        got += dec.events()
    assert got == expected


def test_unknown_type_and_flags_survive_decoding() -> None:
    dec = FrameDecoder()
    dec.feed(encode_frame(9, 0xEE, b"q", 0xFF))
    assert dec.events() == [Frame(9, 0xEE, 0xFF, b"q")]


def test_oversized_frame_is_skipped_and_stream_stays_in_sync() -> None:
    n = MAX_MESSAGE_SIZE + 1
    dec = FrameDecoder()
    dec.feed(encode_header(n, 11, 1))
    assert dec.next_event() is None
    # Fed in pieces; none of it is retained.
    chunk = b"\xff" * 65536
    left = n
    while left:
        piece = chunk[: min(left, len(chunk))]
        dec.feed(piece)
        left -= len(piece)
        assert dec.buffered <= len(chunk)
        if left:
            assert dec.next_event() is None
    dec.feed(encode_frame(13, 1, b"next"))
    ev = dec.next_event()
    assert ev == OversizedFrame(11, 1, 0, n, MAX_MESSAGE_SIZE)
    assert isinstance(ev, OversizedFrame)
    assert ev.message == "message length 4194305 exceed maximum message size of 4194304"
    assert dec.next_event() == Frame(13, 1, 0, b"next")


def test_custom_limit() -> None:
    dec = FrameDecoder(max_size=4)
    dec.feed(encode_frame(1, 1, b"12345", max_size=10) + encode_frame(3, 1, b"1234"))
    assert dec.events() == [OversizedFrame(1, 1, 0, 5, 4), Frame(3, 1, 0, b"1234")]


@pytest.mark.parametrize(
    "tail",
    [
        b"\x00\x00\x00",  # inside a header
        encode_header(5, 1, 1) + b"ab",  # inside data
        encode_header(MAX_MESSAGE_SIZE + 1, 1, 1) + b"ab",  # inside a skipped frame
    ],
)
def test_close_inside_a_frame_is_reported(tail: bytes) -> None:
    dec = FrameDecoder()
    dec.feed(encode_frame(1, 1, b"ok") + tail)
    with pytest.raises(TruncatedFrameError):
        dec.close()
    # What was complete before the cut is still delivered.
    assert dec.next_event() == Frame(1, 1, 0, b"ok")


def test_close_at_boundary_is_clean_even_with_undrained_frames() -> None:
    dec = FrameDecoder()
    dec.feed(encode_frame(1, 1, b"a") + encode_frame(3, 1, b"b"))
    dec.close()
    dec.close()  # idempotent
    assert len(dec.events()) == 2
    with pytest.raises(DecoderClosedError):
        dec.feed(b"x")


# ---------------------------------------------------------------------- properties

frames_st = st.lists(
    st.builds(
        Frame,
        stream_id=st.integers(0, 0xFFFFFFFF),
        type=st.integers(0, 255),
        flags=st.integers(0, 255),
        data=st.binary(max_size=64),
    ),
    max_size=8,
)


@settings(max_examples=150, deadline=None)
@given(frames=frames_st, cuts=st.lists(st.integers(0, 1000), max_size=12))
def test_any_split_gives_the_same_frames(frames: list[Frame], cuts: list[int]) -> None:
    stream = b"".join(encode_frame(f.stream_id, f.type, f.data, f.flags) for f in frames)
    points = sorted({c % (len(stream) + 1) for c in cuts})
    pieces = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    dec = FrameDecoder()
    got = []
    for piece in pieces:
        dec.feed(piece)
        got += dec.events()
    dec.close()
    assert got == frames


@settings(max_examples=200, deadline=None)
@given(chunks=st.lists(st.binary(max_size=64), max_size=10), limit=st.integers(0, 64))
def test_random_bytes_only_raise_documented_errors(chunks: list[bytes], limit: int) -> None:
    dec = FrameDecoder(max_size=limit)
    consumed = 0
    for chunk in chunks:
        dec.feed(chunk)
        for ev in dec.events():
            if isinstance(ev, Frame):
                assert len(ev.data) <= limit
                consumed += HEADER_SIZE + len(ev.data)
            else:
                assert ev.length > limit
                consumed += HEADER_SIZE + ev.length
    total = sum(map(len, chunks))
    assert consumed <= total
    try:
        dec.close()
    except TruncatedFrameError:
        assert consumed < total
    else:
        assert consumed == total
