"""Downloads: a size cap and an overall deadline per file, an exclusive temporary file, no secrets
in errors."""

from __future__ import annotations

import hashlib
import os
import time
from typing import Callable

import pytest
from conftest import http_files, raw_server

from common import files
from common.downloads import DownloadLimitError, download

BODY = bytes(range(256)) * 8  # 2048 bytes


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


def serve_body(body: bytes) -> Callable[[str], tuple[int, bytes]]:
    return lambda name: (200, body)


def test_a_download_arrives_whole_with_its_digest(tmp_path):
    with http_files(serve_body(BODY)) as root:
        digest = download(f"{root}/f.bin", tmp_path / "f.bin", max_bytes=len(BODY), deadline_seconds=30)
    assert digest == hashlib.sha256(BODY).hexdigest()
    assert (tmp_path / "f.bin").read_bytes() == BODY and os.listdir(tmp_path) == ["f.bin"]


def test_an_announced_size_over_the_cap_is_refused_before_reading(tmp_path):
    target = tmp_path / "f.bin"
    target.write_bytes(b"previous")
    with http_files(serve_body(BODY)) as root:
        with pytest.raises(DownloadLimitError) as raised:
            download(f"{root}/f.bin?token=s3cret", target, max_bytes=1000, deadline_seconds=30)
    message = str(raised.value)
    assert f"{root}/f.bin?token=*** is 2048 bytes, over the limit of 1000 bytes" in message
    assert "s3cret" not in message
    assert target.read_bytes() == b"previous" and os.listdir(tmp_path) == ["f.bin"]


def test_an_unannounced_body_is_cut_at_the_cap(tmp_path):
    def endless(handler):  # no Content-Length: the body ends when the connection does
        handler.send_response(200)
        handler.end_headers()
        for _ in range(10_000):
            handler.wfile.write(BODY)

    with raw_server(endless) as root:
        with pytest.raises(DownloadLimitError, match=r"f.bin sent \d+ bytes, over the limit of 100000 bytes"):
            download(f"{root}/f.bin", tmp_path / "f.bin", max_bytes=100_000, deadline_seconds=30)
    assert os.listdir(tmp_path) == []


def test_a_connection_closed_early_is_an_error_not_a_short_file(tmp_path):
    def short(handler):
        handler.send_response(200)
        handler.send_header("Content-Length", "5000")
        handler.end_headers()
        handler.wfile.write(BODY)

    with raw_server(short) as root:
        with pytest.raises(ConnectionError, match="f.bin: the connection closed after 2048 of 5000 bytes"):
            download(f"{root}/f.bin", tmp_path / "f.bin", max_bytes=10_000, deadline_seconds=30)
    assert os.listdir(tmp_path) == []


def test_a_trickling_server_is_stopped_at_the_deadline(tmp_path):
    def trickle(handler):  # each byte well within the socket timeout, the whole far past the deadline
        handler.send_response(200)
        handler.send_header("Content-Length", "100")
        handler.end_headers()
        for _ in range(100):
            handler.wfile.write(b"x")
            handler.wfile.flush()
            time.sleep(0.1)

    started = time.monotonic()
    with raw_server(trickle) as root:
        with pytest.raises(DownloadLimitError, match=r"took longer than the 0.5 s allowed .* bytes received"):
            download(f"{root}/f.bin", tmp_path / "f.bin", 10_000, deadline_seconds=0.5, timeout_seconds=5)
    assert time.monotonic() - started < 3
    assert os.listdir(tmp_path) == []


def test_the_temporary_file_is_created_exclusively_and_removed_when_verification_fails(tmp_path, monkeypatch):
    opened = []
    real_open = files.os.open

    def spy(path, flags, mode=0o777):
        opened.append((os.fspath(path), flags))
        return real_open(path, flags, mode)

    monkeypatch.setattr(files.os, "open", spy)

    def refuse(digest):
        assert os.listdir(tmp_path) == [os.path.basename(opened[0][0])]  # written beside the target
        raise ValueError("not the expected file")

    with http_files(serve_body(BODY)) as root:
        with pytest.raises(ValueError, match="not the expected file"):
            download(f"{root}/f.bin", tmp_path / "f.bin", len(BODY), 30, verify=refuse)
        download(f"{root}/f.bin", tmp_path / "f.bin", len(BODY), 30)
    [(first, flags), (second, _)] = opened
    assert flags & os.O_CREAT and flags & os.O_EXCL
    assert os.path.dirname(first) == str(tmp_path) and first != second  # random names
    assert os.listdir(tmp_path) == ["f.bin"]


def test_urls_are_printed_without_credentials_or_tokens(tmp_path):
    # http.client reads "user:pa55@host" as a host with a bad port; its own error quotes the password.
    with pytest.raises(ValueError) as raised:
        download("http://user:pa55@127.0.0.1/x", tmp_path / "x", 10, 5)
    assert "pa55" not in str(raised.value) and "http://***@127.0.0.1/x: not a URL" in str(raised.value)
    assert raised.value.__cause__ is None and raised.value.__suppress_context__
