"""First-use downloads (pagoda.download, pagoda.weights.fetch) against a loopback publisher.

The server listens on 127.0.0.1 only and plays every publisher through PAGODA_PUBLISHER_BASE: a spec's
`https://host/path` becomes `http://127.0.0.1:PORT/MODE/host/path`, where MODE picks the server's behaviour
(good, truncated, stall, 404). Nothing here reaches any other address.
"""

import hashlib
import http.server
import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from pagoda.errors import UserError, run_cli
from pagoda.weights import WeightsSpec, resolve_weights, verify

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB, distinct bytes at every offset
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


class Publisher(http.server.BaseHTTPRequestHandler):
    """GET /MODE/...: `good` serves PAYLOAD with Range support and an ETag; `truncated` promises all of it and
    closes after half; `stall` sends half then goes silent; `404` has nothing; `linked` names a wrong SHA-256 in
    X-Linked-ETag (as Hugging Face names the LFS hash); `hf` / `hf-wrong` redirect to `good` with the right /
    a wrong X-Linked-ETag on the 302, as Hugging Face does."""

    requests: list = []
    files: dict = {}  # path -> bytes served by `good` instead of PAYLOAD (the end-to-end test)

    def log_message(self, *args):
        pass

    def do_GET(self):
        mode, _, rest = self.path.lstrip("/").partition("/")
        type(self).requests.append((self.path, self.headers.get("Range"), self.headers.get("If-Range")))
        body = type(self).files.get("/" + rest, PAYLOAD)
        if mode == "404":
            self.send_error(404, "Not Found")
            return
        if mode in ("hf", "hf-wrong"):  # Hugging Face: a 302 naming the LFS SHA-256, the storage host has the bytes
            self.send_response(302)
            self.send_header("Location", f"/good/{rest}")
            self.send_header("X-Linked-ETag", '"%s"' % (PAYLOAD_SHA if mode == "hf" else "1" * 64))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        start = 0
        rng = self.headers.get("Range")
        if mode == "good" and rng and self.headers.get("If-Range") in (None, '"v1"'):
            start = int(rng.removeprefix("bytes=").split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.send_header("ETag", '"v1"')
        if mode == "linked":
            self.send_header("X-Linked-ETag", '"' + "0" * 64 + '"')
        self.end_headers()
        if mode == "truncated":
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if mode == "stall":
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            time.sleep(3)
            return
        self.wfile.write(body[start:])


@pytest.fixture()
def publisher(monkeypatch, tmp_path):
    """(base URL, request log) of a loopback publisher; network allowed for this test, cache in tmp_path."""
    Publisher.requests, Publisher.files = [], {}
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Publisher)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.delenv("PAGODA_OFFLINE", raising=False)
    monkeypatch.delenv("PAGODA_MIRROR", raising=False)
    monkeypatch.setenv("PAGODA_WEIGHTS", str(tmp_path / "cache"))
    monkeypatch.setenv("PAGODA_TIMEOUT", "1")
    monkeypatch.chdir(tmp_path)  # no ./weights folder is searched
    yield base, Publisher.requests
    server.shutdown()
    server.server_close()


def spec(pinned: bool = True, name: str = "thing.bin") -> WeightsSpec:
    return WeightsSpec(key="thing", files=(name,), url=f"https://example.org/files/{name}",
                       sha256=(PAYLOAD_SHA,) if pinned else (), what="test file",
                       pin_source="the test's payload" if pinned else "")


def use(monkeypatch, base: str, mode: str) -> None:
    monkeypatch.setenv("PAGODA_PUBLISHER_BASE", f"{base}/{mode}")


def cache_files(tmp_path: Path) -> list[str]:
    folder = tmp_path / "cache"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_good_pinned_file_is_fetched_once(publisher, monkeypatch, tmp_path):
    base, log = publisher
    use(monkeypatch, base, "good")
    path = resolve_weights(spec())
    assert path == tmp_path / "cache" / "thing.bin" and path.read_bytes() == PAYLOAD
    assert log[0][0] == "/good/example.org/files/thing.bin"  # the publisher's own path, on the loopback server
    assert verify(path, spec()) == (PAYLOAD_SHA, "pinned")
    assert cache_files(tmp_path) == ["thing.bin"]  # no .part, no record: the pin is the record
    resolve_weights(spec())
    assert len(log) == 1  # a second use touches no network


def test_unpinned_file_is_trusted_on_first_use_and_a_change_refused(publisher, monkeypatch, tmp_path):
    base, _ = publisher
    use(monkeypatch, base, "good")
    path = resolve_weights(spec(pinned=False))
    assert cache_files(tmp_path) == ["thing.bin", "thing.bin.sha256"]
    assert (tmp_path / "cache" / "thing.bin.sha256").read_text().split()[0] == PAYLOAD_SHA
    assert verify(path, spec(pinned=False)) == (PAYLOAD_SHA, "first use")
    path.write_bytes(PAYLOAD[:-1] + b"\x00")  # changed in place afterwards
    with pytest.raises(UserError, match="changed since its first download"):
        verify(path, spec(pinned=False))
    hand = tmp_path / "cache" / "other.bin"  # put in place by hand: nothing to check it against
    hand.write_bytes(b"x")
    assert verify(hand, spec(pinned=False, name="other.bin"))[1] == "unverified"


def test_truncated_download_fails_in_one_line_and_resumes(publisher, monkeypatch, tmp_path):
    base, log = publisher
    use(monkeypatch, base, "truncated")
    with pytest.raises(UserError) as e:
        resolve_weights(spec())
    assert "rerun to resume" in str(e.value) and "\n" not in str(e.value)
    assert "thing.bin" not in cache_files(tmp_path)  # nothing a later run would trust
    part = tmp_path / "cache" / "thing.bin.part"
    assert part.stat().st_size == len(PAYLOAD) // 2
    use(monkeypatch, base, "good")
    path = resolve_weights(spec())
    assert path.read_bytes() == PAYLOAD
    assert log[-1][1] == f"bytes={len(PAYLOAD) // 2}-" and log[-1][2] == '"v1"'  # asked for the rest only
    assert cache_files(tmp_path) == ["thing.bin"]


def test_changed_file_on_the_server_restarts_from_zero(publisher, monkeypatch, tmp_path):
    base, log = publisher
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "thing.bin.part").write_bytes(b"stale bytes of an older version")
    (cache / "thing.bin.part.json").write_text(json.dumps({"url": f"{base}/good/example.org/files/thing.bin",
                                                           "validator": '"v0"'}))
    use(monkeypatch, base, "good")
    assert resolve_weights(spec()).read_bytes() == PAYLOAD  # If-Range "v0" != "v1": the server sent it whole
    assert log[-1][2] == '"v0"'


def test_wrong_hash_is_deleted(publisher, monkeypatch, tmp_path):
    base, _ = publisher
    use(monkeypatch, base, "good")
    wrong = WeightsSpec(key="thing", files=("thing.bin",), url="https://example.org/files/thing.bin",
                        sha256=("f" * 64,), what="test", pin_source="test")
    with pytest.raises(UserError, match="not the pinned SHA-256 ffffffffffffffff"):
        resolve_weights(wrong)
    assert cache_files(tmp_path) == []
    use(monkeypatch, base, "linked")  # unpinned, but the server names another SHA-256 than what it sent
    with pytest.raises(UserError, match="X-Linked-ETag"):
        resolve_weights(spec(pinned=False))
    assert cache_files(tmp_path) == []
    use(monkeypatch, base, "hf-wrong")  # the same, named on the redirect to the storage host
    with pytest.raises(UserError, match="X-Linked-ETag"):
        resolve_weights(spec(pinned=False))
    assert cache_files(tmp_path) == []
    use(monkeypatch, base, "hf")
    assert resolve_weights(spec(pinned=False)).read_bytes() == PAYLOAD
    assert cache_files(tmp_path) == ["thing.bin", "thing.bin.sha256"]


def test_404_and_stall_and_unreachable(publisher, monkeypatch, tmp_path):
    base, _ = publisher
    use(monkeypatch, base, "404")
    with pytest.raises(UserError, match="HTTP 404"):
        resolve_weights(spec())
    assert cache_files(tmp_path) == []
    use(monkeypatch, base, "stall")
    with pytest.raises(UserError, match="stalled .* PAGODA_TIMEOUT"):
        resolve_weights(spec())
    assert "thing.bin" not in cache_files(tmp_path)
    closed = socket.socket()  # a port nobody listens on
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    monkeypatch.setenv("PAGODA_PUBLISHER_BASE", f"http://127.0.0.1:{port}")
    with pytest.raises(UserError, match="cannot reach"):
        resolve_weights(spec(name="other.bin"))


def test_offline_names_file_hash_and_destination(publisher, monkeypatch, tmp_path):
    base, log = publisher
    use(monkeypatch, base, "good")
    monkeypatch.setenv("PAGODA_OFFLINE", "1")
    with pytest.raises(UserError) as e:
        resolve_weights(spec())
    msg = str(e.value)
    assert "PAGODA_OFFLINE=1" in msg and PAYLOAD_SHA in msg and str(tmp_path / "cache" / "thing.bin") in msg
    assert log == []  # not one request


def test_mirror_url_and_mirror_folder(publisher, monkeypatch, tmp_path):
    base, log = publisher
    monkeypatch.setenv("PAGODA_PUBLISHER_BASE", "http://127.0.0.1:9/never")  # the publisher is not asked
    monkeypatch.setenv("PAGODA_MIRROR", f"{base}/good/mirror")
    assert resolve_weights(spec()).read_bytes() == PAYLOAD
    assert [r[0] for r in log] == ["/good/mirror/thing.bin"]
    folder = tmp_path / "mirror"
    folder.mkdir()
    (folder / "other.bin").write_bytes(PAYLOAD)
    monkeypatch.setenv("PAGODA_MIRROR", str(folder))
    monkeypatch.setenv("PAGODA_OFFLINE", "1")  # a mirror folder needs no network
    path = resolve_weights(spec(name="other.bin"))
    assert path.read_bytes() == PAYLOAD and len(log) == 1
    (folder / "bad.bin").write_bytes(b"not it")
    with pytest.raises(UserError, match="mirror's copy"):
        resolve_weights(spec(name="bad.bin"))
    assert "bad.bin" not in cache_files(tmp_path) and "bad.bin.part" not in cache_files(tmp_path)


def test_weights_dir_still_wins_and_receives_the_download(publisher, monkeypatch, tmp_path):
    base, log = publisher
    use(monkeypatch, base, "good")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thing.bin").write_bytes(PAYLOAD)
    assert resolve_weights(spec(), mine) == mine / "thing.bin" and log == []
    other = tmp_path / "other"
    assert resolve_weights(spec(), other) == other / "thing.bin" and len(log) == 1


def test_cli_exits_2_in_one_line(publisher, monkeypatch, tmp_path, capsys):
    """A named reference that cannot be fetched: eval.fid stops before any extraction, exit 2, one line."""
    from eval import fid

    base, _ = publisher
    use(monkeypatch, base, "404")
    code = run_cli(fid.main, ["--images", str(tmp_path), "--ref", "imagenet64", "-o", str(tmp_path / "r.jsonl")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and lines[0].startswith("fetching imagenet64") and len(lines) == 2  # what it fetches, then why not
    assert lines[1].startswith("error:") and "HTTP 404" in lines[1] and "VIRTUAL_imagenet64_labeled.npz" in lines[1]
    assert not (tmp_path / "r.jsonl").exists() and not os.listdir(tmp_path / "cache")


def test_named_reference_and_weights_fetched_verified_cached_then_offline(publisher, monkeypatch, tmp_path,
                                                                        inception_weights, real_images, capsys):
    """`eval.fid --images samples.npz --ref imagenet64` on a machine without the files: the Inception weights and
    the ADM batch come from the (loopback) publisher, are checked and cached, and the FID is measured; a second
    run, offline, fetches nothing and gives the same row."""
    import dataclasses

    import numpy as np

    from eval import fid
    from eval.catalog import NAMED
    from eval.extractors import get_extractor
    from pagoda import weights

    base, log = publisher
    use(monkeypatch, base, "good")
    test_pin = hashlib.sha256(inception_weights.read_bytes()).hexdigest()  # the test publisher's own Inception
    monkeypatch.setitem(weights.SPECS, "inception", dataclasses.replace(weights.INCEPTION, sha256=(test_pin,)))
    ex = get_extractor("inception", weights_dir=inception_weights.parent)
    feats = ex(real_images[24:])["features"].double().numpy()
    ref = tmp_path / "ref.npz"
    images = real_images.permute(0, 2, 3, 1).numpy()
    np.savez(ref, arr_0=images[24:], mu=feats.mean(0), sigma=np.cov(feats, rowvar=False))
    url_path = lambda url: "/" + url.split("://", 1)[1]  # noqa: E731
    Publisher.files = {url_path(weights.INCEPTION.url): inception_weights.read_bytes(),
                       url_path(NAMED["imagenet64"].spec.url): ref.read_bytes()}
    samples = tmp_path / "samples.npz"
    np.savez(samples, arr_0=images[:24])
    argv = ["--images", str(samples), "--ref", "imagenet64", "--allow-small", "-o", str(tmp_path / "rows.jsonl")]
    assert run_cli(fid.main, argv) == 0
    assert len(log) == 2
    assert cache_files(tmp_path) == sorted([weights.INCEPTION.files[0], "VIRTUAL_imagenet64_labeled.npz",
                                            "VIRTUAL_imagenet64_labeled.npz.sha256"])  # the ref: trusted on first use
    monkeypatch.setenv("PAGODA_OFFLINE", "1")
    assert run_cli(fid.main, argv) == 0
    assert len(log) == 2  # the second run touched no network
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert rows[0]["value"] == rows[1]["value"] > 0 and rows[0]["reference"] == "imagenet64"
    assert rows[0]["extra"]["weights_trust"] == "pinned" and rows[0]["extra"]["reference_trust"] == "first use"
    from eval.stats import load_reference
    assert rows[0]["extra"]["reference_sha256"] == load_reference(ref).stats_sha256()  # of its numbers
    cached = tmp_path / "cache" / "VIRTUAL_imagenet64_labeled.npz"
    np.savez(cached, arr_0=images[24:], mu=feats.mean(0) + 0.5, sigma=np.cov(feats, rowvar=False))  # still an npz
    assert run_cli(fid.main, argv) == 2  # a reference changed since its first download is refused
    assert "changed since its first download" in capsys.readouterr().err


def test_damaged_named_reference_says_how_to_fetch_it_again(publisher, monkeypatch, tmp_path, capsys):
    """A publisher that served a damaged file (whole, as far as HTTP can tell) got it trusted on first use: the
    reference's reader refuses it, and the message says to delete it and its record to fetch it again."""
    from eval import fid
    from eval.catalog import NAMED

    base, _ = publisher
    use(monkeypatch, base, "good")
    Publisher.files = {"/" + NAMED["imagenet128"].spec.url.split("://", 1)[1]: b"PK\x03\x04 not really a zip"}
    code = run_cli(fid.main, ["--images", str(tmp_path), "--ref", "imagenet128", "-o", str(tmp_path / "r.jsonl")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "VIRTUAL_imagenet128_labeled.npz.sha256 and rerun to fetch it again" in err


def test_bad_timeout_and_mirror_folder(publisher, monkeypatch, tmp_path):
    base, _ = publisher
    use(monkeypatch, base, "good")
    for bad in ("inf", "nan", "0", "1e300", "abc"):
        monkeypatch.setenv("PAGODA_TIMEOUT", bad)
        with pytest.raises(UserError, match="PAGODA_TIMEOUT"):
            resolve_weights(spec())
    monkeypatch.setenv("PAGODA_TIMEOUT", "1")
    monkeypatch.setenv("PAGODA_MIRROR", str(tmp_path / "no-such-folder"))
    with pytest.raises(UserError, match="is not a folder"):
        resolve_weights(spec())
