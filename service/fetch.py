"""Optional URL inputs: off unless ATOKEN_ALLOW_URL_FETCH=true, and then only for hosts in
ATOKEN_URL_ALLOWLIST; downloads are capped at the upload byte limit."""

from __future__ import annotations

from urllib.parse import urlparse

import httpx

from .errors import BadRequest, InvalidParameter, PayloadTooLarge


def check_url(url: str, allow: bool, allowlist: tuple[str, ...]) -> str:
    if not allow:
        raise InvalidParameter("URL inputs are disabled on this server (ATOKEN_ALLOW_URL_FETCH)")
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise InvalidParameter(f"URL must be http(s) with a host, got {url!r}")
    if parsed.hostname.lower() not in allowlist:
        raise InvalidParameter(f"host {parsed.hostname!r} is not in the URL allowlist")
    return url


async def fetch(url: str, max_bytes: int, timeout_s: float = 30.0) -> bytes:
    async with httpx.AsyncClient(timeout=timeout_s, follow_redirects=False) as client:
        try:
            async with client.stream("GET", url) as response:
                if response.status_code != 200:
                    raise InvalidParameter(f"fetching {url} answered {response.status_code}")
                chunks, size = [], 0
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > max_bytes:
                        raise PayloadTooLarge(f"download of {url} exceeds {max_bytes} bytes", limit=max_bytes)
                    chunks.append(chunk)
                return b"".join(chunks)
        except httpx.HTTPError as exc:
            raise BadRequest(f"cannot fetch {url}: {exc}") from None
