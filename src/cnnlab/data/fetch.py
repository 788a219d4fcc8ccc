"""Download one file over http(s) with size limits, HTML sniffing and checksum verification.

The URL and whatever it serves are untrusted: the body is streamed to a temporary file next to
``dest`` with a byte budget, checked, and only then atomically renamed over ``dest``. Any
failure removes the temporary file and leaves an existing ``dest`` untouched, so a bad run never
replaces a good archive with a broken one.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tqdm import tqdm

from cnnlab.utils.files import file_digest

__all__ = ["ChecksumError", "DownloadError", "download", "verify_digest"]

_CHUNK = 1 << 20
_SNIFF_BYTES = 512
_SCHEMES = ("http", "https")
_HTML_TYPES = ("text/html", "application/xhtml+xml")
_HTML_STARTS = (b"<!doctype html", b"<html")
_BOMS = (b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff")


class DownloadError(RuntimeError):
    """The download failed or the server sent something that is not the expected file."""


class ChecksumError(DownloadError):
    """A file's digest differs from the expected one: corrupt, truncated or tampered with."""

    def __init__(self, file: str | Path, expected: str, actual: str, algorithm: str = "sha256") -> None:
        self.file, self.expected, self.actual, self.algorithm = str(file), expected, actual, algorithm
        super().__init__(
            f"{file}: {algorithm} mismatch: expected {expected}, got {actual}; the file is corrupt, "
            f"truncated or was changed upstream — re-download it, and update the expected {algorithm} "
            "only if you trust the new file"
        )


def verify_digest(path: Path, expected: str, algorithm: str = "sha256") -> None:
    """Raise ChecksumError unless ``path`` has digest ``expected`` (hex, any case)."""
    actual = file_digest(path, algorithm)
    if actual != expected.strip().lower():
        raise ChecksumError(path, expected.strip().lower(), actual, algorithm)


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """urllib follows redirects to ftp:// too; an untrusted server must not pick the scheme."""

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> Any:
        if urlsplit(newurl).scheme.lower() not in _SCHEMES:
            fp.close()
            raise DownloadError(
                f"{req.full_url} redirected to {newurl}, which is not http(s); refusing it — "
                "use a direct http(s) download link"
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _looks_like_html(head: bytes) -> bool:
    for bom in _BOMS:
        if head.startswith(bom):
            head = head[len(bom) :]
            break
    return head.lstrip().lower().startswith(_HTML_STARTS)


def _html_error(url: str) -> DownloadError:
    return DownloadError(
        f"{url}: the server returned an HTML page, not an archive, so the URL is probably a "
        "landing page and not a direct download link; use the link of the file itself"
    )


def _network_error(url: str, exc: BaseException) -> DownloadError:
    reason = getattr(exc, "reason", None) or exc
    return DownloadError(f"could not download {url}: {reason}; check the URL and your network")


def download(
    url: str,
    dest: Path,
    *,
    sha256: str | None,
    max_bytes: int,
    timeout_s: float,
    progress: bool = True,
) -> Path:
    """Download ``url`` to ``dest`` (atomically) and return ``dest``.

    Refuses non-http(s) URLs, HTTP errors, HTML pages, bodies over ``max_bytes`` and, when
    ``sha256`` is given, content with another digest. ``timeout_s`` bounds connecting and each
    read, not the whole transfer.
    """
    dest = Path(dest)
    scheme = urlsplit(url).scheme.lower()
    if scheme not in _SCHEMES:
        raise DownloadError(
            f"{url}: unsupported URL scheme {scheme or '(none)'!r}; use an http:// or https:// link"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)

    opener = urllib.request.build_opener(_HttpOnlyRedirects)
    request = urllib.request.Request(url, headers={"User-Agent": "cnnlab-download/1"})
    try:
        response = opener.open(request, timeout=timeout_s)
    except urllib.error.HTTPError as exc:
        exc.close()
        raise DownloadError(
            f"{url}: the server answered HTTP {exc.code} {exc.reason}; check that the URL is right "
            "and the file is still there"
        ) from None
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        raise _network_error(url, exc) from None

    with response:
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                _stream(url, response, out, dest.name, max_bytes, progress, sha256)
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return dest


def _stream(
    url: str, response: Any, out: Any, label: str, max_bytes: int, progress: bool, sha256: str | None
) -> None:
    """Copy the body into ``out``, enforcing the limits, the HTML sniff and the checksum."""
    if response.headers.get_content_type() in _HTML_TYPES:
        raise _html_error(url)
    length_header = response.headers.get("Content-Length")
    length = int(length_header) if length_header and length_header.strip().isdigit() else None
    if length is not None and length > max_bytes:
        raise DownloadError(
            f"{url}: the server announces {length} bytes, more than the limit of {max_bytes}; "
            "raise download.max_download_bytes if this file is expected to be that big"
        )

    digest = hashlib.sha256()
    head = b""
    total = 0
    with tqdm(total=length, unit="B", unit_scale=True, unit_divisor=1024, desc=label, disable=not progress) as bar:
        while True:
            try:
                chunk = response.read(_CHUNK)
            except (http.client.HTTPException, OSError) as exc:
                raise _network_error(url, exc) from None
            if not chunk:
                break
            total += len(chunk)
            if total > max_bytes:  # Content-Length may be absent or lie
                raise DownloadError(
                    f"{url}: the download exceeded the limit of {max_bytes} bytes; raise "
                    "download.max_download_bytes if this file is expected to be that big"
                )
            if len(head) < _SNIFF_BYTES:
                head += chunk[: _SNIFF_BYTES - len(head)]
                if len(head) >= _SNIFF_BYTES and _looks_like_html(head):
                    raise _html_error(url)
            digest.update(chunk)
            out.write(chunk)
            bar.update(len(chunk))
    if len(head) < _SNIFF_BYTES and _looks_like_html(head):  # short bodies never hit the in-loop check
        raise _html_error(url)
    if length is not None and total != length:
        raise DownloadError(
            f"{url}: the connection closed after {total} of {length} bytes; check your network and retry"
        )
    if sha256 is not None:
        actual = digest.hexdigest()
        if actual != sha256.strip().lower():
            raise ChecksumError(f"{label} (from {url})", sha256.strip().lower(), actual)
