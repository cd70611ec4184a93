"""The msgpack protocol and clients against a real server: sync, async, streaming, cancel, bad frames."""

import asyncio
import struct

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyserve import SamplingParams
from pyserve.client import AsyncClient, Client, RemoteError
from pyserve.protocol import MAX_FRAME_BYTES, ProtocolError, decode, encode, frame_length

from conftest import raw_connection, read_frame, wait_all_free


def test_sync_client_generate_chat_stream(served, reference):
    server, _ = served
    want = reference.generate("Hello world", SamplingParams(max_tokens=10, temperature=0))[0]
    with Client("127.0.0.1", server.msgpack_port) as c:
        assert c.models() == ["tiny"] and c.protocol == 1
        out = c.generate("tiny", "Hello world", max_tokens=10, temperature=0)
        assert out.text == want.text and out.token_ids == want.token_ids
        assert out.usage["completion_tokens"] == len(want.token_ids)
        chunks = list(c.stream("tiny", "Hello world", max_tokens=10, temperature=0))
        assert chunks[-1].finished and "".join(ch.text for ch in chunks) == want.text
        chat = c.chat("tiny", [{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0)
        assert len(chat.token_ids) <= 4
        with pytest.raises(RemoteError, match="top_p"):
            c.generate("tiny", "x", top_p=2.0)
        with pytest.raises(RemoteError) as missing:
            c.generate("nope", "x")
        assert missing.value.code == 404
        assert c.generate("tiny", "again", max_tokens=2).finish_reason in ("length", "stop")  # still usable


def test_async_client_many_in_flight_and_cancel(served, reference):
    server, llm = served
    prompts = ["Hello world", "Once upon", "The quick", "café 東京"]
    want = [o.token_ids for o in reference.generate(prompts, SamplingParams(max_tokens=8, temperature=0))]

    async def main():
        async with await AsyncClient.connect("127.0.0.1", server.msgpack_port) as c:
            outs = await asyncio.gather(*(c.generate("tiny", p, max_tokens=8, temperature=0) for p in prompts))
            stream = c.stream("tiny", "Hello world", max_tokens=2000, ignore_eos=True)
            async for chunk in stream:
                break
            await stream.aclose()  # sends cancel
            return [o.token_ids for o in outs]

    assert asyncio.run(main()) == want
    assert wait_all_free(llm)


def test_disconnect_cancels_requests(served):
    server, llm = served
    c = Client("127.0.0.1", server.msgpack_port)
    c._call("generate", {"model": "tiny", "prompt": "Hello", "max_tokens": 2000, "ignore_eos": True, "stream": True})
    c._read()  # the first partial arrived
    c.close()
    assert wait_all_free(llm)


def test_bad_frames_get_error_frames_and_the_server_survives(served):
    server, _ = served
    sock = raw_connection(server)
    sock.sendall(struct.pack(">I", 3) + b"\xc1\xc1\xc1")  # not msgpack
    assert read_frame(sock)["code"] == 400
    sock.sendall(encode({"type": "request", "id": 1, "method": "teleport"}))
    err = read_frame(sock)
    assert err["id"] == 1 and "unknown method" in err["message"]
    sock.sendall(encode({"type": "shout"}))
    assert "unknown frame type" in read_frame(sock)["message"]
    sock.sendall(struct.pack(">I", MAX_FRAME_BYTES + 1))  # oversized: error, then the connection closes
    assert read_frame(sock)["code"] == 413
    sock.close()
    truncated = raw_connection(server)
    truncated.sendall(struct.pack(">I", 100) + b"\x80")  # then hang up mid-frame
    truncated.close()
    with Client("127.0.0.1", server.msgpack_port) as c:  # the server is fine
        assert c.models() == ["tiny"]


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_frame_decoder_never_crashes(payload):
    try:
        message = decode(payload)
    except ProtocolError as exc:
        assert exc.code == 400
    else:
        assert isinstance(message, dict)


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.text(max_size=8), st.one_of(st.integers(-2**63, 2**64 - 1), st.text(max_size=8), st.binary(max_size=8),
                                                      st.floats(allow_nan=False), st.booleans(), st.none())))
def test_frames_round_trip(message):
    frame = encode(message)
    assert frame_length(frame[:4]) == len(frame) - 4
    assert decode(frame[4:]) == msgpack.unpackb(msgpack.packb(message, use_bin_type=True), raw=False)


def test_infer_on_tensors(served, reference):
    import numpy as np

    server, _ = served
    want = reference.generate("Hello world", SamplingParams(max_tokens=6, temperature=0))[0].text
    with Client("127.0.0.1", server.msgpack_port) as c:
        result = c.infer("tiny", {"text_input": [b"Hello world"], "max_tokens": np.array([6], dtype=np.int32),
                                  "temperature": np.array([0.0], dtype=np.float32)})
        assert result["outputs"]["text_output"]["data"] == [want.encode()]
        with pytest.raises(RemoteError, match="unknown input"):
            c.infer("tiny", {"text_input": [b"x"], "pixels": np.zeros((2, 2), dtype=np.float16)})
