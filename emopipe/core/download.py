"""Getting remote dataset files: one URL into memory (with retries), one archive onto disk
(resumable, sha256-verified), and safe extraction of zip/tar archives.

Standard library only (urllib, zipfile, tarfile): `requests` is not a declared dependency, and
urllib covers what is needed here (Range requests, timeouts, redirect control).
"""

from __future__ import annotations

import io
import logging
import os
import random
import re
import shutil
import ssl
import stat
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from http.client import HTTPException
from pathlib import Path
from typing import BinaryIO

from emopipe.errors import UserError
from emopipe.fingerprint import sha256_file
from emopipe.progress import Progress

USER_AGENT = "emopipe/0.1 (affective-image dataset ingest; urllib)"
HTTP_SCHEMES = ("http", "https")
MAX_FETCH_BYTES = 64 << 20  # one image (catalog key max_image_bytes); above this a URL or file is too_large
DOWNLOAD_PREFIX = ".download-"  # fetch_to_file's files: .download-<pid>-<random>
BACKOFF = 0.5  # seconds before the first retry, doubled for each further one
MAX_BACKOFF = 30.0
CHUNK = 1 << 20

log = logging.getLogger(__name__)


class SourceError(UserError):
    """A dataset-level mistake (missing folder, bad CSV header, checksum mismatch, unsafe archive);
    the message names the file, URL or field."""


class DownloadInterrupted(Exception):
    """A transient failure (server down, connection lost) after every retry; what arrived is kept
    and the next try resumes from it. Not a UserError: Dagster's run retries apply."""


class FetchFailed(Exception):
    """One URL could not be fetched; `reason` is a short code (http_404, timeout...), `detail` says more."""

    def __init__(self, reason: str, detail: str, retryable: bool = False, retry_after: float | None = None):
        super().__init__(detail)
        self.reason, self.detail, self.retryable, self.retry_after = reason, detail, retryable, retry_after


# What a request can raise: urllib.error.URLError and TimeoutError are OSErrors, http.client's
# IncompleteRead an HTTPException, a malformed URL a ValueError.
NETWORK_ERRORS = (FetchFailed, OSError, HTTPException, ValueError)


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """urllib also follows redirects to ftp://; only http(s) may be reached."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urllib.parse.urlsplit(newurl).scheme not in HTTP_SCHEMES:
            raise urllib.error.HTTPError(newurl, code, f"redirect to a non-http(s) URL {newurl}", headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_opener = urllib.request.build_opener(_HttpOnlyRedirects)


def is_http_url(value: str) -> bool:
    parts = urllib.parse.urlsplit(value)
    return parts.scheme in HTTP_SCHEMES and bool(parts.netloc)


def _request(url: str, offset: int = 0) -> urllib.request.Request:
    # Percent-encode spaces and non-ASCII characters (URL lists hold them); existing %XX stay as they are.
    quoted = urllib.parse.quote(url, safe="%/:=&?~#+!$,;'@()*[]")
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    return urllib.request.Request(quoted, headers=headers)


def _failure(url: str, error: Exception) -> FetchFailed:
    """Classify an exception from urllib/http.client; 5xx, 429, timeouts and dropped connections retry."""
    if isinstance(error, FetchFailed):
        return error
    if isinstance(error, urllib.error.HTTPError):
        error.close()
        code = error.code
        retry_after = error.headers.get("Retry-After") if error.headers else None
        wait = float(retry_after) if retry_after and retry_after.strip().isdigit() else None
        reason = "http_404" if code == 404 else "http_error"
        return FetchFailed(reason, f"{url}: HTTP {code} {error.reason}", retryable=code >= 500 or code == 429, retry_after=wait)
    cause = error.reason if isinstance(error, urllib.error.URLError) else error
    if isinstance(cause, TimeoutError):
        return FetchFailed("timeout", f"{url}: timed out", retryable=True)
    if isinstance(cause, ssl.SSLCertVerificationError):
        return FetchFailed("ssl_error", f"{url}: {cause}")
    if isinstance(error, ValueError):  # http.client.InvalidURL and malformed URLs
        return FetchFailed("bad_url", f"{url}: {error}")
    return FetchFailed("connection_error", f"{url}: {type(cause).__name__}: {cause}", retryable=True)


def _sleep_before_retry(failure: FetchFailed, attempt: int) -> None:
    delay = failure.retry_after if failure.retry_after is not None else BACKOFF * 2**attempt * random.uniform(0.75, 1.25)
    time.sleep(min(delay, MAX_BACKOFF))


def fetch_bytes(url: str, timeout: float = 30.0, retries: int = 3, max_bytes: int = MAX_FETCH_BYTES) -> bytes:
    """GET one URL into memory (a small file: a URL list, a checksum); see fetch_to_file."""
    buffer = io.BytesIO()
    _fetch_into(buffer, url, timeout, retries, max_bytes)
    return buffer.getvalue()


def fetch_to_file(url: str, folder: Path, timeout: float = 30.0, retries: int = 3, max_bytes: int = MAX_FETCH_BYTES) -> Path:
    """GET one URL into a new file in `folder` (the caller owns it), so memory stays flat whatever the
    response's size; FetchFailed after `retries` retries with exponential backoff, the file removed.

    `timeout` bounds the whole response, not only each socket read, so a server that trickles
    bytes cannot hold a worker forever; more than `max_bytes` fails as too_large as soon as it arrives.
    """
    folder.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=folder, prefix=f"{DOWNLOAD_PREFIX}{os.getpid()}-")
    try:
        with os.fdopen(fd, "wb") as f:
            _fetch_into(f, url, timeout, retries, max_bytes)
    except BaseException:
        os.unlink(name)
        raise
    return Path(name)


def remove_stale_downloads(folder: Path) -> None:
    """Delete what fetch_to_file left in `folder` for processes that no longer run (a killed ingest)."""
    for path in folder.glob(f"{DOWNLOAD_PREFIX}*"):
        pid = path.name[len(DOWNLOAD_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not _process_exists(int(pid)):
            path.unlink(missing_ok=True)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _fetch_into(sink: BinaryIO, url: str, timeout: float, retries: int, max_bytes: int) -> None:
    attempt = 0
    while True:
        sink.seek(0)
        sink.truncate()
        try:
            return _get(sink, url, timeout, max_bytes)
        except NETWORK_ERRORS as e:
            failure = _failure(url, e)
            if not failure.retryable or attempt == retries:
                raise failure from None
            _sleep_before_retry(failure, attempt)
            attempt += 1


def _get(sink: BinaryIO, url: str, timeout: float, max_bytes: int) -> None:
    deadline = time.monotonic() + timeout
    with _opener.open(_request(url), timeout=timeout) as response:
        length = response.headers.get("Content-Length")
        expected = int(length) if length and length.isdigit() else None
        if expected is not None and expected > max_bytes:
            raise FetchFailed("too_large", f"{url}: {expected} bytes, over the limit of {max_bytes}")
        n = 0
        while chunk := response.read1(CHUNK):  # read1: whatever has arrived, so the deadline is checked
            n += len(chunk)
            if n > max_bytes:
                raise FetchFailed("too_large", f"{url}: more than {max_bytes} bytes, over the limit")
            sink.write(chunk)
            if time.monotonic() > deadline:
                raise FetchFailed("timeout", f"{url}: response not complete after {timeout:g} s", retryable=True)
        # http.client returns b"" instead of raising when the connection closes early.
        if expected is not None and n < expected:
            raise FetchFailed("connection_error", f"{url}: connection closed after {n} of {expected} bytes", retryable=True)


def download_file(url: str, dest: Path, sha256: str | None = None, timeout: float = 60.0, retries: int = 5) -> None:
    """Download `url` to `dest`, verified by sha256 when one is given, resuming the `dest.part` an earlier try left.

    Dropped connections resume with an HTTP Range request (a server that ignores Range sends the
    whole file, which restarts the .part). `retries` counts consecutive failures without progress.
    A file whose hash differs is moved to `dest.sha256-mismatch` and a SourceError raised.
    """
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    failures = 0
    while True:
        offset = part.stat().st_size if part.exists() else 0
        try:
            _download_to_part(url, part, offset, timeout)
            break
        except NETWORK_ERRORS as e:
            failure = _failure(url, e)
            if part.exists() and part.stat().st_size > offset:
                failures = 0
            if not failure.retryable:
                part.unlink(missing_ok=True)
                raise SourceError(f"{url}: download failed: {failure.detail}; check the dataset's url in the catalog") from None
            if failures >= retries:
                kept = part.stat().st_size if part.exists() else 0
                raise DownloadInterrupted(f"{url}: download failed after {retries} retries: {failure.detail} "
                                          f"({kept} bytes kept in {part}; the next try resumes from there)") from None
            _sleep_before_retry(failure, failures)
            failures += 1
    actual = sha256_file(part) if sha256 else None
    if sha256 and actual != sha256.lower():
        bad = dest.with_name(dest.name + ".sha256-mismatch")
        os.replace(part, bad)
        raise SourceError(
            f"{url}: sha256 mismatch: expected {sha256.lower()}, got {actual}; the download was moved aside to {bad} "
            "and not used (check the dataset's url and sha256 in the catalog)"
        )
    os.replace(part, dest)
    log.info("downloaded %s (%d bytes%s)", url, dest.stat().st_size, ", sha256 verified" if sha256 else "")


def _download_to_part(url: str, part: Path, offset: int, timeout: float) -> None:
    try:
        response = _opener.open(_request(url, offset), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # nothing left after offset: the .part holds the whole file
            e.close()
            return
        raise
    with response:
        if response.status == 206:
            start = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
            if not start or int(start.group(1)) != offset:
                part.unlink()
                raise FetchFailed("http_error", f"{url}: asked for bytes {offset}- but got {response.headers.get('Content-Range')!r}; restarting", retryable=True)
            mode = "ab"
        else:  # 200: the server ignored Range and sends the whole file
            if offset:
                log.info("%s: the server ignored the Range request; restarting the download", url)
            mode, offset = "wb", 0
        length = response.headers.get("Content-Length")
        expected = int(length) if length and length.isdigit() else None
        received = 0
        total_mb = -(-(offset + expected) // 2**20) if expected is not None else 0  # 0: no bar, the size is unknown
        with open(part, mode) as f, Progress(f"{url}: download", total_mb, "MB", log.info) as progress:
            progress.advance(offset >> 20)
            while chunk := response.read(CHUNK):
                f.write(chunk)
                before = offset + received
                received += len(chunk)
                progress.advance(((offset + received) >> 20) - (before >> 20))
        if expected is not None and received < expected:
            raise FetchFailed("connection_error", f"{url}: connection closed after {offset + received} bytes", retryable=True)


def extract_archive(archive: Path, dest: Path, name: str) -> None:
    """Unpack a zip or a tar (plain, gz, bz2, xz) into the empty folder `dest`.

    The whole archive is refused (SourceError naming `name` and the member) when a member has an
    absolute path or a '..' component, or a link resolves outside `dest`.
    """
    with open(archive, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK"):
        _extract_zip(archive, dest, name)
    else:
        try:
            with tarfile.open(archive, "r:*") as tar:
                _extract_tar(tar, dest, name)
        except tarfile.ReadError:
            raise SourceError(f"{name}: not a zip or tar archive (starts with {head!r})") from None
    for link in (p for p in dest.rglob("*") if p.is_symlink()):
        if not _inside(dest, Path(os.path.realpath(link))):
            raise SourceError(f"{name}: member {link.relative_to(dest)} links to {os.readlink(link)}, outside the archive; refusing the archive")


def _inside(root: Path, path: Path) -> bool:
    return Path(os.path.realpath(root)) in (path, *path.parents)


def _member_parts(member: str, archive_name: str) -> list[str]:
    """A member path's components, refusing absolute paths and '..'."""
    clean = member.replace("\\", "/")
    if clean.startswith("/") or re.match(r"[A-Za-z]:", clean):
        raise SourceError(f"{archive_name}: member {member!r} has an absolute path; refusing the archive")
    parts = [p for p in clean.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise SourceError(f"{archive_name}: member {member!r} climbs out of the folder with '..'; refusing the archive")
    return parts


def _check_space(dest: Path, total: int, archive_name: str) -> None:
    free = shutil.disk_usage(dest).free
    if total > free:
        raise SourceError(f"{archive_name}: unpacks to {total >> 20} MB but only {free >> 20} MB are free under {dest}")


def _extract_zip(archive: Path, dest: Path, name: str) -> None:
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            links = []
            for info in infos:
                _member_parts(info.filename, name)
                if stat.S_ISLNK(info.external_attr >> 16):
                    target = zf.read(info).decode()
                    if target.startswith("/"):
                        raise SourceError(f"{name}: member {info.filename!r} is a link to the absolute path {target}; refusing the archive")
                    links.append((info.filename, target))
            _check_space(dest, sum(i.file_size for i in infos), name)
            for info in infos:
                if not stat.S_ISLNK(info.external_attr >> 16):
                    try:
                        zf.extract(info, dest)
                    except (zipfile.BadZipFile, NotImplementedError, RuntimeError, OSError, EOFError) as e:
                        # a damaged or encrypted member, or one compressed in a method Python lacks
                        raise SourceError(f"{name}: member {info.filename!r} cannot be extracted: {e}; refusing the archive") from None
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as e:
        raise SourceError(f"{name}: damaged zip archive: {e}") from None
    # zipfile would write links as small text files; made after the files so no extraction passes
    # through one, then checked by extract_archive like tar's.
    for member, target in links:
        link = dest.joinpath(*_member_parts(member, name))
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, link)


def _extract_tar(tar: tarfile.TarFile, dest: Path, name: str) -> None:
    members = tar.getmembers()
    for m in members:
        _member_parts(m.name, name)
        if m.issym() and m.linkname.startswith("/"):
            raise SourceError(f"{name}: member {m.name!r} is a link to the absolute path {m.linkname}; refusing the archive")
        if m.islnk():
            _member_parts(m.linkname, name)
    _check_space(dest, sum(m.size for m in members if m.isfile()), name)
    for m in members:
        try:
            # The 'data' filter is the second line of defence: it resolves links as extracted. A folder's
            # own mode is not applied (as extractall defers it), so a read-only folder still takes its files.
            tar.extract(m, dest, set_attrs=not m.isdir(), filter="data")
        except tarfile.FilterError as e:
            raise SourceError(f"{name}: member {m.name!r} is unsafe: {e}; refusing the archive") from None
        except KeyError:  # tarfile's way of saying a hard link's target is not in the archive
            raise SourceError(f"{name}: member {m.name!r} is a hard link to {m.linkname!r}, which the archive does not hold; "
                              "refusing the archive") from None
        except (tarfile.TarError, OSError, EOFError) as e:
            raise SourceError(f"{name}: member {m.name!r} cannot be extracted: {e}; refusing the archive") from None
