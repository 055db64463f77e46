"""Fetching one published file into a local folder: atomic, resumable, verified, with a progress bar.

Standard library only (urllib). The file is written to `NAME.part` beside its destination and renamed into
place only once it is complete and its SHA-256 is one of the accepted ones, so a destination file is
always whole. An interrupted transfer (timeout, dropped connection) keeps `NAME.part` and the validator the
server gave (`NAME.part.json`: URL, ETag / Last-Modified, expected size); the next call asks for the rest
with an HTTP Range request, guarded by If-Range, so a file changed on the server in between is fetched
again from byte 0. A finished file that fails its hash is deleted, `.part` included: nothing left behind
is ever taken for the file. Every failure is one `UserError` line (a CLI exits 2 on it).

Environment: PAGODA_TIMEOUT (seconds of silence before a connection counts as stalled, default 60).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import sys
import urllib.error
import urllib.request
from email.utils import formatdate
from pathlib import Path

from pagoda.errors import UserError

CHUNK = 1 << 20
USER_AGENT = "pagoda (https://github.com/sony/pagoda evaluation toolkit)"


def timeout_s() -> float:
    """Seconds a read may wait for the server (PAGODA_TIMEOUT, default 60); UserError on a bad value."""
    text = os.environ.get("PAGODA_TIMEOUT", "60")
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 86_400:  # NaN and inf too: a socket timeout must be a finite number of seconds
        raise UserError(f"PAGODA_TIMEOUT={text!r} is not a number of seconds in (0, 86400]: set e.g. "
                        "PAGODA_TIMEOUT=60")
    return value


def update_sha256(h, path: str | os.PathLike):
    """Feed a file's bytes (1 MiB chunks) into the hashlib object `h`; returns h. The project's one file-hashing
    loop (pagoda.weights.sha256_file caches its digests)."""
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h


def _read_meta(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _clear(*paths: Path) -> None:
    for p in paths:
        p.unlink(missing_ok=True)


def _total_of(resp, start: int) -> int | None:
    """The whole file's size from Content-Range (a 206) or Content-Length (a 200), None when not said."""
    rng = resp.headers.get("Content-Range", "")
    if "/" in rng and rng.rsplit("/", 1)[1].strip().isdigit():
        return int(rng.rsplit("/", 1)[1])
    length = resp.headers.get("Content-Length")
    return start + int(length) if length and length.isdigit() else None


def _linked_sha256(headers) -> str | None:
    """The SHA-256 a Hugging Face LFS file's response names (X-Linked-ETag), when it names one."""
    tag = (headers.get("X-Linked-ETag") or "").strip().removeprefix("W/").strip('"').lower()
    return tag if len(tag) == 64 and all(c in "0123456789abcdef" for c in tag) else None


class _LinkedHashRedirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects as urllib does, keeping the X-Linked-ETag of a redirect (Hugging Face names the LFS
    file's SHA-256 on its 302 to the storage host, whose final response does not repeat it)."""

    linked: str | None = None

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        self.linked = _linked_sha256(headers) or self.linked
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def download(url: str, dest: Path, *, sha256: tuple[str, ...] = (), what: str = "file",
             before_rename=None) -> str:
    """Fetch `url` to `dest` (resuming `dest.part` when the server allows); returns the file's SHA-256.

    sha256: accepted digests (hex); when given, any other content is refused and deleted. A response (or a
    redirect on the way) that names its own SHA-256 (Hugging Face's X-Linked-ETag) is checked against it too.
    before_rename(digest): called once the file is complete and checked, before it takes its name (a record
    written there never lags the file). `url` may be http(s):// or file://. UserError (one line) on HTTP
    errors, unreachable hosts, stalls, truncation and hash mismatch.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part, meta_path = dest.with_name(dest.name + ".part"), dest.with_name(dest.name + ".part.json")
    meta = _read_meta(meta_path)
    # resume a partial file of the same URL, or of any URL when the server's validator can guard the range (If-Range)
    resumable = part.exists() and (meta.get("url") == url or bool(meta.get("validator")))
    start = part.stat().st_size if resumable else 0
    if start == 0:
        _clear(part, meta_path)
    redirects = _LinkedHashRedirects()
    resp = _open(url, start, meta, redirects, dest, what, (part, meta_path))
    with resp:
        if start and (getattr(resp, "status", 200) or 200) != 206:  # the range was ignored (or the file changed)
            start = 0
        total = _total_of(resp, start)
        validator = resp.headers.get("ETag") or resp.headers.get("Last-Modified")
        if validator and validator.startswith("W/"):
            validator = None  # a weak validator cannot guard a byte range
        meta_path.write_text(json.dumps({"url": url, "validator": validator, "size": total}))
        linked = _linked_sha256(resp.headers) or redirects.linked
        h, done = _receive(resp, part, start, total, url, dest, what)
    if total is not None and done != total:
        raise UserError(f"{what}: {url} ended after {done} of {total} bytes (truncated): {_again(dest)}")
    digest = h.hexdigest()
    for expected, source in ((sha256, "the pinned SHA-256"), ((linked,) if linked else (), "the SHA-256 the server "
                                                                                            "names (X-Linked-ETag)")):
        if expected and digest not in expected:
            _clear(part, meta_path)
            raise UserError(f"{what}: the file from {url} has SHA-256 {digest[:16]}..., not {source} "
                            f"{expected[0][:16]}...: it was deleted; check the address (and PAGODA_MIRROR) and "
                            "rerun, or report the changed file")
    if before_rename is not None:
        before_rename(digest)
    os.replace(part, dest)
    _clear(meta_path)
    return digest


def _again(dest: Path) -> str:
    return f"rerun to resume the download, or copy the file to {dest} by hand"


def _open(url: str, start: int, meta: dict, redirects, dest: Path, what: str, partial: tuple[Path, Path]):
    """The response to a GET of `url` from byte `start` (Range, guarded by If-Range with the kept validator);
    UserError on HTTP errors and unreachable hosts (a refused range deletes the partial files)."""
    headers = {"User-Agent": USER_AGENT, **({"Range": f"bytes={start}-"} if start else {}),
               **({"If-Range": meta["validator"]} if start and meta.get("validator") else {})}
    try:
        return urllib.request.build_opener(redirects).open(urllib.request.Request(url, headers=headers),
                                                           timeout=timeout_s())
    except urllib.error.HTTPError as e:
        if e.code == 416 and start:  # the range starts at or past the end: the partial file is unusable
            _clear(*partial)
            raise UserError(f"{what}: the server refused to resume {url} (HTTP 416): the partial file was "
                            "deleted; rerun to fetch it from the start") from None
        raise UserError(f"{what}: {url} answered HTTP {e.code} {e.reason}: check the address (and PAGODA_MIRROR), "
                        f"or copy the file to {dest} by hand") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise UserError(f"{what}: cannot reach {url} ({reason}): check the network (or set PAGODA_MIRROR to a "
                        f"reachable copy), or copy the file to {dest} by hand") from None


def _receive(resp, part: Path, start: int, total: int | None, url: str, dest: Path, what: str):
    """(SHA-256 state of the whole file, bytes it holds): the body appended to `part` (written afresh when start
    is 0), hashed on the way, with a progress bar; UserError on a stall or a broken transfer."""
    from tqdm import tqdm
    h = update_sha256(hashlib.sha256(), part) if start else hashlib.sha256()
    bar = tqdm(total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
               desc=dest.name[-40:], disable=None)
    done = start
    try:
        with open(part, "ab" if start else "wb") as f:
            while chunk := resp.read(CHUNK):
                f.write(chunk)
                h.update(chunk)
                done += len(chunk)
                bar.update(len(chunk))
    except TimeoutError:
        raise UserError(f"{what}: {url} stalled (no data for {timeout_s():g} s, PAGODA_TIMEOUT) after "
                        f"{done} bytes: {_again(dest)}") from None
    except (OSError, http.client.HTTPException) as e:  # connection reset, IncompleteRead
        raise UserError(f"{what}: the transfer of {url} broke after {done} bytes ({type(e).__name__}): "
                        f"{_again(dest)}") from None
    finally:
        bar.close()
    return h, done


def copy_verified(src: Path, dest: Path, *, sha256: tuple[str, ...] = (), what: str = "file",
                  before_rename=None) -> str:
    """Copy a file of a mirror folder to `dest` atomically, refusing one whose SHA-256 is not accepted."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    shutil.copyfile(src, part)
    digest = update_sha256(hashlib.sha256(), part).hexdigest()
    if sha256 and digest not in sha256:
        _clear(part)
        raise UserError(f"{what}: the mirror's copy {src} has SHA-256 {digest[:16]}..., not the pinned "
                        f"{sha256[0][:16]}...: replace it with the official file")
    if before_rename is not None:
        before_rename(digest)
    os.replace(part, dest)
    return digest


def record_first_use(path: Path, digest: str, source: str) -> Path:
    """Write `NAME.sha256` beside a file fetched without a published hash (trust on first use): its digest, where
    it came from and when. Later uses compare the file against it."""
    record = path.with_name(path.name + ".sha256")
    tmp = record.with_name(record.name + ".tmp")
    tmp.write_text(f"{digest}  {path.name}\n# first use: fetched from {source} on {formatdate(usegmt=True)}\n")
    os.replace(tmp, record)
    return record


def recorded_sha256(path: Path) -> str | None:
    """The digest recorded at a file's first download (`NAME.sha256`), None when there is no record."""
    record = path.with_name(path.name + ".sha256")
    try:
        first = record.read_text().split()
    except OSError:
        return None
    return first[0].lower() if first and len(first[0]) == 64 else None
