"""Optional URL inputs: off unless ATOKEN_ALLOW_URL_FETCH=true, and then only for hosts in
ATOKEN_URL_ALLOWLIST; downloads are capped at the upload byte limit and a total deadline."""

from __future__ import annotations

import asyncio
from urllib.parse import urlparse

import httpx

from .errors import BadRequest, DeadlineExceeded, InvalidParameter, PayloadTooLarge

MAX_URL_LENGTH = 2048


def check_url(url: object, allow: bool, allowlist: tuple[str, ...]) -> str:
    if not allow:
        raise InvalidParameter("URL inputs are disabled on this server (ATOKEN_ALLOW_URL_FETCH)")
    if not isinstance(url, str) or len(url) > MAX_URL_LENGTH:
        raise InvalidParameter(f"each URL must be a string of at most {MAX_URL_LENGTH} characters",
                               limit=MAX_URL_LENGTH)
    try:
        parsed = urlparse(url)
        host = parsed.hostname
        httpx.URL(url)  # what the client will parse: refuse here what it would refuse there
    except (ValueError, httpx.InvalidURL) as exc:
        raise InvalidParameter(f"malformed URL {url!r}: {exc}") from None
    if parsed.scheme not in ("http", "https") or not host:
        raise InvalidParameter(f"URL must be http(s) with a host, got {url!r}")
    if host.lower() not in allowlist:
        raise InvalidParameter(f"host {host!r} is not in the URL allowlist")
    return url


async def fetch(url: str, max_bytes: int, timeout_s: float = 30.0) -> bytes:
    """GET `url` with a total deadline (a server trickling bytes cannot hold us past it) and a
    size cap (a declared Content-Length over it is refused before the body is read)."""
    try:
        async with asyncio.timeout(timeout_s):
            return await _download(url, max_bytes, timeout_s)
    except TimeoutError:
        raise DeadlineExceeded(f"fetching {url} took longer than {timeout_s:g} s", limit=timeout_s) from None


async def _download(url: str, max_bytes: int, timeout_s: float) -> bytes:
    async with httpx.AsyncClient(timeout=timeout_s, follow_redirects=False) as client:
        try:
            async with client.stream("GET", url) as response:
                if response.status_code != 200:
                    raise InvalidParameter(f"fetching {url} answered {response.status_code}")
                declared = response.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > max_bytes:
                    raise PayloadTooLarge(f"download of {url} declares {declared} bytes, over {max_bytes}",
                                          limit=max_bytes)
                chunks, size = [], 0
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > max_bytes:
                        raise PayloadTooLarge(f"download of {url} exceeds {max_bytes} bytes", limit=max_bytes)
                    chunks.append(chunk)
                return b"".join(chunks)
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise BadRequest(f"cannot fetch {url}: {exc}") from None
