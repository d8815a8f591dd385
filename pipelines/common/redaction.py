"""Secrets out of everything printed, logged or sent to MLflow: secret-looking keys of option
dicts, passwords in URLs, inline keys of connection strings, the storage options' own values.

The ground floor: imports nothing of the project, so the CLI, storage and tracking all use it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

REDACTED = "***"

# Words that make an option name secret-looking, matched against the name's words
# ("aws_secret_access_key" -> aws, secret, access, key; "apiKey" -> api, key).
_SECRET_WORDS = {
    "key", "secret", "token", "password", "passwd", "pwd", "credential", "credentials",
    "signature", "auth", "authorization", "apikey", "accesskey", "secretkey", "sessiontoken",
    "privatekey", "sas", "cookie",
}
# Secret option names whose words alone look harmless (adlfs/azure: connection_string holds the
# AccountKey; gcsfs: token may be a dict, covered by "token"), matched on the joined name.
_SECRET_COMPOUNDS = ("connectionstring", "accountkey", "sastoken", "clientsecret", "privatekeyid")
# Secrets inside strings: an Azure connection string's AccountKey / SharedAccessSignature, a
# SAS URL's `sig=`, a password in a URL (handled by _URL_PASSWORD below).
_INLINE_SECRET = re.compile(r"(?i)\b(?P<head>(?:AccountKey|SharedAccessSignature|SharedAccessKey|sig)=)[^;&\s]+")


def redact(obj: Any) -> Any:
    """A copy of ``obj`` with the values of secret-looking keys replaced by ``"***"``, recursively
    through dicts, lists and tuples. Strings embedding credentials (``scheme://user:pw@host``) lose
    the password too."""
    if isinstance(obj, Mapping):
        return {k: REDACTED if is_secret_key(k) and v not in (None, "") else redact(v)
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v) for v in obj)
    if isinstance(obj, str):
        return redact_urls(obj)
    return obj


def is_secret_key(key: Any) -> bool:
    """Whether an option name looks secret (its words, or a known compound name)."""
    words = re.findall(r"[a-z0-9]+", re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", str(key)).lower())
    return any(word in _SECRET_WORDS for word in words) or any(c in "".join(words) for c in _SECRET_COMPOUNDS)


_URL_PASSWORD = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.\-]*://[^\s/@:]*:)(?P<password>[^\s/@]+)@")


def redact_urls(text: str) -> str:
    """`text` with the password of every `scheme://user:password@host` in it replaced by "***"
    (log lines and error messages quote URIs as given, credentials included)."""
    text = _URL_PASSWORD.sub(lambda m: f"{m.group('head')}{REDACTED}@", str(text))
    return _INLINE_SECRET.sub(lambda m: f"{m.group('head')}{REDACTED}", text)


def scrub(text: str, storage_options: Mapping[str, Any] | None) -> str:
    """``text`` with every secret value of ``storage_options`` replaced by ``"***"``."""
    for value in _secret_values(storage_options or {}):
        text = text.replace(value, REDACTED)
    return text


def _secret_values(options: Mapping[str, Any]):
    for key, value in options.items():
        if isinstance(value, Mapping):
            yield from _secret_values(value)
        elif is_secret_key(key) and isinstance(value, str) and len(value) >= 4:
            yield value


_USERINFO = re.compile(r"://(?P<user>[^\s/@:]*):(?P<password>[^\s/@]+)@")


def url_passwords(argv: Sequence[str]) -> list[str]:
    """Passwords written into URIs on the command line (`s3://KEY:SECRET@bucket/...`): libraries
    quote such URIs in their own words (e.g. 'Invalid bucket name "KEY:SECRET@bucket"')."""
    return [m.group("password") for arg in argv for m in _USERINFO.finditer(arg)]
