"""Filesystems from URIs: fsspec (and pyarrow) filesystems, storage options, atomic writes.

Every path in the project is a URI that fsspec understands (``s3://bucket/key``, ``gs://...``,
``memory://...``, a local path). Storage options come from the configuration and, for S3, from
the standard AWS variables; the configuration wins. Nothing here ever logs an option value: use
:func:`pipelines.common.redaction.redact` before anything reaches a log, an exception message or
MLflow. URI spelling (join, absolute, local or not) is `pipelines.common.uris`.
"""

from __future__ import annotations

import io
import os
import posixpath
import uuid
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlparse

import fsspec
import pyarrow as pa

from pipelines.common.errors import InputError
from pipelines.common.redaction import scrub
from pipelines.common.uris import is_local, protocol_of

TEMP_PREFIX = ".tmp-"  # write_atomically's in-progress files (never listed as inputs)

# s3fs option names that carry identity; config-given credentials replace env ones as a group.
_S3_CREDENTIAL_OPTIONS = {"key", "secret", "token", "anon", "profile", "session"}
_OBJECT_STORE_PROTOCOLS = {"s3", "s3a", "gs", "gcs", "abfs", "az", "adl", "oss"}


class StorageError(InputError, RuntimeError):
    """A storage location cannot be used (missing bucket, no access). Never contains secrets."""


def storage_options_from_env(protocol: str = "s3") -> dict[str, Any]:
    """s3fs options from the standard AWS variables; empty for other protocols.

    Only what is set is returned, so botocore's normal chain (instance roles, ~/.aws, web
    identity) still applies to everything else. Credentials are included when set so that they
    travel to Ray workers that do not share the driver's environment.
    """
    if protocol not in ("s3", "s3a"):
        return {}
    env = os.environ
    options: dict[str, Any] = {}
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if endpoint:
        options["endpoint_url"] = endpoint
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if region:
        options["client_kwargs"] = {"region_name": region}
    for option, variable in (
        ("key", "AWS_ACCESS_KEY_ID"),
        ("secret", "AWS_SECRET_ACCESS_KEY"),
        ("token", "AWS_SESSION_TOKEN"),
    ):
        if env.get(variable):
            options[option] = env[variable]
    return options


def merge_storage_options(
    env_options: Mapping[str, Any] | None, config_options: Mapping[str, Any] | None
) -> dict[str, Any]:
    """Config-given options over env ones. ``client_kwargs``/``config_kwargs`` merge key by key;
    credentials are a group: config credentials (or ``anon``/``profile``) drop all env ones, so a
    config key is never paired with an env session token."""
    env_options = dict(env_options or {})
    config_options = dict(config_options or {})
    if _S3_CREDENTIAL_OPTIONS & config_options.keys():
        for name in _S3_CREDENTIAL_OPTIONS:
            env_options.pop(name, None)
    merged = {**env_options, **config_options}
    for nested in ("client_kwargs", "config_kwargs"):
        if nested in env_options and nested in config_options:
            merged[nested] = {**env_options[nested], **config_options[nested]}
    return merged


def resolve_storage_options(uri: str, storage_options: Mapping[str, Any] | None = None) -> dict:
    """The options :func:`get_fs` uses for ``uri``: env options for its protocol, then config."""
    return merge_storage_options(storage_options_from_env(protocol_of(uri)), storage_options)


def get_fs(uri: str, storage_options: Mapping[str, Any] | None = None):
    """``(fsspec filesystem, path inside it)`` for ``uri``, with env + config storage options.

    fsspec caches filesystem instances by their options, so calling this per file is cheap.
    """
    options = resolve_storage_options(uri, storage_options)
    return fsspec.core.url_to_fs(str(uri), **options)


def uri_for(fs, path: str, like: str) -> str:
    """The URI of ``path`` in ``fs``, spelled like ``like`` (plain absolute paths stay plain)."""
    if is_local(like):
        return path if "://" not in str(like) else fs.unstrip_protocol(path)
    return fs.unstrip_protocol(path)


def make_parent_dirs(fs, path: str, uri: str) -> None:
    """Creates the parent directory of ``path`` where directories exist (not on object stores,
    where s3fs' makedirs would create a missing bucket instead of failing)."""
    parent = posixpath.dirname(path)
    if parent and protocol_of(uri) not in _OBJECT_STORE_PROTOCOLS:
        fs.makedirs(parent, exist_ok=True)


def write_atomically(uri: str, data: bytes, storage_options: Mapping[str, Any] | None = None) -> None:
    """Readers see the whole file or none of it: one PUT on object stores (objects appear whole);
    elsewhere a hidden temp file in the same directory renamed over the target."""
    fs, path = get_fs(uri, storage_options)
    make_parent_dirs(fs, path, uri)
    if not is_local(uri):
        fs.pipe_file(path, data)
        return
    directory = posixpath.dirname(path)
    # A short temp name: a legal 255-byte file name plus a suffix would not be.
    temp = posixpath.join(directory, f"{TEMP_PREFIX}{uuid.uuid4().hex}")
    try:
        with open(temp, "wb") as f:
            f.write(data)
        os.replace(temp, path)
    finally:
        if os.path.exists(temp):
            os.remove(temp)


def check_access(
    uri: str, storage_options: Mapping[str, Any] | None = None, must_exist: bool = False
) -> None:
    """Fails fast, with one clear :class:`StorageError`, when ``uri`` cannot be used.

    Object stores: the bucket must exist and be readable with the given credentials (and, with
    ``must_exist``, the object/prefix itself). Local paths: ``must_exist`` checks the path, else
    the nearest existing parent must be a writable directory. The message names the URI and the
    cause, never a credential.
    """
    options = resolve_storage_options(uri, storage_options)
    try:
        fs, path = fsspec.core.url_to_fs(str(uri), **options)
        if protocol_of(uri) in _OBJECT_STORE_PROTOCOLS:
            bucket = path.split("/", 1)[0]
            fs.info(bucket)  # head_bucket: missing bucket / wrong credentials
            if must_exist and not fs.exists(path):
                raise FileNotFoundError(path)
        elif must_exist:
            fs.info(path)
        elif is_local(uri):
            _check_local_writable(path)
    except StorageError:
        raise
    except FileNotFoundError:
        what = "does not exist" if must_exist else "the bucket (or parent path) does not exist"
        raise StorageError(f"cannot use {uri}: {what}") from None
    except PermissionError:
        raise StorageError(
            f"cannot use {uri}: access denied (check the credentials and endpoint in the storage "
            "options or the AWS_* variables)"
        ) from None
    except Exception as err:  # noqa: BLE001 - any client error becomes one clear message
        reason = scrub(f"{type(err).__name__}: {err}", options)
        raise StorageError(f"cannot use {uri}: {reason}") from None


def _check_local_writable(path: str) -> None:
    parent = path
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent or "."):
        raise StorageError(f"cannot use {path}: {parent} is not a directory")
    if not os.access(parent or ".", os.W_OK):
        raise StorageError(f"cannot use {path}: {parent} is not writable")


# --------------------------------------------------------------------------- pyarrow


def pyarrow_filesystem(uri: str, storage_options: Mapping[str, Any] | None = None):
    """``(pyarrow.fs.FileSystem, path)`` for ``uri`` (e.g. for Ray Train's ``storage_filesystem``).

    S3 uses pyarrow's native ``S3FileSystem`` (``endpoint_override`` + ``scheme`` from an
    ``endpoint_url``); options it cannot express, and other protocols, go through
    ``PyFileSystem(FSSpecHandler(fs))``; local paths use ``LocalFileSystem``.
    """
    import pyarrow.fs as pafs

    options = resolve_storage_options(uri, storage_options)
    fs, path = fsspec.core.url_to_fs(str(uri), **options)
    if is_local(uri):
        return pafs.LocalFileSystem(), path
    if protocol_of(uri) in ("s3", "s3a"):
        native = _native_s3_kwargs(options)
        if native is not None:
            return pafs.S3FileSystem(**native), path
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def _native_s3_kwargs(options: Mapping[str, Any]) -> dict[str, Any] | None:
    """pyarrow ``S3FileSystem`` arguments equivalent to s3fs ``options``, or None if some option
    has no equivalent."""
    options = dict(options)
    kwargs: dict[str, Any] = {}
    for s3fs_name, arrow_name in (("key", "access_key"), ("secret", "secret_key"),
                                  ("token", "session_token")):
        if options.get(s3fs_name):
            kwargs[arrow_name] = options.pop(s3fs_name)
        else:
            options.pop(s3fs_name, None)
    if options.pop("anon", False):
        kwargs["anonymous"] = True
    endpoint = options.pop("endpoint_url", None)
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc + parsed.path.rstrip("/")
        kwargs["scheme"] = parsed.scheme or "https"
    client_kwargs = dict(options.pop("client_kwargs", {}) or {})
    region = client_kwargs.pop("region_name", None)
    if region:
        kwargs["region"] = region
    if options or client_kwargs:
        return None
    return kwargs


# --------------------------------------------------------------------------- tables


def table_format(uri: str) -> str:
    """``parquet``, ``csv`` or ``jsonl`` from the file extension."""
    name = str(uri).lower()
    for suffix, fmt in ((".parquet", "parquet"), (".pq", "parquet"), (".csv", "csv"),
                        (".jsonl", "jsonl"), (".ndjson", "jsonl"), (".json", "jsonl")):
        if name.endswith(suffix):
            return fmt
    raise ValueError(f"{uri}: unknown table format; use .parquet, .csv or .jsonl")


def read_table(
    uri: str,
    storage_options: Mapping[str, Any] | None = None,
    string_columns: tuple[str, ...] = (),
) -> pa.Table:
    """Reads a parquet/CSV/JSONL table; ``string_columns`` are read as strings in CSV (so ids such
    as ``007`` keep their zeros) and cast to strings otherwise. Empty CSV cells read as null."""
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson
    import pyarrow.parquet as pq

    fmt = table_format(uri)
    fs, path = get_fs(uri, storage_options)
    with fs.open(path, "rb") as f:
        if fmt == "parquet":
            table = pq.read_table(f)
        elif fmt == "csv":
            convert = pacsv.ConvertOptions(
                column_types={c: pa.string() for c in string_columns},
                strings_can_be_null=True,
            )
            table = pacsv.read_csv(f, convert_options=convert)
        else:
            table = pajson.read_json(io.BytesIO(f.read()))
    for name in string_columns:
        if name in table.column_names and table.schema.field(name).type != pa.string():
            index = table.column_names.index(name)
            table = table.set_column(index, name, table.column(name).cast(pa.string()))
    return table


def write_table(table: pa.Table, uri: str, storage_options: Mapping[str, Any] | None = None) -> str:
    """Writes ``table`` as parquet/CSV/JSONL (by extension), creating parent directories."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    fmt = table_format(uri)
    fs, path = get_fs(uri, storage_options)
    make_parent_dirs(fs, path, uri)
    with fs.open(path, "wb") as f:
        if fmt == "parquet":
            pq.write_table(table, f)
        elif fmt == "csv":
            pacsv.write_csv(table, f)
        else:
            f.write(_to_jsonl(table).encode())
    return str(uri)


def _to_jsonl(table: pa.Table) -> str:
    import json

    return "".join(json.dumps(row) + "\n" for row in table.to_pylist())
