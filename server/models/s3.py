"""Model archives in S3 and S3-compatible stores (MinIO, Ceph, R2, ...): ``s3://bucket/key``.

The client is boto3, the AWS SDK: AWS keeps it current with S3's API, and it brings the standard
credential chain (environment, shared config and SSO profiles, web identity for EKS service
accounts, instance and task roles). ``fsspec``/``s3fs`` would add aiobotocore, which pins botocore
to narrow ranges. boto3 is imported only when an ``s3://`` URL is used (``pip install
'marserve[s3]'``); its calls block, so they run in threads.

Credentials and the endpoint come from the server's environment (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION``/``AWS_DEFAULT_REGION``,
``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL`` for an S3-compatible store), then boto3's own chain.
A URL never carries a key (one with user info is refused), and no message here includes one.

A download keeps the http(s) rules (server/models/download.py): ``max_download_size`` checked on
the object's size before reading and again while reading, a hidden temporary file beside the
destination linked into place when complete, never replacing a file, removed on any failure.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..errors import ArchiveExists, DownloadFailed
from .download import landing

_CHUNK = 1 << 20
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 60.0


def is_s3(url: str) -> bool:
    return url.lower().startswith("s3://")


@dataclass(frozen=True)
class S3Object:
    key: str
    size: int
    etag: str


def split_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/key`` -> ("bucket", "some/key"); DownloadFailed for one that names no
    bucket or carries user info (a key must never be in a URL)."""
    parts = urlsplit(url)
    if "@" in parts.netloc or parts.username or parts.password:
        # The URL itself is not repeated: what it carries may be a secret.
        raise DownloadFailed("s3://...", "credentials must not be part of an s3:// URL; use the AWS environment or profile")
    if not parts.netloc:
        raise DownloadFailed(url, "an s3:// URL names a bucket: s3://bucket/key")
    return parts.netloc, parts.path.lstrip("/")


def client(environ: Mapping[str, str]) -> Any:
    """An S3 client from ``environ`` and boto3's credential chain."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise DownloadFailed("s3://", "s3:// URLs need boto3: pip install 'marserve[s3]'") from None
    session = boto3.session.Session(
        aws_access_key_id=environ.get("AWS_ACCESS_KEY_ID"),
        aws_secret_access_key=environ.get("AWS_SECRET_ACCESS_KEY"),
        aws_session_token=environ.get("AWS_SESSION_TOKEN"),
        region_name=environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION"),
    )
    config = Config(connect_timeout=CONNECT_TIMEOUT, read_timeout=READ_TIMEOUT, retries={"max_attempts": 3, "mode": "standard"})
    endpoint = environ.get("AWS_ENDPOINT_URL_S3") or environ.get("AWS_ENDPOINT_URL") or None
    return session.client("s3", endpoint_url=endpoint, config=config)


def _reason(exc: Exception) -> str:
    """Why an S3 call failed, in words that carry no credential."""
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        if code in ("NoSuchKey", "404", "NotFound"):
            return "no such key"
        if code == "NoSuchBucket":
            return "no such bucket"
        if code in ("AccessDenied", "403", "Forbidden"):
            return "access denied"
        return f"S3 answered {code or 'an error'}: {error.get('Message', '')}".rstrip(": ")
    if isinstance(exc, NoCredentialsError):
        return "no AWS credentials found (environment, profile or instance role)"
    if isinstance(exc, BotoCoreError):
        return type(exc).__name__ + ": " + str(exc).split("\n")[0]
    return str(exc)


async def download(url: str, destination: Path, *, environ: Mapping[str, str], max_size: int) -> None:
    """Fetch the object ``url`` names into ``destination``, all or nothing; it must not exist yet."""
    bucket, key = split_url(url)
    if not key or key.endswith("/"):
        raise DownloadFailed(url, "the URL names no object")
    if os.path.lexists(destination):
        raise ArchiveExists(destination.name)
    await asyncio.to_thread(_download, url, bucket, key, destination, environ, max_size)


def _download(url: str, bucket: str, key: str, destination: Path, environ: Mapping[str, str], max_size: int) -> None:
    too_big = f"the archive is larger than max_download_size ({max_size} bytes)"
    with landing(url, destination) as sink:
        try:
            s3 = client(environ)
            answer = s3.get_object(Bucket=bucket, Key=key)
        except DownloadFailed:
            raise
        except Exception as exc:  # noqa: BLE001 - botocore's errors, worded by _reason
            raise DownloadFailed(url, _reason(exc)) from None
        body = answer["Body"]
        try:
            if int(answer.get("ContentLength") or 0) > max_size:
                raise DownloadFailed(url, too_big)
            received = 0
            for chunk in body.iter_chunks(_CHUNK):
                received += len(chunk)
                if received > max_size:
                    raise DownloadFailed(url, too_big)
                sink.write(chunk)
        except DownloadFailed:
            raise
        except Exception as exc:  # noqa: BLE001 - a connection lost mid-body
            raise DownloadFailed(url, _reason(exc)) from None
        finally:
            body.close()


def list_objects(s3: Any, url: str) -> list[S3Object]:
    """Every object under the prefix ``url`` names (blocking: call it in a thread); keys are
    relative to the prefix. Raises DownloadFailed when the listing fails."""
    bucket, prefix = split_url(url)
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    objects = []
    try:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", ()):
                objects.append(S3Object(item["Key"][len(prefix) :], int(item["Size"]), str(item.get("ETag", ""))))
    except Exception as exc:  # noqa: BLE001 - botocore's errors, worded by _reason
        raise DownloadFailed(url, _reason(exc)) from None
    return objects


def object_url(prefix_url: str, key: str) -> str:
    """The URL of ``key`` (relative to ``prefix_url``)."""
    return prefix_url.rstrip("/") + "/" + key
