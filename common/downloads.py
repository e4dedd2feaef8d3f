"""Downloads with a size cap and an overall deadline, streamed into a file only this process opened."""

from __future__ import annotations

import hashlib
import http.client
import os
import time
import urllib.request
from pathlib import Path
from typing import IO, Callable, Optional

from common.files import exclusive_temp
from common.redaction import redact_url as redact

SOCKET_TIMEOUT_SECONDS = 10  # per connect and per read: an unreachable network fails within seconds
_CHUNK = 1 << 16


class DownloadLimitError(OSError):
    """A download went past its size cap or its deadline; nothing of it was kept."""


def download(
    url: str,
    target: Path,
    max_bytes: int,
    deadline_seconds: float,
    algorithm: str = "sha256",
    verify: Optional[Callable[[str], None]] = None,
    timeout_seconds: float = SOCKET_TIMEOUT_SECONDS,
) -> str:
    """Streams `url` to `target`, whole or not at all, and returns its `algorithm` hex digest.

    Refused (DownloadLimitError) once the announced or received size passes `max_bytes`, or the
    whole download takes longer than `deadline_seconds` (a server trickling a byte now and then
    never trips the socket timeout). `verify(digest)` may raise to keep nothing. The temporary file
    is created exclusively under a random name beside `target` and removed on any failure."""
    target.parent.mkdir(parents=True, exist_ok=True)
    descriptor, tmp = exclusive_temp(target)
    try:
        with os.fdopen(descriptor, "wb") as out:
            digest = _stream(url, out, max_bytes, deadline_seconds, algorithm, timeout_seconds)
        if verify is not None:
            verify(digest)
        os.replace(tmp, target)  # two processes downloading at once each rename a whole file
        return digest
    finally:
        tmp.unlink(missing_ok=True)


def _stream(url: str, out: IO[bytes], max_bytes: int, deadline: float, algorithm: str, timeout: float) -> str:
    started = time.monotonic()
    digest, size = hashlib.new(algorithm), 0
    with _open(url, min(timeout, deadline)) as response:
        announced = response.headers.get("Content-Length", "")
        if announced.isdigit() and int(announced) > max_bytes:
            raise DownloadLimitError(
                f"{redact(url)} is {int(announced)} bytes, over the limit of {max_bytes} bytes for this file"
            )
        # read1: at most one receive per call, so the deadline is checked as the bytes arrive.
        read = getattr(response, "read1", response.read)
        while chunk := read(_CHUNK):
            size += len(chunk)
            if size > max_bytes:
                raise DownloadLimitError(
                    f"{redact(url)} sent {size} bytes, over the limit of {max_bytes} bytes for this "
                    "file; stopped reading"
                )
            if time.monotonic() - started > deadline:
                raise DownloadLimitError(
                    f"{redact(url)} took longer than the {deadline:g} s allowed for this file "
                    f"({size} bytes received); stopped"
                )
            digest.update(chunk)
            out.write(chunk)
    if announced.isdigit() and size != int(announced):  # read1 ends quietly where read would raise
        raise ConnectionError(f"{redact(url)}: the connection closed after {size} of {announced} bytes")
    return digest.hexdigest()


def _open(url: str, timeout: float) -> IO[bytes]:
    try:
        return urllib.request.urlopen(url, timeout=timeout)
    except (ValueError, http.client.InvalidURL) as error:  # a malformed URL: their text quotes it
        raise ValueError(
            f"{redact(url)}: not a URL that can be downloaded ({type(error).__name__})"
        ) from None
