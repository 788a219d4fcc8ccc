"""download() against a real HTTP server on 127.0.0.1 (no mocks of urllib or HTTP)."""

from __future__ import annotations

import functools
import hashlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from cnnlab.data.fetch import ChecksumError, DownloadError, download, verify_digest
from cnnlab.utils.files import file_digest

PAYLOAD = os.urandom(300 * 1024) + b"<html> inside binary data is fine"
HTML = b"<!DOCTYPE html>\n<html><head><title>Download page</title></head><body>click</body></html>\n"
FAST = dict(max_bytes=10 * 1024 * 1024, timeout_s=5.0, progress=False)


class Handler(SimpleHTTPRequestHandler):
    """Serves files from `directory`, plus a few special paths that misbehave on purpose."""

    def log_message(self, format: str, *args: object) -> None:  # keep pytest output clean
        pass

    def send_body(self, body: bytes, content_type: str, length: int | None = None) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        if length is not None:
            self.send_header("Content-Length", str(length))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/landing":
            self.send_body(HTML, "text/html; charset=utf-8", len(HTML))
        elif self.path == "/login-fragment":  # only the Content-Type says HTML
            self.send_body(b"<h1>Please log in</h1>", "text/html", 22)
        elif self.path.startswith("/html-as-octet"):
            body = b"\xef\xbb\xbf \r\n\t" + HTML.replace(b"<!DOCTYPE html>\n", b"")
            if self.path.endswith("-long"):  # longer than the sniff window
                body += b"<p>padding</p>\n" * 5000
            self.send_body(body, "application/octet-stream", len(body))
        elif self.path == "/huge":
            self.send_body(b"x" * 100, "application/octet-stream", length=10**12)
        elif self.path == "/no-length":
            self.close_connection = True
            self.send_body(b"\0" * 300_000, "application/octet-stream")  # HTTP/1.0: ends at close
        elif self.path == "/truncated":
            self.close_connection = True
            self.send_body(b"\0" * 100, "application/octet-stream", length=5000)
        elif self.path == "/to-ftp":
            self.send_response(302)
            self.send_header("Location", "ftp://127.0.0.1/payload.tar.gz")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path == "/error500":
            self.send_error(500, "boom")
        else:
            super().do_GET()


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # clients that hang up early (refused downloads) are expected here


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("served")
    (root / "payload.tar.gz").write_bytes(PAYLOAD)
    httpd = QuietServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    # A proxy from the environment would send requests for 127.0.0.1 somewhere else.
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


GOOD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


def test_good_download_matches_source(server: str, tmp_path: Path) -> None:
    dest = tmp_path / "sub" / "data.tar.gz"
    assert download(f"{server}/payload.tar.gz", dest, sha256=GOOD_SHA.upper(), **FAST) == dest
    assert dest.read_bytes() == PAYLOAD
    assert os.listdir(dest.parent) == ["data.tar.gz"]


def test_download_without_checksum_and_with_progress_bar(server: str, tmp_path: Path) -> None:
    dest = tmp_path / "data.tar.gz"
    download(f"{server}/payload.tar.gz", dest, sha256=None, max_bytes=10**7, timeout_s=5.0, progress=True)
    assert dest.read_bytes() == PAYLOAD


def test_wrong_checksum_leaves_nothing(server: str, tmp_path: Path) -> None:
    dest = tmp_path / "data.tar.gz"
    with pytest.raises(ChecksumError) as info:
        download(f"{server}/payload.tar.gz", dest, sha256="0" * 64, **FAST)
    assert "0" * 64 in str(info.value) and GOOD_SHA in str(info.value)
    assert info.value.actual == GOOD_SHA
    assert os.listdir(tmp_path) == []  # neither dest nor a .part temp file


def test_existing_dest_survives_wrong_checksum(server: str, tmp_path: Path) -> None:
    dest = tmp_path / "data.tar.gz"
    dest.write_bytes(b"the good old archive")
    with pytest.raises(ChecksumError):
        download(f"{server}/payload.tar.gz", dest, sha256="f" * 64, **FAST)
    assert dest.read_bytes() == b"the good old archive"
    assert os.listdir(tmp_path) == ["data.tar.gz"]


def test_existing_dest_replaced_on_success(server: str, tmp_path: Path) -> None:
    dest = tmp_path / "data.tar.gz"
    dest.write_bytes(b"old")
    download(f"{server}/payload.tar.gz", dest, sha256=GOOD_SHA, **FAST)
    assert dest.read_bytes() == PAYLOAD


@pytest.mark.parametrize(("path", "code"), [("/missing.zip", "404"), ("/error500", "500")])
def test_http_error_names_status_and_url(server: str, tmp_path: Path, path: str, code: str) -> None:
    url = f"{server}{path}"
    with pytest.raises(DownloadError, match=code) as info:
        download(url, tmp_path / "d.zip", sha256=None, **FAST)
    assert url in str(info.value)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("path", ["/landing", "/login-fragment"])
def test_html_content_type_refused(server: str, tmp_path: Path, path: str) -> None:
    with pytest.raises(DownloadError, match="HTML page, not an archive") as info:
        download(f"{server}{path}", tmp_path / "d.zip", sha256=None, **FAST)
    assert "landing page" in str(info.value)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("path", ["/html-as-octet", "/html-as-octet-long"])
def test_html_sniffed_despite_octet_stream(server: str, tmp_path: Path, path: str) -> None:
    dest = tmp_path / "d.zip"
    dest.write_bytes(b"previous")
    with pytest.raises(DownloadError, match="HTML"):
        download(f"{server}{path}", dest, sha256=None, **FAST)
    assert dest.read_bytes() == b"previous"
    assert os.listdir(tmp_path) == ["d.zip"]


def test_content_length_over_limit_refused(server: str, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match=r"announces 1000000000000 bytes.*max_download_bytes"):
        download(f"{server}/huge", tmp_path / "d.zip", sha256=None, **FAST)
    assert os.listdir(tmp_path) == []


def test_streamed_bytes_over_limit_aborted(server: str, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="exceeded the limit of 100000 bytes"):
        download(f"{server}/no-length", tmp_path / "d.zip", sha256=None, max_bytes=100_000, timeout_s=5, progress=False)
    assert os.listdir(tmp_path) == []
    # The same body within the limit downloads fine, so it is the limit that stopped it.
    download(f"{server}/no-length", tmp_path / "d.zip", sha256=None, max_bytes=300_000, timeout_s=5, progress=False)
    assert (tmp_path / "d.zip").stat().st_size == 300_000


def test_truncated_body_refused(server: str, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="after 100 of 5000 bytes"):
        download(f"{server}/truncated", tmp_path / "d.zip", sha256=None, **FAST)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/payload.tar.gz", "file:///etc/passwd", "127.0.0.1/x.zip"])
def test_non_http_schemes_refused(tmp_path: Path, url: str) -> None:
    with pytest.raises(DownloadError, match="unsupported URL scheme"):
        download(url, tmp_path / "d.zip", sha256=None, **FAST)
    assert os.listdir(tmp_path) == []


def test_redirect_to_ftp_refused(server: str, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="not http"):
        download(f"{server}/to-ftp", tmp_path / "d.zip", sha256=None, **FAST)
    assert os.listdir(tmp_path) == []


def test_closed_port_fails_fast(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/data.zip"
    start = time.monotonic()
    with pytest.raises(DownloadError, match="check the URL and your network") as info:
        download(url, tmp_path / "d.zip", sha256=None, max_bytes=1000, timeout_s=1.0, progress=False)
    assert time.monotonic() - start < 5
    assert url in str(info.value)
    assert os.listdir(tmp_path) == []


def test_file_digest_and_verify(tmp_path: Path) -> None:
    f = tmp_path / "f.bin"
    f.write_bytes(PAYLOAD)
    assert file_digest(f) == GOOD_SHA
    assert file_digest(f, "md5") == hashlib.md5(PAYLOAD).hexdigest()
    verify_digest(f, GOOD_SHA.upper())
    with pytest.raises(ChecksumError, match="f.bin") as info:
        verify_digest(f, "a" * 64)
    assert info.value.expected == "a" * 64 and info.value.actual == GOOD_SHA
