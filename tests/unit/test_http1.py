"""HTTP/1.1 message boundaries as the proxy reads them: a connection is between messages only when
every request has been answered in full, however the bytes are cut."""

import pytest

from rankserve.server.http1 import H1Messages

REQUEST = (b"POST /v2/models/ranker/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
           b"Content-Length: 11\r\n\r\n{\"a\": [1]}\n")
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 9\r\n\r\n{\"b\": 2}\n"
CHUNKED = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"4\r\nabcd\r\n6;ext=1\r\nefghij\r\n0\r\nX-Trailer: t\r\n\r\n")


def _states(messages: H1Messages, pieces: list[tuple[bytes, bool]]) -> list[bool]:
    out = []
    for data, from_client in pieces:
        messages.feed(data, from_client)
        out.append(messages.between_messages)
    return out


def _bytewise(data: bytes, from_client: bool) -> list[tuple[bytes, bool]]:
    return [(data[i:i + 1], from_client) for i in range(len(data))]


@pytest.mark.parametrize("answer", [ANSWER, CHUNKED], ids=["content-length", "chunked"])
def test_between_messages_only_after_the_last_byte_of_the_answer_even_fed_a_byte_at_a_time(answer):
    m = H1Messages()
    assert m.between_messages  # nothing sent yet
    states = _states(m, _bytewise(REQUEST, True) + _bytewise(answer, False))
    assert states[-1] and not any(states[:-1]), states.index(True)
    assert (m.requests, m.answers, m.readable) == (1, 1, True)


def test_pipelined_requests_are_each_answered_before_the_connection_is_at_rest():
    m = H1Messages()
    get = b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n\r\n"
    m.feed(REQUEST + get + REQUEST, True)  # three requests in one write
    m.feed(ANSWER + b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", False)
    assert not m.between_messages and m.answers == 2
    m.feed(CHUNKED[:40], False)
    assert not m.between_messages
    m.feed(CHUNKED[40:], False)
    assert m.between_messages and (m.requests, m.answers) == (3, 3)


def test_an_interim_100_continue_does_not_end_the_exchange_and_head_or_204_have_no_body():
    m = H1Messages()
    m.feed(b"POST /x HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n", True)
    m.feed(b"HTTP/1.1 100 Continue\r\n\r\n", False)
    assert not m.between_messages
    m.feed(b"abc", True)
    m.feed(b"HTTP/1.1 204 No Content\r\nContent-Length: 99\r\n\r\n", False)  # 204: no body, whatever it says
    assert m.between_messages
    m.feed(b"HEAD /v2 HTTP/1.1\r\n\r\n", True)
    m.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n", False)  # HEAD: the length of a body not sent
    assert m.between_messages and m.answers == 2


def test_an_error_answer_before_the_request_body_has_all_arrived_waits_for_the_rest_of_it():
    m = H1Messages()
    m.feed(REQUEST[:-5], True)
    m.feed(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 2\r\n\r\nno", False)
    assert not m.between_messages  # the client is still part-way through its request
    m.feed(REQUEST[-5:], True)
    assert m.between_messages


@pytest.mark.parametrize("client, server", [
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", b""),  # TLS: given up on at its first byte
    (b"0.5\n", b""),  # a line protocol
    (b"GET /stream HTTP/1.1\r\n\r\n", b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nbody until close"),
    (b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\n\r\n", b"HTTP/1.1 101 Switching Protocols\r\n\r\n"),
    (b"GET / HTTP/1.1\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: ten\r\n\r\n"),
    (b"GET / HTTP/1.1\r\n\r\n", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"),
    (b"", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),  # an answer to no request
    (b"GET /" + b"a" * 70_000, b""),  # a start line past the limit
], ids=["tls", "line-protocol", "until-close", "upgrade", "bad-length", "bad-chunk", "unasked", "too-long"])
def test_what_it_cannot_follow_makes_it_give_up_so_the_proxy_falls_back(client, server):
    m = H1Messages()
    m.feed(client, True)
    m.feed(server, False)
    assert not m.readable and not m.between_messages
    m.feed(REQUEST, True)  # and it stays given up
    assert not m.readable
