"""Filesystems from URIs, storage options from env/config, redaction, fail-fast access checks.

S3 tests run against the session's moto endpoint (a real HTTP S3 server on loopback).
"""

from __future__ import annotations

import uuid

import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from pipelines.storage import (
    StorageError,
    check_access,
    get_fs,
    merge_storage_options,
    pyarrow_filesystem,
    read_table,
    redact,
    storage_options_from_env,
    write_table,
)

AWS_VARIABLES = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION",
                 "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


@pytest.fixture
def clean_aws_env(monkeypatch):
    for name in AWS_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_get_fs_resolves_protocols(tmp_path, s3_options, s3_bucket):
    fs, path = get_fs(str(tmp_path / "a.txt"))
    assert fs.protocol[0] in ("file", "local") and path == str(tmp_path / "a.txt")
    fs, path = get_fs("memory://x/y.txt")
    assert "memory" in fs.protocol and path.endswith("x/y.txt")
    fs, path = get_fs(f"{s3_bucket}/k/v.bin", s3_options)
    assert "s3" in fs.protocol and path == f"{s3_bucket[5:]}/k/v.bin"
    fs.pipe_file(path, b"hello")
    assert fs.cat_file(path) == b"hello"


def test_options_from_env_only_contain_what_is_set(clean_aws_env):
    assert storage_options_from_env("s3") == {}
    clean_aws_env.setenv("AWS_ENDPOINT_URL", "http://generic:1")
    clean_aws_env.setenv("AWS_ENDPOINT_URL_S3", "http://s3-specific:2")
    clean_aws_env.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    clean_aws_env.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    clean_aws_env.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t")
    assert storage_options_from_env("s3") == {
        "endpoint_url": "http://s3-specific:2",
        "client_kwargs": {"region_name": "eu-west-1"},
        "key": "AKIAEXAMPLE",
        "secret": "s3cr3t",
    }
    assert storage_options_from_env("gs") == {} and storage_options_from_env("file") == {}


def test_config_options_win_and_credentials_are_replaced_as_a_group():
    env = {"endpoint_url": "http://env:1", "key": "ENVKEY", "secret": "envsecret", "token": "envtok",
           "client_kwargs": {"region_name": "us-east-1", "verify": False}}
    config = {"endpoint_url": "http://cfg:2", "key": "CFGKEY", "secret": "cfgsecret",
              "client_kwargs": {"region_name": "eu-central-1"}}
    merged = merge_storage_options(env, config)
    assert merged["endpoint_url"] == "http://cfg:2"
    assert (merged["key"], merged["secret"]) == ("CFGKEY", "cfgsecret")
    assert "token" not in merged  # an env session token never pairs with config credentials
    assert merged["client_kwargs"] == {"region_name": "eu-central-1", "verify": False}
    assert merge_storage_options(env, {"endpoint_url": "http://cfg:2"})["token"] == "envtok"


def test_endpoint_from_the_environment_reaches_s3fs(clean_aws_env, s3_server, s3_bucket):
    clean_aws_env.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    clean_aws_env.setenv("AWS_ACCESS_KEY_ID", "testing")
    clean_aws_env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    fs, path = get_fs(f"{s3_bucket}/from-env.txt")  # no explicit options
    fs.pipe_file(path, b"via env")
    assert fs.cat_file(path) == b"via env"


def test_redact_replaces_secret_values_recursively():
    options = {
        "endpoint_url": "http://127.0.0.1:9000",
        "key": "AKIA123",
        "secret": "s3cr3t",
        "client_kwargs": {"region_name": "us-east-1", "aws_session_token": "T0K3N-value"},
        "aws_secret_access_key": "x",
        "tracking": [{"password": "pa55word", "user": "bob"}, ("credentials", {"credentials": {"a": 1}})],
        "db": "postgresql://bob:hunter2@db:5432/mlflow",
        "token": None,
        "author": "alice",
        "apiKey": "k3y-value",
    }
    out = redact(options)
    assert out["endpoint_url"] == "http://127.0.0.1:9000"
    assert out["key"] == out["secret"] == out["aws_secret_access_key"] == "***"
    assert out["client_kwargs"] == {"region_name": "us-east-1", "aws_session_token": "***"}
    assert out["tracking"][0] == {"password": "***", "user": "bob"}
    assert out["tracking"][1] == ("credentials", {"credentials": "***"})
    assert out["db"] == "postgresql://bob:***@db:5432/mlflow"
    assert out["token"] is None  # nothing to hide
    assert out["author"] == "alice" and out["apiKey"] == "***"  # whole words, camelCase too
    assert options["key"] == "AKIA123"  # the input is not modified
    for secret in ("AKIA123", "s3cr3t", "T0K3N-value", "hunter2", "pa55word", "k3y-value"):
        assert secret not in repr(out)


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


def test_check_access_local(tmp_path):
    check_access(str(tmp_path / "new" / "dir"))
    with pytest.raises(StorageError, match="does not exist"):
        check_access(str(tmp_path / "missing.parquet"), must_exist=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError, match="not a directory"):
        check_access(str(tmp_path / "file" / "below"))


def test_pyarrow_filesystem_for_s3_is_native_and_sees_fsspec_writes(s3_bucket, s3_options):
    arrow_fs, path = pyarrow_filesystem(f"{s3_bucket}/arrow/x.bin", s3_options)
    assert isinstance(arrow_fs, pafs.S3FileSystem)
    with arrow_fs.open_output_stream(path) as out:
        out.write(b"written by pyarrow")
    fs, fs_path = get_fs(f"{s3_bucket}/arrow/x.bin", s3_options)
    assert fs.cat_file(fs_path) == b"written by pyarrow"


def test_pyarrow_filesystem_for_local_and_other_protocols(tmp_path):
    arrow_fs, path = pyarrow_filesystem(str(tmp_path / "x"))
    assert isinstance(arrow_fs, pafs.LocalFileSystem) and path == str(tmp_path / "x")
    arrow_fs, path = pyarrow_filesystem("memory://arrow-test/x.bin")
    assert isinstance(arrow_fs, pafs.PyFileSystem)
    with arrow_fs.open_output_stream(path) as out:
        out.write(b"abc")
    assert get_fs("memory://arrow-test/x.bin")[0].cat_file(path) == b"abc"


@pytest.mark.parametrize("ext", ["parquet", "csv", "jsonl"])
def test_table_round_trip_on_s3(s3_bucket, s3_options, ext):
    table = pa.table({"id": ["007", "010"], "n": [1, 2]})
    uri = write_table(table, f"{s3_bucket}/tables/t.{ext}", s3_options)
    back = read_table(uri, s3_options, string_columns=("id",))
    assert back.column("id").to_pylist() == ["007", "010"]
    assert back.column("n").to_pylist() == [1, 2]


def test_unknown_table_format_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown table format"):
        write_table(pa.table({"a": [1]}), str(tmp_path / "t.xlsx"))
