"""One way to reach files: local paths, ``file://`` and ``s3://`` URIs.

Writes are whole-object: a local file is written under a temporary name in the
same folder and renamed; an S3 object is one PUT. So a reader never sees a
partial file under its final name. Manifests (``manifest.json``) list files
with their sha256 and are written last, so a folder with a verifying manifest
is complete.

S3 settings come from :class:`StorageConfig` or, for every field left empty,
from the standard AWS environment variables (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``). The
config is plain data, so it travels to Ray workers as an argument.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import fsspec

from neon_ray.config import option

MANIFEST = "manifest.json"


class StorageError(OSError):
    """A URI cannot be read or written (missing, unreachable, no credentials)."""


@dataclass
class StorageConfig:
    """Object-storage settings; empty fields fall back to AWS_* variables."""

    endpoint_url: str | None = option(None, "S3 endpoint, e.g. http://127.0.0.1:8333 (AWS_ENDPOINT_URL)")
    region: str | None = option(None, "S3 region (AWS_DEFAULT_REGION)")
    access_key: str | None = option(None, "S3 access key id (AWS_ACCESS_KEY_ID)")
    secret_key: str | None = option(None, "S3 secret key (AWS_SECRET_ACCESS_KEY)")
    connect_timeout: float = option(5.0, "seconds to wait for an S3 connection", min=0.1)
    retries: int = option(3, "S3 request attempts before giving up", min=1)

    def resolved(self) -> "StorageConfig":
        env = os.environ.get
        return StorageConfig(
            endpoint_url=self.endpoint_url or env("AWS_ENDPOINT_URL") or env("AWS_ENDPOINT_URL_S3"),
            region=self.region or env("AWS_DEFAULT_REGION") or env("AWS_REGION"),
            access_key=self.access_key or env("AWS_ACCESS_KEY_ID"),
            secret_key=self.secret_key or env("AWS_SECRET_ACCESS_KEY"),
            connect_timeout=self.connect_timeout, retries=self.retries)


def is_s3(uri: str) -> bool:
    return str(uri).startswith(("s3://", "s3a://"))


def _local_path(uri: str) -> str:
    uri = str(uri)
    return uri[len("file://"):] if uri.startswith("file://") else uri


def absolute(uri: str) -> str:
    """``uri`` with a local relative path made absolute (Ray workers run in other folders)."""
    if uri is None or is_s3(uri):
        return uri
    return ("file://" if str(uri).startswith("file://") else "") + os.path.abspath(_local_path(uri))


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI (``/``-separated for every scheme)."""
    out = str(uri).rstrip("/")
    for p in parts:
        out = f"{out}/{str(p).strip('/')}"
    return out


def parent(uri: str) -> str:
    return str(uri).rstrip("/").rsplit("/", 1)[0]


def filesystem(uri: str, storage: StorageConfig | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """An fsspec filesystem and the path inside it for ``uri``."""
    if not is_s3(uri):
        return fsspec.filesystem("file"), os.path.abspath(_local_path(uri))
    s = (storage or StorageConfig()).resolved()
    import s3fs  # imported here: local-only users never pay for botocore

    if s.region:
        os.environ.setdefault("AWS_DEFAULT_REGION", s.region)
    fs = s3fs.S3FileSystem(
        key=s.access_key, secret=s.secret_key, skip_instance_cache=True,
        client_kwargs={"endpoint_url": s.endpoint_url} if s.endpoint_url else {},
        config_kwargs={"connect_timeout": s.connect_timeout, "read_timeout": 60,
                       "retries": {"max_attempts": s.retries, "mode": "standard"}})
    return fs, str(uri).split("://", 1)[1]


def pyarrow_filesystem(uri: str, storage: StorageConfig | None = None):
    """A ``pyarrow.fs.FileSystem`` and path for ``uri`` (for pyarrow and Ray Data)."""
    import pyarrow.fs as pafs

    if not is_s3(uri):
        return pafs.LocalFileSystem(), os.path.abspath(_local_path(uri))
    s = (storage or StorageConfig()).resolved()
    kwargs: dict[str, Any] = {"access_key": s.access_key, "secret_key": s.secret_key,
                              "connect_timeout": s.connect_timeout, "request_timeout": 60.0}
    if s.endpoint_url:
        scheme, host = s.endpoint_url.split("://", 1) if "://" in s.endpoint_url else ("https", s.endpoint_url)
        kwargs.update(endpoint_override=host, scheme=scheme)
    if s.region:
        kwargs["region"] = s.region
    return pafs.S3FileSystem(**kwargs), str(uri).split("://", 1)[1]


def _wrap(uri: str, exc: BaseException) -> StorageError:
    name = type(exc).__name__
    if name in ("NoCredentialsError", "PartialCredentialsError"):
        return StorageError(f"{uri}: no S3 credentials (set storage.access_key/secret_key "
                            f"or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)")
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError",
                "ConnectionRefusedError", "ConnectError"):
        return StorageError(f"{uri}: S3 endpoint unreachable ({exc})")
    return StorageError(f"{uri}: {name}: {exc}".splitlines()[0])


def exists(uri: str, storage: StorageConfig | None = None) -> bool:
    fs, path = filesystem(uri, storage)
    try:
        return fs.exists(path)
    except (OSError, ValueError) as e:
        raise _wrap(uri, e) from None
    except Exception as e:  # botocore raises its own hierarchy, not OSError
        if type(e).__module__.startswith(("botocore", "aiobotocore")):
            raise _wrap(uri, e) from None
        raise


def read_bytes(uri: str, storage: StorageConfig | None = None) -> bytes:
    fs, path = filesystem(uri, storage)
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{uri}: not found") from None
    except OSError as e:
        raise _wrap(uri, e) from None


def write_bytes(uri: str, data: bytes, storage: StorageConfig | None = None) -> None:
    """Write ``data`` whole: temp file + rename locally, a single PUT on S3."""
    fs, path = filesystem(uri, storage)
    if not is_s3(uri):
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix="-" + os.path.basename(path))
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return
    try:
        fs.pipe_file(path, data)
    except Exception as e:
        if isinstance(e, OSError) or type(e).__module__.startswith(("botocore", "aiobotocore")):
            raise _wrap(uri, e) from None
        raise


def upload_file(local_path: str, uri: str, storage: StorageConfig | None = None) -> None:
    """Copy a local file to ``uri`` whole (rename locally, one upload on S3)."""
    if not is_s3(uri):
        with open(local_path, "rb") as f:
            write_bytes(uri, f.read())
        return
    fs, path = filesystem(uri, storage)
    try:
        fs.put_file(local_path, path)
    except Exception as e:
        if isinstance(e, OSError) or type(e).__module__.startswith(("botocore", "aiobotocore")):
            raise _wrap(uri, e) from None
        raise


def read_json(uri: str, storage: StorageConfig | None = None) -> Any:
    return json.loads(read_bytes(uri, storage))


def write_json(uri: str, obj: Any, storage: StorageConfig | None = None) -> None:
    write_bytes(uri, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode(), storage)


def listdir(uri: str, storage: StorageConfig | None = None) -> list[str]:
    """Names (not paths) directly under ``uri``; empty when it does not exist."""
    fs, path = filesystem(uri, storage)
    try:
        if not fs.exists(path):
            return []
        return sorted(os.path.basename(p.rstrip("/")) for p in fs.ls(path, detail=False)
                      if p.rstrip("/") != path.rstrip("/"))
    except OSError as e:
        raise _wrap(uri, e) from None


def remove(uri: str, storage: StorageConfig | None = None) -> None:
    fs, path = filesystem(uri, storage)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def local_copy(uri: str, storage: StorageConfig | None = None) -> tuple[str, bool]:
    """A local path holding ``uri``'s bytes, and whether it is a temp file to delete."""
    if not is_s3(uri):
        path = _local_path(uri)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{uri}: not found")
        return path, False
    fs, path = filesystem(uri, storage)
    fd, tmp = tempfile.mkstemp(prefix="neon-ray-", suffix="-" + os.path.basename(path))
    os.close(fd)
    try:
        fs.get_file(path, tmp)
    except FileNotFoundError:
        os.unlink(tmp)
        raise FileNotFoundError(f"{uri}: not found") from None
    return tmp, True


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_uri(uri: str, storage: StorageConfig | None = None, chunk: int = 8 << 20) -> str:
    fs, path = filesystem(uri, storage)
    h = hashlib.sha256()
    try:
        with fs.open(path, "rb", block_size=chunk) as f:
            for block in iter(lambda: f.read(chunk), b""):
                h.update(block)
    except FileNotFoundError:
        raise FileNotFoundError(f"{uri}: not found") from None
    return h.hexdigest()


def check_writable(uri: str, storage: StorageConfig | None = None) -> None:
    """Fail early, with one line, when ``uri`` cannot be written."""
    probe = join(uri, f".write-probe-{uuid.uuid4().hex}")
    try:
        write_bytes(probe, b"", storage)
        remove(probe, storage)
    except PermissionError:
        raise StorageError(f"{uri}: not writable (permission denied)") from None
    except StorageError as e:
        raise StorageError(str(e).replace(probe, uri)) from None
    except OSError as e:
        raise StorageError(f"{uri}: not writable ({e})") from None


def write_manifest(folder: str, files: list[str] | dict[str, str], extra: dict[str, Any],
                   storage: StorageConfig | None = None) -> dict[str, Any]:
    """Write ``folder/manifest.json`` listing ``files`` (names in ``folder``).

    ``files`` is a list of names (hashed here) or a ``{name: sha256}`` mapping
    of digests already known. Call it last: the manifest marks completeness.
    """
    if isinstance(files, dict):
        digests = dict(files)
    else:
        digests = {name: sha256_uri(join(folder, name), storage) for name in files}
    manifest = dict(extra)
    manifest["files"] = {name: {"sha256": d} for name, d in sorted(digests.items())}
    write_json(join(folder, MANIFEST), manifest, storage)
    return manifest


def read_manifest(folder: str, storage: StorageConfig | None = None) -> dict[str, Any] | None:
    """The folder's manifest, or None when there is none."""
    uri = join(folder, MANIFEST)
    try:
        return read_json(uri, storage)
    except FileNotFoundError:
        return None


def verify_manifest(folder: str, storage: StorageConfig | None = None) -> dict[str, Any] | None:
    """The manifest when it exists and every listed file hashes as recorded, else None."""
    manifest = read_manifest(folder, storage)
    if manifest is None:
        return None
    for name, entry in manifest.get("files", {}).items():
        try:
            if sha256_uri(join(folder, name), storage) != entry["sha256"]:
                return None
        except FileNotFoundError:
            return None
    return manifest


def manifest_digest(manifest: dict[str, Any]) -> str:
    """A digest of a manifest's file list: names a stage output by its content."""
    files = manifest.get("files", {})
    blob = json.dumps({k: v["sha256"] for k, v in sorted(files.items())}, sort_keys=True)
    return sha256_bytes(blob.encode())


def iter_files(uri: str, suffix: str = "", storage: StorageConfig | None = None) -> Iterator[str]:
    """Full URIs of the files directly under ``uri`` whose names end in ``suffix``."""
    for name in listdir(uri, storage):
        if name.endswith(suffix) and not name.startswith(".tmp-"):
            yield join(uri, name)


def ensure_local_dir(uri: str) -> None:
    if not is_s3(uri):
        Path(_local_path(uri)).mkdir(parents=True, exist_ok=True)
