"""Storage against the session's moto endpoint (a real HTTP S3 server on loopback): endpoints
from the environment, fail-fast access checks, pyarrow filesystems, table round trips.
"""

from __future__ import annotations

import uuid

import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from pipelines.data.storage import (
    StorageError,
    check_access,
    get_fs,
    pyarrow_filesystem,
    read_table,
    write_table,
)


def test_get_fs_resolves_protocols(tmp_path, s3_options, s3_bucket):
    fs, path = get_fs(str(tmp_path / "a.txt"))
    assert fs.protocol[0] in ("file", "local") and path == str(tmp_path / "a.txt")
    fs, path = get_fs("memory://x/y.txt")
    assert "memory" in fs.protocol and path.endswith("x/y.txt")
    fs, path = get_fs(f"{s3_bucket}/k/v.bin", s3_options)
    assert "s3" in fs.protocol and path == f"{s3_bucket[5:]}/k/v.bin"
    fs.pipe_file(path, b"hello")
    assert fs.cat_file(path) == b"hello"


def test_endpoint_from_the_environment_reaches_s3fs(clean_aws_env, s3_server, s3_bucket):
    clean_aws_env.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    clean_aws_env.setenv("AWS_ACCESS_KEY_ID", "testing")
    clean_aws_env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    fs, path = get_fs(f"{s3_bucket}/from-env.txt")  # no explicit options
    fs.pipe_file(path, b"via env")
    assert fs.cat_file(path) == b"via env"


def test_check_access_accepts_an_existing_bucket_and_prefix(s3_bucket, s3_options):
    check_access(s3_bucket, s3_options)
    check_access(f"{s3_bucket}/not/yet/written", s3_options)  # output locations may not exist yet


def test_check_access_on_a_missing_bucket_fails_fast_without_secrets(s3_server):
    options = {"endpoint_url": s3_server.endpoint_url, "key": "testing",
               "secret": f"very-secret-{uuid.uuid4().hex}"}
    uri = f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/data"
    with pytest.raises(StorageError) as err:
        check_access(uri, options)
    message = str(err.value)
    assert uri in message and "does not exist" in message
    assert options["secret"] not in message and err.value.__cause__ is None


def test_check_access_with_wrong_credentials_fails_fast_without_secrets(s3_server, s3_bucket):
    # moto accepts any credentials unless IAM authentication is switched on; switch it on for
    # this test only (the server runs in this process), so "AKIA-unknown" is really refused.
    from moto.core.authorization import enable_iam_authentication

    options = {"endpoint_url": s3_server.endpoint_url, "key": "AKIAUNKNOWNKEY000001",
               "secret": f"wrong-secret-{uuid.uuid4().hex}"}
    with enable_iam_authentication():
        with pytest.raises(StorageError) as err:
            check_access(s3_bucket, options)
    message = str(err.value)
    assert s3_bucket in message and "access denied" in message
    assert options["secret"] not in message and options["key"] not in message


def test_pyarrow_filesystem_for_s3_is_native_and_sees_fsspec_writes(s3_bucket, s3_options):
    arrow_fs, path = pyarrow_filesystem(f"{s3_bucket}/arrow/x.bin", s3_options)
    assert isinstance(arrow_fs, pafs.S3FileSystem)
    with arrow_fs.open_output_stream(path) as out:
        out.write(b"written by pyarrow")
    fs, fs_path = get_fs(f"{s3_bucket}/arrow/x.bin", s3_options)
    assert fs.cat_file(fs_path) == b"written by pyarrow"


@pytest.mark.parametrize("ext", ["parquet", "csv", "jsonl"])
def test_table_round_trip_on_s3(s3_bucket, s3_options, ext):
    table = pa.table({"id": ["007", "010"], "n": [1, 2]})
    uri = write_table(table, f"{s3_bucket}/tables/t.{ext}", s3_options)
    back = read_table(uri, s3_options, string_columns=("id",))
    assert back.column("id").to_pylist() == ["007", "010"]
    assert back.column("n").to_pylist() == [1, 2]


