"""Downloading a model archive from an http(s) URL that ``allowed_urls`` already let through.

TorchServe fetched any URL it was given into the model store (CVE-2023-43654) and checked for
``..`` only after writing the file (CVE-2024-35198). Here the caller has already matched the URL
against ``allowed_urls`` and refused ``..`` before any network or file access, and this module
adds what an allow-list cannot express:

- the host is resolved here, every address it resolves to is checked (link-local, cloud metadata,
  unspecified, multicast and reserved addresses are refused; loopback and private ones are the
  admin's choice), and the connection goes to the address that was checked, so a second DNS
  answer cannot swap it (DNS rebinding);
- redirects are followed by hand, at most MAX_REDIRECTS, only to the same scheme, host and port,
  and each target must match ``allowed_urls`` too;
- no proxy from the environment is used, since a proxy would connect wherever it resolves;
- the size is capped (``max_download_size``): a larger Content-Length is refused before the body
  is read, and reading stops once the bytes received pass the cap;
- the body goes to a hidden temporary file beside the destination, which is linked into place
  only once complete and never replaces an existing file; any failure removes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import os
import socket
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING
from urllib.parse import urlsplit

from archiver import one_line

from ..errors import ArchiveExists, DownloadFailed

if TYPE_CHECKING:
    import httpx

MAX_REDIRECTS = 5
CONNECT_TIMEOUT = 10.0  # s, also for resolving the host
READ_TIMEOUT = 60.0  # s without a byte from the server
_CHUNK = 1 << 20

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Cloud instance-metadata and platform endpoints outside the link-local ranges.
_METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean, Oracle (also link-local)
        "169.254.170.2",  # AWS ECS task metadata (also link-local)
        "fd00:ec2::254",  # AWS IMDS over IPv6
        "100.100.100.200",  # Alibaba Cloud
        "192.0.0.192",  # Oracle Cloud
        "168.63.129.16",  # Azure WireServer
    )
)
_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")  # connecting to 0.x.x.x reaches this host
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def archive_file_name(url: str) -> str:
    """The model-store file a URL downloads to: its path's last segment, as TorchServe names it.

    Raises DownloadFailed when that segment cannot be a file name of its own.
    """
    name = urlsplit(url).path.rsplit("/", 1)[-1]
    if name in ("", ".", "..") or "\\" in name or "\0" in name:
        raise DownloadFailed(url, "the URL's path does not end in a file name")
    return name


def refusal(address: IPAddress) -> str | None:
    """Why a download may not connect to ``address``, or None when it may."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or (
            ipaddress.IPv4Address(int(address) & 0xFFFFFFFF) if address in _NAT64 else None
        )
        if embedded is not None:
            return refusal(embedded)
    if address in _METADATA_ADDRESSES:
        return "a cloud metadata address"
    if address.is_link_local:
        return "a link-local address"
    if address.is_unspecified or address in _THIS_NETWORK:
        return "an unspecified address"
    if address.is_multicast:
        return "a multicast address"
    if address.is_reserved:
        return "a reserved address"
    return None


async def download(url: str, destination: Path, *, allowed: Callable[[str], bool], max_size: int) -> None:
    """Fetch ``url`` into ``destination``, all or nothing; it must not exist yet.

    ``url`` has already passed ``allowed``, which every redirect target must pass too.
    Raises DownloadFailed (400) or ArchiveExists (500).
    """
    if os.path.lexists(destination):
        raise ArchiveExists(destination.name)
    with landing(url, destination) as sink:
        await _fetch(url, sink, allowed, max_size)


@contextlib.contextmanager
def landing(url: str, destination: Path) -> Iterator[IO[bytes]]:
    """A file to write ``url``'s archive into: a ``.part`` file beside ``destination`` that takes
    its name when the block ends without an error, and is removed otherwise (all or nothing).
    OSError becomes DownloadFailed; ArchiveExists if ``destination`` appeared meanwhile."""
    try:
        fd, part_name = tempfile.mkstemp(prefix=f".{destination.name}.", suffix=".part", dir=destination.parent)
    except OSError as exc:
        raise DownloadFailed(url, f"cannot write to {destination.parent}: {exc.strerror or exc}") from None
    part = Path(part_name)
    try:
        with os.fdopen(fd, "wb") as sink:
            yield sink
        _link_into_place(part, destination)
    except OSError as exc:
        raise DownloadFailed(url, f"cannot write to {destination.parent}: {exc.strerror or exc}") from None
    finally:
        part.unlink(missing_ok=True)


async def _fetch(url: str, sink: IO[bytes], allowed: Callable[[str], bool], max_size: int) -> None:
    import httpx  # here and below, not at the top: most servers never download, and it costs 0.1 s of start-up

    timeout = httpx.Timeout(READ_TIMEOUT, connect=CONNECT_TIMEOUT)
    # trust_env=False: no proxy (it would resolve the host itself), no .netrc credentials. The
    # certificate authorities stay httpx's usual ones: certifi's, or SSL_CERT_FILE / SSL_CERT_DIR.
    tls = httpx.create_ssl_context()
    async with httpx.AsyncClient(timeout=timeout, trust_env=False, follow_redirects=False, verify=tls) as client:
        current = httpx.URL(url)
        for _ in range(MAX_REDIRECTS + 1):
            async with _get(client, url, current) as response:
                if response.is_redirect:
                    current = _redirect_target(url, current, response.headers["location"], allowed)
                    continue
                if response.status_code != 200:
                    raise DownloadFailed(url, f"the server answered {response.status_code} {response.reason_phrase}")
                await _save(url, current.host, response, sink, max_size)
                return
    raise DownloadFailed(url, f"more than {MAX_REDIRECTS} redirects")


@contextlib.asynccontextmanager
async def _get(client: httpx.AsyncClient, url: str, target: httpx.URL) -> AsyncIterator[httpx.Response]:
    """GET ``target`` from an address that passed the checks; the body is left to read."""
    import httpx

    host = target.raw_host.decode("ascii")
    port = target.port or (443 if target.scheme == "https" else 80)
    failure: Exception | None = None
    for address in await _checked_addresses(url, host, port):
        # The request goes to the checked address; Host and TLS (SNI, certificate) still name
        # the host, so virtual hosts and certificate verification work as they would by name.
        request = client.build_request(
            "GET",
            target.copy_with(host=address),
            headers={"Host": target.netloc.decode("ascii"), "Accept-Encoding": "identity"},
            extensions={"sni_hostname": host},
        )
        try:
            response = await client.send(request, stream=True)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            failure = exc  # the next address may answer
            continue
        except httpx.HTTPError as exc:
            raise DownloadFailed(url, _describe(exc, target.host)) from None
        try:
            yield response
        finally:
            await response.aclose()
        return
    assert failure is not None
    raise DownloadFailed(url, _describe(failure, target.host))


async def _checked_addresses(url: str, host: str, port: int) -> list[str]:
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), CONNECT_TIMEOUT)
    except (socket.gaierror, UnicodeError) as exc:
        raise DownloadFailed(url, f"cannot resolve {host}: {getattr(exc, 'strerror', None) or exc}") from None
    except TimeoutError:
        raise DownloadFailed(url, f"cannot resolve {host}: timed out after {CONNECT_TIMEOUT:g} s") from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    # Every address is checked, not only the one used: a refused one must not be reachable by
    # the luck of the order the resolver returns them in.
    for address in addresses:
        why = refusal(ipaddress.ip_address(address.partition("%")[0]))
        if why is not None:
            if address != host:
                why = f"it resolves to {address}, {why}"
            raise DownloadFailed(url, f"refused to connect to {host}: {why}")
    if not addresses:
        raise DownloadFailed(url, f"cannot resolve {host}: no address")
    return addresses


def _redirect_target(url: str, current: httpx.URL, location: str, allowed: Callable[[str], bool]) -> httpx.URL:
    import httpx

    try:
        target = current.join(location)
    except httpx.InvalidURL:
        raise DownloadFailed(url, f"the server redirected to an invalid URL: {location}") from None
    if ".." in location:
        raise DownloadFailed(url, f"refused a redirect to a relative path: {location}")
    if _origin(target) != _origin(current):
        raise DownloadFailed(url, f"refused a redirect to another host: {target}")
    if not allowed(str(target)):
        raise DownloadFailed(url, f"refused a redirect to {target}: it does not match any allowed URL(s)")
    return target


def _origin(url: httpx.URL) -> tuple[str, str, int]:
    return url.scheme, url.host, url.port or (443 if url.scheme == "https" else 80)


async def _save(url: str, host: str, response: httpx.Response, sink: IO[bytes], max_size: int) -> None:
    import httpx

    too_big = f"the archive is larger than max_download_size ({max_size} bytes)"
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_size:
        raise DownloadFailed(url, too_big)
    received = 0
    try:
        async for chunk in response.aiter_bytes(_CHUNK):
            received += len(chunk)
            if received > max_size:
                raise DownloadFailed(url, too_big)
            # Disk writes would stall every other request on the event loop.
            await asyncio.to_thread(sink.write, chunk)
    except httpx.HTTPError as exc:
        raise DownloadFailed(url, _describe(exc, host)) from None


def _describe(exc: Exception, host: str) -> str:
    import httpx

    if isinstance(exc, httpx.ConnectTimeout):
        return f"could not connect to {host} within {CONNECT_TIMEOUT:g} s"
    if isinstance(exc, httpx.ReadTimeout):
        return f"no data from {host} for {READ_TIMEOUT:g} s"
    if isinstance(exc, httpx.ConnectError):
        return f"could not connect to {host}: {one_line(exc)}"
    return one_line(exc)


def _link_into_place(part: Path, destination: Path) -> None:
    """Give the finished file its name, never replacing a file that appeared meanwhile."""
    try:
        os.link(part, destination)
    except FileExistsError:
        raise ArchiveExists(destination.name) from None
    except OSError as exc:
        # Some filesystems (FUSE mounts of object stores) have no hard links: rename instead.
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        if os.path.lexists(destination):
            raise ArchiveExists(destination.name) from None
        os.rename(part, destination)
