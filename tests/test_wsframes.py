"""The node's WebSocket frame reader (cluster/wsframes.py), bytes in, messages out (RFC 6455 §5).

One test per server rule, then hypothesis: any split of a valid stream reads the
same, and arbitrary or mutated bytes only ever give messages or one ERROR with a
close code a server may send.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.wsframes import (
    MSG_ERROR,
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    FrameReader,
    Message,
    client_frame,
    close_code_allowed,
    close_frame,
    frame_header,
    split_frames,
    text_frame,
    unmask,
)

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MAX = 1024


def frame(opcode: int, payload: bytes = b"", *, fin: bool = True, masked: bool = True, rsv: int = 0) -> bytes:
    """A client frame as a browser would send it."""
    first = (0x80 if fin else 0) | rsv | opcode
    length = len(payload)
    if length < 126:
        header = bytes((first, (0x80 if masked else 0) | length))
    elif length < 65536:
        header = bytes((first, (0x80 if masked else 0) | 126)) + length.to_bytes(2, "big")
    else:
        header = bytes((first, (0x80 if masked else 0) | 127)) + length.to_bytes(8, "big")
    if not masked:
        return header + payload
    mask = os.urandom(4)
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def read(data: bytes, max_size: int = MAX) -> list[Message]:
    return FrameReader(max_size).feed(data)


def error_code(messages: list[Message]) -> int | None:
    return messages[-1].data if messages and messages[-1].type == MSG_ERROR else None  # type: ignore[return-value]


def test_a_masked_text_frame_is_one_text_message():
    assert read(frame(OP_TEXT, b'{"action":"ping"}')) == [Message(OP_TEXT, b'{"action":"ping"}', "")]


def test_lengths_of_7_16_and_64_bits_are_read():
    for size in (0, 125, 126, 65535, 65536):
        assert read(frame(OP_BINARY, b"x" * size), max_size=70_000) == [Message(OP_BINARY, b"x" * size, "")]


def test_an_unmasked_client_frame_is_a_protocol_error():
    assert error_code(read(frame(OP_TEXT, b"{}", masked=False))) == 1002


def test_reserved_bits_without_an_extension_are_a_protocol_error():
    assert error_code(read(frame(OP_TEXT, b"{}", rsv=0x40))) == 1002


def test_an_unknown_opcode_is_a_protocol_error():
    assert error_code(read(frame(0x3, b""))) == 1002


def test_control_frames_must_be_final_and_short():
    assert error_code(read(frame(OP_PING, b"", fin=False))) == 1002
    assert error_code(read(frame(OP_PING, b"x" * 126))) == 1002


def test_a_message_over_the_limit_is_refused_from_its_header():
    header_only = frame(OP_TEXT, b"x" * (MAX + 1))[:8]  # the payload never arrives
    assert error_code(read(header_only)) == 1009


def test_fragments_over_the_limit_together_are_refused():
    data = frame(OP_TEXT, b"x" * 600, fin=False) + frame(OP_CONTINUATION, b"x" * 600)
    assert error_code(read(data)) == 1009


def test_fragments_are_joined_and_control_frames_may_come_between():
    data = frame(OP_TEXT, b'{"a"', fin=False) + frame(OP_PING, b"p") + frame(OP_CONTINUATION, b":1}")
    assert read(data) == [Message(OP_PING, b"p", ""), Message(OP_TEXT, b'{"a":1}', "")]


def test_a_continuation_without_a_message_is_a_protocol_error():
    assert error_code(read(frame(OP_CONTINUATION, b"x"))) == 1002


def test_a_new_message_inside_a_fragmented_one_is_a_protocol_error():
    assert error_code(read(frame(OP_TEXT, b"a", fin=False) + frame(OP_TEXT, b"b"))) == 1002


def test_text_must_be_utf8():
    assert error_code(read(frame(OP_TEXT, b"\xff\xfe"))) == 1007
    split = "é".encode()  # a character split across two fragments is fine
    assert read(frame(OP_TEXT, split[:1], fin=False) + frame(OP_CONTINUATION, split[1:]))[0].data == split


def test_binary_is_not_checked_for_utf8():
    assert read(frame(OP_BINARY, b"\xff")) == [Message(OP_BINARY, b"\xff", "")]


def test_close_frames_carry_a_code_and_a_reason():
    assert read(frame(OP_CLOSE, (1000).to_bytes(2, "big") + b"bye")) == [Message(OP_CLOSE, 1000, "bye")]
    assert read(frame(OP_CLOSE)) == [Message(OP_CLOSE, 1005, "")]


def test_bad_close_frames_are_protocol_errors():
    assert error_code(read(frame(OP_CLOSE, b"\x03"))) == 1002  # one byte
    assert error_code(read(frame(OP_CLOSE, (1005).to_bytes(2, "big")))) == 1002  # never sent on the wire
    assert error_code(read(frame(OP_CLOSE, (999).to_bytes(2, "big")))) == 1002
    assert error_code(read(frame(OP_CLOSE, (1000).to_bytes(2, "big") + b"\xff"))) == 1007


def test_nothing_is_read_after_a_close_or_an_error():
    reader = FrameReader(MAX)
    assert [m.type for m in reader.feed(frame(OP_CLOSE) + frame(OP_TEXT, b"{}"))] == [OP_CLOSE]
    assert reader.feed(frame(OP_TEXT, b"{}")) == []
    reader = FrameReader(MAX)
    assert error_code(reader.feed(frame(OP_TEXT, b"{}", masked=False))) == 1002
    assert reader.feed(frame(OP_TEXT, b"{}")) == []


def test_an_idle_reader_holds_no_bytes():
    reader = FrameReader(MAX)
    reader.feed(frame(OP_TEXT, b"{}"))
    assert reader._buffer == b""


def test_unmask_is_its_own_inverse():
    mask = b"\x01\x02\x03\x04"
    assert unmask(mask, unmask(mask, b"hello world")) == b"hello world"
    assert unmask(mask, b"") == b""


def test_server_frames():
    assert text_frame(b"hi") == b"\x81\x02hi"
    assert text_frame(b"x" * 200)[:4] == b"\x81\x7e\x00\xc8"
    assert close_frame(4008, b"slow") == b"\x88\x06\x0f\xa8slow"
    assert len(close_frame(1000, b"r" * 300)) == 2 + 125


# --- hypothesis -----------------------------------------------------------------------------

client_frames = st.one_of(
    st.tuples(st.just(OP_TEXT), st.text(max_size=300).map(str.encode)),
    st.tuples(st.just(OP_BINARY), st.binary(max_size=300)),
    st.tuples(st.sampled_from([OP_PING, OP_PONG]), st.binary(max_size=125)),
)


@FUZZ
@given(st.lists(client_frames, max_size=8), st.data())
def test_any_split_of_a_valid_stream_reads_the_same(frames, data):
    stream = b"".join(frame(opcode, payload) for opcode, payload in frames)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    reader = FrameReader(MAX)
    messages: list[Message] = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        messages.extend(reader.feed(stream[start:end]))
    assert messages == [Message(opcode, payload, "") for opcode, payload in frames]


def _well_formed(messages: list[Message]) -> None:
    for index, message in enumerate(messages):
        if message.type == MSG_ERROR:
            assert index == len(messages) - 1, "an error ends the stream"
            assert message.data in (1002, 1007, 1009)
        elif message.type == OP_CLOSE:
            assert index == len(messages) - 1, "a close ends the stream"
            assert message.data == 1005 or close_code_allowed(message.data)  # type: ignore[arg-type]
        else:
            assert message.type in (OP_TEXT, OP_BINARY, OP_PING, OP_PONG)
            assert isinstance(message.data, bytes) and len(message.data) <= MAX


@FUZZ
@given(st.lists(st.binary(max_size=64), max_size=8))
def test_arbitrary_bytes_give_messages_or_one_error(chunks):
    reader = FrameReader(MAX)
    messages: list[Message] = []
    for chunk in chunks:
        messages.extend(reader.feed(chunk))
    _well_formed(messages)


@FUZZ
@given(st.lists(client_frames, min_size=1, max_size=4), st.data())
def test_mutated_streams_give_messages_or_one_error(frames, data):
    stream = bytearray(b"".join(frame(opcode, payload) for opcode, payload in frames))
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(stream) - 1))
        stream[position] = data.draw(st.integers(0, 255))
    _well_formed(read(bytes(stream)))


# --- the client side of the same codec (load generator, tests) ----------------------------


@given(st.binary(max_size=70_000))
def test_a_client_frame_is_what_the_server_reader_reads(payload: bytes) -> None:
    reader = FrameReader(max_size=1 << 20)
    [message] = reader.feed(client_frame(payload, OP_BINARY))
    assert (message.type, message.data) == (OP_BINARY, payload)


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536, 70_000])
def test_frame_header_reads_the_lengths_the_server_writes(size: int) -> None:
    frame = text_frame(b"x" * size)
    first, second, length, header = frame_header(frame)
    assert (first & 0x0F, second & 0x80, length) == (OP_TEXT, 0, size)
    assert frame[header:] == b"x" * size
    assert frame_header(frame[: header - 1]) is None  # an incomplete header waits for more bytes


def test_split_frames_returns_the_complete_server_frames_and_keeps_the_rest() -> None:
    stream = text_frame(b"one") + text_frame(b"x" * 300) + text_frame(b"three")
    frames, rest = split_frames(stream[:-2])
    assert frames == [(OP_TEXT, b"one"), (OP_TEXT, b"x" * 300)]
    assert rest == text_frame(b"three")[:-2]
    assert split_frames(rest + stream[-2:]) == ([(OP_TEXT, b"three")], b"")
