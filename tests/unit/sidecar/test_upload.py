"""sidecar.upload: a body is buffered within its limits and the shared memory budget, under
one deadline; with aiohttp's real StreamReader fed by hand."""

from __future__ import annotations

import asyncio
from unittest import mock

import aiohttp
import pytest

from sidecar.upload import (
    UploadDeadline,
    UploadFailed,
    UploadFailure,
    UploadMemory,
    receive_upload,
    release,
    upload_rest,
)


def stream_of(*chunks: bytes, eof: bool = True) -> aiohttp.StreamReader:
    loop = asyncio.get_running_loop()
    reader = aiohttp.StreamReader(mock.Mock(_reading_paused=False), 2**16, loop=loop)
    for chunk in chunks:
        reader.feed_data(chunk)
    if eof:
        reader.feed_eof()
    return reader


def deadline(seconds: float) -> UploadDeadline:
    return UploadDeadline(asyncio.get_running_loop().time() + seconds)


async def test_a_small_body_is_received_whole_and_its_memory_given_back() -> None:
    memory = UploadMemory(1000)
    d = deadline(1.0)
    upload = await receive_upload(stream_of(b"abc", b"de"), d, 100, memory)
    assert upload.complete and upload.head == b"abcde"
    assert memory.used == 5 and d.held == 5
    release(d, memory)
    assert memory.used == 0 and d.held == 0


async def test_a_body_past_the_buffer_or_the_budget_streams_the_rest() -> None:
    memory = UploadMemory(4)
    d = deadline(1.0)
    stream = stream_of(b"abcdef", eof=False)
    upload = await receive_upload(stream, d, 100, memory)  # the budget is spent after 6
    assert not upload.complete and upload.head == b"abcdef"
    stream.feed_data(b"gh")
    stream.feed_eof()
    assert b"".join([c async for c in upload_rest(upload, stream, d)]) == b"abcdefgh"
    assert d.received == 8
    spent = UploadMemory(0)  # nothing left: nothing buffered
    empty = await receive_upload(stream_of(b"x"), deadline(1.0), 100, spent)
    assert empty.head == b"" and not empty.complete


async def test_a_body_that_stalls_times_out_and_a_broken_one_is_abandoned() -> None:
    with pytest.raises(UploadFailed) as late:
        await receive_upload(stream_of(b"ab", eof=False), deadline(0.05), 100)
    assert late.value.failure is UploadFailure.TIMEOUT and late.value.received == 2
    broken = stream_of(b"ab", eof=False)
    broken.set_exception(aiohttp.ClientPayloadError("reset"))
    with pytest.raises(UploadFailed) as gone:
        await receive_upload(broken, deadline(1.0), 100)
    assert gone.value.failure is UploadFailure.ABANDONED
