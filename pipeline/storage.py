"""Local paths and object-storage URLs (`s3://bucket/prefix`) as one kind of location.

A location is read (`read_text`, `read_json`, `open_read`), listed, asked whether something
exists and how big it is, and written so that nothing ever sits under a final name or key until
it is complete: a local file through `fsutil.atomic_path` (a temporary file renamed), an object
in one PUT or one multipart upload, which S3 shows only once it is completed. S3 has no rename,
so a file too big to write in memory is built in a local temporary folder and uploaded
(`Location.staged`).

URLs go through fsspec (the `s3` extra: fsspec and s3fs); the base install needs neither.
`storage_options` are fsspec's (for S3: s3fs's, e.g. `{"endpoint_url": ...}`, `{"anon": true}`);
the endpoint and credentials also come from the usual AWS variables (`AWS_ENDPOINT_URL`,
`AWS_ACCESS_KEY_ID`, ...). A URL must never pass through `pathlib.Path`, which turns
`s3://b/x` into `s3:/b/x`.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from pipeline.errors import PipelineError
from pipeline.fsutil import atomic_write_text

__all__ = [
    "PART_BYTES",
    "SCHEMES",
    "Folder",
    "Location",
    "S3Prefix",
    "exists",
    "is_url",
    "join",
    "manifest_file",
    "open_location",
    "open_read",
    "parent",
    "read_json",
    "read_text",
]

# Parts of a multipart upload: S3 takes at most 10000 parts of 5 MiB .. 5 GiB each.
PART_BYTES = 64 * 2**20
# What goes through fsspec; other URLs (`pipe:`, `http://`) stay webdataset's.
SCHEMES = ("s3://",)
Options = Mapping[str, Any] | None


def is_url(location: str) -> bool:
    """An object-storage URL (`s3://bucket/key`): read and written through fsspec."""
    return location.startswith(SCHEMES)


def join(location: str, rel: str) -> str:
    """`rel` (with `/`) under a folder or URL prefix."""
    if is_url(location):
        return f"{location.rstrip('/')}/{rel}"
    return os.path.join(location, rel)


def parent(location: str) -> str:
    """The folder or URL prefix that holds `location`."""
    if is_url(location):
        return location.rstrip("/").rsplit("/", 1)[0]
    return os.path.dirname(location) or "."


def manifest_file(location: str) -> str:
    """A shard set's manifest: `location` itself when it names a `.json` file (or a local
    file), else `manifest.json` in it."""
    if is_url(location):
        return location if location.endswith(".json") else join(location, "manifest.json")
    return join(location, "manifest.json") if os.path.isdir(location) else location


def exists(location: str, options: Options = None) -> bool:
    """Whether a file or object is at a path or URL (asked of the server, not a cache)."""
    if not is_url(location):
        return os.path.exists(location)
    fs, path = _filesystem(location, options)
    fs.invalidate_cache(path)
    return fs.exists(path)


def _filesystem(url: str, options: Options) -> tuple[Any, str]:
    """(fsspec filesystem, its path of `url`); a clear error when the s3 extra is missing."""
    try:
        import fsspec

        return fsspec.core.url_to_fs(url, **dict(options or {}))
    except ImportError as exc:
        raise PipelineError(
            f"{url}: object storage needs the s3 extra ({exc}); pip install 'stereotok[s3]'"
        ) from None


class _ObjectStream(io.RawIOBase):
    """An object's bytes, read by ranged GETs, whose failed transfers raise OSError like a
    file's (s3fs lets aiohttp's and botocore's own errors through once its retries are out)."""

    def __init__(self, file: IO[bytes], url: str) -> None:
        import aiohttp
        import botocore.exceptions

        self._file, self._url = file, url
        self._transfer = (aiohttp.ClientError, botocore.exceptions.BotoCoreError)

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        try:
            return self._file.read(size)
        except self._transfer as exc:
            raise ConnectionError(f"{self._url}: {type(exc).__name__}: {exc}") from exc

    def close(self) -> None:
        self._file.close()
        super().close()


def open_read(location: str, options: Options = None) -> IO[bytes]:
    """A binary stream of a path or URL (an object's: by ranged GETs); a missing one raises
    FileNotFoundError, a failed read OSError."""
    if not is_url(location):
        return open(location, "rb")
    fs, path = _filesystem(location, options)
    return _ObjectStream(fs.open(path, "rb"), location)  # type: ignore[return-value]


def read_text(location: str, options: Options = None) -> str:
    """The UTF-8 text of a path or URL; a missing one raises FileNotFoundError."""
    with open_read(location, options) as f:
        return f.read().decode("utf-8")


def read_json(location: str, what: str, options: Options = None) -> dict[str, Any]:
    """The JSON object at a path or URL, with `records.load_json`'s errors."""
    try:
        return json.loads(read_text(location, options))
    except FileNotFoundError:
        raise PipelineError(f"{location}: no {what} here; check the path") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PipelineError(f"{location}: not a valid {what} ({exc}); re-create it") from None


class Location:
    """A folder or URL prefix that a shard set is written under; names are relative, with `/`."""

    def __init__(self, base: str) -> None:
        self.base = base

    def __str__(self) -> str:
        return self.base

    def url(self, rel: str) -> str:
        return join(self.base, rel)

    def read_json(self, rel: str, what: str) -> dict[str, Any]:
        raise NotImplementedError

    def size(self, rel: str) -> int | None:
        """Bytes of `rel`, None when it does not exist."""
        raise NotImplementedError

    def exists(self, rel: str) -> bool:
        return self.size(rel) is not None

    def glob(self, pattern: str) -> list[str]:
        """The names matching `pattern` (`*/*.tar`), sorted."""
        raise NotImplementedError

    def put_text(self, rel: str, text: str) -> None:
        """Write `rel` whole: a reader sees the old content or the new, never a part."""
        raise NotImplementedError

    def staged(self, rel: str) -> contextlib.AbstractContextManager[Path]:
        """A local path to build `rel` at with `fsutil.atomic_path` (or a `ShardWriter`); it
        is under `rel` once the block ends without an error, and nothing is otherwise."""
        raise NotImplementedError

    def remove_partial(self, rel: str) -> None:
        """Remove what an interrupted write of `rel` left (invisible to readers)."""
        raise NotImplementedError


class Folder(Location):
    """A local folder: files are written beside their final name and renamed."""

    def read_json(self, rel: str, what: str) -> dict[str, Any]:
        return read_json(self.url(rel), what)

    def size(self, rel: str) -> int | None:
        try:
            return os.stat(self.url(rel)).st_size
        except FileNotFoundError:
            return None

    def glob(self, pattern: str) -> list[str]:
        root = Path(self.base)
        return sorted(p.relative_to(root).as_posix() for p in root.glob(pattern))

    def put_text(self, rel: str, text: str) -> None:
        atomic_write_text(Path(self.url(rel)), text)

    @contextlib.contextmanager
    def staged(self, rel: str) -> Iterator[Path]:
        yield Path(self.url(rel))  # atomic_path renames it into place

    def remove_partial(self, rel: str) -> None:
        """The temporary files of `fsutil.atomic_path` (`.NAME.XXXX.tmp`) beside `rel`."""
        final = Path(self.url(rel))
        for tmp in final.parent.glob(f".{final.name}.*.tmp"):
            tmp.unlink(missing_ok=True)


class S3Prefix(Location):
    """Objects under a URL prefix. Every question goes to the server (s3fs's listing cache is
    dropped first), so a re-run sees what an earlier process wrote."""

    def __init__(self, base: str, options: Options = None, part_bytes: int = PART_BYTES) -> None:
        super().__init__(base.rstrip("/"))
        self.options = dict(options or {})
        self.fs, self.root = _filesystem(self.base, self.options)
        self.part_bytes = part_bytes

    def _path(self, rel: str) -> str:
        return f"{self.root.rstrip('/')}/{rel}"

    def read_json(self, rel: str, what: str) -> dict[str, Any]:
        return read_json(self.url(rel), what, self.options)

    def size(self, rel: str) -> int | None:
        path = self._path(rel)
        self.fs.invalidate_cache(path)
        try:
            info = self.fs.info(path)
        except FileNotFoundError:
            return None
        return int(info["size"]) if info["type"] == "file" else None

    def glob(self, pattern: str) -> list[str]:
        self.fs.invalidate_cache(self.root)
        found = self.fs.glob(self._path(pattern))
        return sorted(p.removeprefix(self.root.rstrip("/") + "/") for p in found)

    def put_text(self, rel: str, text: str) -> None:
        """One PUT: S3 stores an object whole or not at all."""
        self.fs.pipe_file(self._path(rel), text.encode("utf-8"))

    def put_file(self, rel: str, local: Path) -> None:
        """Upload a local file: one PUT, or a multipart upload of `part_bytes` parts for one of
        two parts or more; either appears under `rel` only when complete."""
        self.fs.put_file(str(local), self._path(rel), chunksize=self.part_bytes)

    @contextlib.contextmanager
    def staged(self, rel: str) -> Iterator[Path]:
        with tempfile.TemporaryDirectory(prefix="stereotok-upload.") as tmp:
            local = Path(tmp) / rel.rsplit("/", 1)[-1]
            yield local
            self.put_file(rel, local)

    def remove_partial(self, rel: str) -> None:
        """Abort the unfinished multipart uploads of `rel` (a killed upload leaves its parts
        stored, and billed, until aborted)."""
        bucket, key, _ = self.fs.split_path(self._path(rel))
        listed = self.fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=key)
        for upload in listed.get("Uploads", []):
            if upload["Key"] == key:
                self.fs.call_s3(
                    "abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload["UploadId"]
                )


def open_location(base: str | os.PathLike, options: Options = None) -> Location:
    """The Location of a folder (path) or URL prefix; `options` apply to URLs."""
    base = os.fspath(base)
    return S3Prefix(base, options) if is_url(base) else Folder(base)
