"""Remote image and video URLs, fetched by the gateway so the engine never touches the network.

Off unless ``remote_image_hosts`` lists the hosts clients may name (images and videos alike; the
settings keep their first name). Every hop (the URL, then each redirect) is checked before any
byte is sent: scheme (https, http only if allowed), host against the allow-list, and every
address the host resolves to against the public internet — private, loopback, link-local (cloud
metadata), CGNAT, multicast and reserved ranges are refused unless
``remote_image_allowed_networks`` names them. The request then goes to the checked address itself
(with the original Host header and TLS server name), so a second DNS answer cannot swap it.
The body is streamed against a byte cap (per kind of media) under one deadline for the whole
fetch; what arrives must then decode as an image or a video (``server/media.py``). Errors are
400/413/504 naming the request part.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Sequence
from dataclasses import dataclass

import httpx

from server.errors import GatewayError

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
REDIRECTS = {301, 302, 303, 307, 308}


def host_allowed(host: str, allowed: Sequence[str]) -> bool:
    """``host`` is listed exactly, or under a ``*.domain`` entry (any depth of subdomain)."""
    host = host.lower().rstrip(".")
    for entry in allowed:
        entry = entry.lower().rstrip(".")
        if host == entry or (entry.startswith("*.") and host.endswith(entry[1:])):
            return True
    return False


def address_allowed(ip: Address, networks: Sequence[Network]) -> bool:
    """A public unicast address, or one inside an explicitly allowed network."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    if any(ip in net for net in networks):
        return True
    return ip.is_global and not ip.is_multicast


async def resolve(host: str, port: int) -> list[Address]:
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(ipaddress.ip_address(info[4][0]) for info in infos))


class RemoteMedia:
    """Fetches remote image and video URLs under the gateway's settings with one shared client."""

    def __init__(
        self,
        hosts: Sequence[str],
        *,
        allow_http: bool,
        allowed_networks: Sequence[Network],
        max_bytes: int,
        connect_timeout_s: float,
        timeout_s: float,
        max_redirects: int,
    ) -> None:
        self.hosts, self.allow_http, self.networks = list(hosts), allow_http, list(allowed_networks)
        self.max_bytes, self.timeout_s, self.max_redirects = max_bytes, timeout_s, max_redirects
        self.client = httpx.AsyncClient(
            follow_redirects=False,  # every hop is checked here
            timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s),
            limits=httpx.Limits(max_connections=32, max_keepalive_connections=8),
            headers={"User-Agent": "sparsevlm-gateway", "Accept": "image/*, video/*"},
            trust_env=False,  # never route through a proxy from the environment
        )

    @property
    def enabled(self) -> bool:
        return bool(self.hosts)

    async def aclose(self) -> None:
        await self.client.aclose()

    async def fetch(
        self, url: str, param: str, *, kind: str = "image", max_bytes: int | None = None
    ) -> bytes:
        """The bytes of the ``kind`` (image, video) at ``url``, at most ``max_bytes`` (default:
        the remote image limit); GatewayError naming ``param`` otherwise."""
        if not self.enabled:
            raise GatewayError(
                400, f"{param}: remote {kind} URLs are disabled here; send a data: URL", param
            )
        fetch = _Fetch(param, kind, max_bytes or self.max_bytes)
        try:
            return await asyncio.wait_for(self._follow(url, fetch), self.timeout_s)
        except (TimeoutError, httpx.TimeoutException):
            raise GatewayError(
                504, f"{param}: fetching the {kind} took longer than {self.timeout_s:g} s", param
            ) from None
        except httpx.HTTPError as exc:
            raise GatewayError(
                400, f"{param}: could not fetch the {kind} ({type(exc).__name__})", param
            ) from None

    async def _follow(self, url: str, fetch: _Fetch) -> bytes:
        param, kind = fetch.param, fetch.kind
        target = httpx.URL(url)
        for _ in range(self.max_redirects + 1):
            request = await self._checked_request(target, fetch)
            response = await self.client.send(request, stream=True)
            try:
                if response.status_code in REDIRECTS and "location" in response.headers:
                    target = target.join(response.headers["location"])
                    continue
                if response.status_code != 200:
                    raise GatewayError(
                        400,
                        f"{param}: the {kind} server answered HTTP {response.status_code}",
                        param,
                    )
                return await self._read_capped(response, fetch)
            finally:
                await response.aclose()
        raise GatewayError(
            400, f"{param}: more than {self.max_redirects} redirects fetching the {kind}", param
        )

    async def _checked_request(self, url: httpx.URL, fetch: _Fetch) -> httpx.Request:
        param, kind = fetch.param, fetch.kind
        schemes = ("https", "http") if self.allow_http else ("https",)
        if url.scheme not in schemes:
            raise GatewayError(
                400, f"{param}: only {' or '.join(schemes)} {kind} URLs are allowed here", param
            )
        host = url.host
        if not host or not host_allowed(host, self.hosts):
            raise GatewayError(
                400, f"{param}: {kind} host {host!r} is not in this server's allowed hosts", param
            )
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            addresses = await resolve(host, port)
        except OSError:
            raise GatewayError(
                400, f"{param}: {kind} host {host!r} does not resolve", param
            ) from None
        refused = [ip for ip in addresses if not address_allowed(ip, self.networks)]
        if refused or not addresses:
            raise GatewayError(
                400,
                f"{param}: {kind} host {host!r} resolves to a non-public address "
                f"({refused[0] if refused else 'none'}); refused",
                param,
            )
        ip = addresses[0]
        checked = url.copy_with(host=str(ip))  # connect to the address checked above
        headers = {"Host": url.netloc.decode("ascii")}
        return self.client.build_request(
            "GET", checked, headers=headers, extensions={"sni_hostname": host}
        )

    async def _read_capped(self, response: httpx.Response, fetch: _Fetch) -> bytes:
        declared = response.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > fetch.max_bytes:
            raise fetch.too_large()
        chunks, size = [], 0
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > fetch.max_bytes:
                raise fetch.too_large()
            chunks.append(chunk)
        return b"".join(chunks)


@dataclass(frozen=True)
class _Fetch:
    """One fetch: the request part it is for, what it fetches, and its byte cap."""

    param: str
    kind: str
    max_bytes: int

    def too_large(self) -> GatewayError:
        return GatewayError(
            413,
            f"{self.param}: the {self.kind} is larger than the limit of {self.max_bytes} bytes",
            self.param,
        )
