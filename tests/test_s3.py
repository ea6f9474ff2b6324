"""Object storage: the loader, verify and the write side against a real S3 server (moto's
standalone server, started here as its own process on 127.0.0.1), reached through a TCP proxy
where a test needs a connection cut or stalled."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("s3fs", reason="the s3 extra (s3fs) is not installed")
pytest.importorskip("moto.server", reason="moto[server] is not installed")

import contextlib

import s3fs
from conftest import SHARD_OPTIONS
from test_data import _module, _same, _take

import pipeline.shard as shard_mod
from pipeline import storage
from pipeline.cli import main
from pipeline.errors import PipelineError
from pipeline.records import Manifest
from pipeline.shard import write_shards
from pipeline.tario import ShardWriter
from pipeline.verify import verify
from trainer.data.shards import ReadPolicy, ShardSplit

BUCKET = "stereotok-test"
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=1).close()
    except OSError:
        return False
    return True


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server on a free port, with dummy credentials in the environment."""
    port = _free_port()
    with pytest.MonkeyPatch.context() as env:
        for name, value in CREDENTIALS.items():
            env.setenv(name, value)
        server = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        endpoint = f"http://127.0.0.1:{port}"
        try:
            while not _answers(endpoint):
                if server.poll() is not None:
                    pytest.fail(f"moto.server exited with status {server.returncode}")
            fs = s3fs.S3FileSystem(endpoint_url=endpoint)
            fs.mkdir(BUCKET)
            yield endpoint
        finally:
            server.kill()
            server.wait()


def _fs(endpoint: str) -> s3fs.S3FileSystem:
    return s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)


@pytest.fixture(scope="session")
def s3_set(s3_endpoint, shard_dir) -> str:
    """The fixture shard set, uploaded file by file."""
    fs = _fs(s3_endpoint)
    for path in sorted(shard_dir.rglob("*")):
        if path.is_file():
            fs.put_file(str(path), f"{BUCKET}/set/{path.relative_to(shard_dir).as_posix()}")
    return f"s3://{BUCKET}/set"


class _Proxy:
    """A TCP proxy to `target` on 127.0.0.1 (one connection per request: moto's server closes
    each). `cut_reply_after`: the connection whose reply body carries that byte of all reply
    bodies is closed there, once; `stall_request_after`: requests stop being forwarded after
    that many bytes in all (`stalled` is set then)."""

    def __init__(
        self,
        target: str,
        cut_reply_after: int | None = None,
        stall_request_after: int | None = None,
    ) -> None:
        self.target = int(target.rsplit(":", 1)[1])
        self.cut, self.stall = cut_reply_after, stall_request_after
        self.connections, self.sent_up, self.sent_down, self.cuts = 0, 0, 0, 0
        self.stalled, self.closing = threading.Event(), threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closing.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self.connections += 1
            threading.Thread(target=self._up, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._down, args=(upstream, client), daemon=True).start()

    def _up(self, client: socket.socket, upstream: socket.socket) -> None:
        while data := _recv(client):
            with self.lock:
                room = None if self.stall is None else self.stall - self.sent_up
                data = data if room is None else data[: max(room, 0)]
                self.sent_up += len(data)
            if data:
                upstream.sendall(data)
            if room is not None and self.sent_up >= self.stall:
                self.stalled.set()
                self.closing.wait()
                return
        _close(client, upstream)

    def _down(self, upstream: socket.socket, client: socket.socket) -> None:
        head = b""  # the reply's status line and headers, until they end
        while data := _recv(upstream):
            body = data
            if head is not None:
                head += data
                end = head.find(b"\r\n\r\n")
                body = b"" if end < 0 else head[end + 4 :]
                head = head if end < 0 else None
            keep = len(data)
            with self.lock:
                inside = self.cut is not None and self.sent_down < self.cut < self.sent_down + len(
                    body
                )
                if inside and not self.cuts:  # the cut is inside this body
                    keep, self.cuts = len(data) - len(body) + self.cut - self.sent_down, 1
                self.sent_down += len(body)
            client.sendall(data[:keep])
            if keep < len(data):
                break
        _close(client, upstream)

    def close(self) -> None:
        self.closing.set()
        self.listener.close()


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(1 << 16)
    except OSError:
        return b""


def _close(*socks: socket.socket) -> None:
    for sock in socks:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()


@pytest.mark.parametrize("name", ["", "/manifest.json"])
def test_an_s3_set_gives_the_batches_of_the_local_set(shard_dir, s3_set, s3_endpoint, name):
    options = {"endpoint_url": s3_endpoint}
    local = _take(_module(shard_dir, num_workers=2).train_dataloader(), 5)
    dm = _module(s3_set + name, num_workers=2, storage_options=options)
    assert dm.url_prefix == s3_set
    assert _same(local, _take(dm.train_dataloader(), 5))
    evaluated = _take(_module(s3_set + name, storage_options=options).val_dataloader(), 3)
    assert _same(_take(_module(shard_dir).val_dataloader(), 3), evaluated)


def test_verify_reads_an_s3_set_and_names_a_flipped_byte(shard_dir, s3_set, s3_endpoint):
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ENDPOINT_URL", s3_endpoint)  # the endpoint from the environment
        assert verify(s3_set, against_source=True, progress=False) == []
        fs = _fs(s3_endpoint)
        info = Manifest.load(shard_dir).shards["train"][0]
        data = bytearray((shard_dir / info.path).read_bytes())
        data[2000] ^= 0x10  # inside the first .npy payload
        fs.cp(f"{BUCKET}/set", f"{BUCKET}/flipped", recursive=True)
        fs.pipe_file(f"{BUCKET}/flipped/{info.path}", bytes(data))
        fs.rm(f"{BUCKET}/flipped/{Manifest.load(shard_dir).shards['val'][0].path}")
        problems = verify(f"s3://{BUCKET}/flipped", against_source=True, progress=False)
    shard = f"s3://{BUCKET}/flipped/{info.path}"
    assert f"{shard}: sha256 or size differs from the manifest; re-run shard" in problems
    assert any(p.startswith(f"{shard}: sample ") and "differs from" in p for p in problems)
    assert sum("missing (the manifest lists it)" in p for p in problems) == 1


def test_a_cut_read_is_read_again_from_the_sample_it_stopped_at(
    shard_dir, s3_set, s3_endpoint, capfd, monkeypatch
):
    info = max(Manifest.load(shard_dir).shards["train"], key=lambda s: s.samples)
    proxy = _Proxy(s3_endpoint, cut_reply_after=info.bytes // 2)
    # one try per request in s3fs and small ranged reads, so the cut reaches the shard reader
    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)
    options = {"endpoint_url": proxy.endpoint, "default_block_size": 8192}
    url = f"{s3_set}/{info.path}"
    try:
        split = ShardSplit([url], [info.samples], 4096, ReadPolicy(backoff_s=0), options)
        read = list(split.chunks([url], 0, want_meta=True))
    finally:
        proxy.close()
    local = ShardSplit([str(shard_dir / info.path)], [info.samples], 4096)
    expected = list(local.chunks([str(shard_dir / info.path)], 0, want_meta=True))
    assert len(read) == len(expected) == info.samples
    assert all((a[0] == b[0]).all() and a[1] == b[1] for a, b in zip(read, expected, strict=True))
    err = capfd.readouterr().err
    resumed = re.findall(r"reading it again from sample (\d+)", err)
    assert len(resumed) == 1 and 0 < int(resumed[0]) < info.samples
    assert proxy.cuts == 1


def _write_shard(out: storage.Location, rel: str, fail: bool = False) -> bytes:
    """Build `rel` with a ShardWriter in `out.staged`; nothing is under `rel` meanwhile."""
    with out.staged(rel) as local:
        with ShardWriter(local) as writer:
            writer.add("k_000000", {".npy": b"x" * 1000, ".json": b"{}"})
            assert not out.exists(rel)
            if fail:
                raise RuntimeError("the shard's job failed")
        return local.read_bytes()


@pytest.mark.parametrize("where", ["folder", "s3"])
def test_a_staged_write_appears_whole_or_not_at_all(tmp_path, s3_endpoint, where):
    base = str(tmp_path / "out") if where == "folder" else f"s3://{BUCKET}/staged"
    options = {"endpoint_url": s3_endpoint}
    out = storage.open_location(base, options)
    data = _write_shard(out, "train/a.tar")
    assert out.size("train/a.tar") == len(data)
    with storage.open_read(out.url("train/a.tar"), options) as f:
        assert f.read() == data
    with pytest.raises(RuntimeError, match="job failed"):
        _write_shard(out, "train/b.tar", fail=True)
    assert not out.exists("train/b.tar")
    out.put_text("x.json", '{"a": 1}\n')
    out.put_text("x.json", '{"a": 2}\n')
    assert out.read_json("x.json", "test record") == {"a": 2}
    assert out.glob("*/*.tar") == ["train/a.tar"]
    if where == "folder":  # no temporary file left beside
        assert sorted(os.listdir(tmp_path / "out" / "train")) == ["a.tar"]
    with pytest.raises(PipelineError, match="no test record here"):
        out.read_json("missing.json", "test record")


_UPLOAD = """
import sys
from pathlib import Path
from pipeline.storage import S3Prefix
S3Prefix(sys.argv[1], {"endpoint_url": sys.argv[2]}, part_bytes=5 * 2**20).put_file(
    "big.tar", Path(sys.argv[3])
)
"""


def test_a_killed_multipart_upload_leaves_no_object(tmp_path, s3_endpoint):
    big = tmp_path / "big.tar"
    big.write_bytes(os.urandom(3 * 5 * 2**20))  # three parts
    proxy = _Proxy(s3_endpoint, stall_request_after=2 * 5 * 2**20)
    base = f"s3://{BUCKET}/killed"
    upload = subprocess.Popen(
        [sys.executable, "-c", _UPLOAD, base, proxy.endpoint, str(big)],
        cwd=Path(__file__).parents[1],
    )
    try:
        assert proxy.stalled.wait(120), "the upload never reached the stall"
        upload.send_signal(signal.SIGKILL)
        assert upload.wait() == -signal.SIGKILL
    finally:
        upload.kill()
        proxy.close()
    out = storage.S3Prefix(base, {"endpoint_url": s3_endpoint})
    assert not out.exists("big.tar") and out.glob("*") == []
    fs = _fs(s3_endpoint)
    pending = fs.call_s3("list_multipart_uploads", Bucket=BUCKET, Prefix="killed/")
    assert [u["Key"] for u in pending.get("Uploads", [])] == ["killed/big.tar"]
    out.remove_partial("big.tar")
    pending = fs.call_s3("list_multipart_uploads", Bucket=BUCKET, Prefix="killed/")
    assert pending.get("Uploads", []) == []


def test_shard_to_s3_writes_the_local_bytes_and_resumes(tree, shard_dir, s3_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    out, fs = f"s3://{BUCKET}/written", _fs(s3_endpoint)
    flags = ["--chunk-frames", str(SHARD_OPTIONS["chunk_frames"]), "--val", "0.3"]
    flags += ["--shard-bytes", "60000", "--seed", "0", "--interleave", "4", "--quiet"]
    assert main(["shard", str(tree.index), "--out", out, "--jobs", "2", *flags]) == 0
    files = sorted(p.relative_to(shard_dir).as_posix() for p in shard_dir.rglob("*") if p.is_file())
    keys = sorted(k.removeprefix(f"{BUCKET}/written/") for k in fs.find(f"{BUCKET}/written"))
    assert keys == files  # shards, journal, config stamp, manifest; nothing else
    assert all(fs.cat_file(f"{BUCKET}/written/{f}") == (shard_dir / f).read_bytes() for f in files)
    lost = Manifest.load(shard_dir).shards["train"][0].path
    fs.rm([f"{BUCKET}/written/{lost}", f"{BUCKET}/written/manifest.json"])
    written: list[str] = []
    real_write = shard_mod._write_shard
    monkeypatch.setattr(
        shard_mod, "_write_shard", lambda job: written.append(job.path) or real_write(job)
    )
    write_shards(tree.index, out, jobs=1, progress=False, **SHARD_OPTIONS)
    assert written == [lost]  # the re-run resumes: only the lost shard is written again
    manifest = fs.cat_file(f"{BUCKET}/written/manifest.json")
    assert manifest == (shard_dir / "manifest.json").read_bytes()
    assert verify(out, progress=False) == []
    with pytest.raises(PipelineError, match=f"{out}: holds a shard set made with another config"):
        write_shards(tree.index, out, progress=False, **{**SHARD_OPTIONS, "seed": 1})
