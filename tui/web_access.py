"""Who may use `torbiz-tui web`: only the operator's own browser tab.

Whoever can talk to the dashboard's websocket can read the whole screen and press its keys, and
any web page the operator opens can make the browser talk to 127.0.0.1. So every request must
name the dashboard's own address in `Host` (not so after DNS rebinding), a websocket must come
from the dashboard's own page (`Origin`), and every request must carry this run's token: the
printed URL holds it once, the first page load trades it for an HttpOnly SameSite=Strict cookie
and drops it from the address bar."""

from __future__ import annotations

import hmac
import ipaddress
import secrets
from dataclasses import dataclass

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler, Middleware

TOKEN_PARAMETER = "token"
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
WILDCARD_HOSTS = ("", "0.0.0.0", "::")


def _url_host(host: str) -> str:
    """A host as it appears in a URL and a Host header: IPv6 in brackets, lower case."""
    host = host.strip("[]").lower()
    try:
        return f"[{host}]" if ipaddress.ip_address(host).version == 6 else host
    except ValueError:
        return host


def _host_headers(host: str, port: int) -> tuple[str, ...]:
    """The Host headers naming host:port, the browser's own form first (no port for 80)."""
    return (host, f"{host}:80") if port == 80 else (f"{host}:{port}",)


@dataclass(frozen=True)
class WebAccess:
    """This run's address, token and cookie; `token_matches` compares in constant time."""

    bind_host: str
    port: int
    token: str

    @classmethod
    def for_this_run(cls, bind_host: str, port: int) -> WebAccess:
        if bind_host.strip("[]") in WILDCARD_HOSTS:
            raise ValueError(f"refusing to serve the dashboard on every interface ({bind_host!r}):"
                             " name one address, or use 127.0.0.1 and an SSH tunnel")
        return cls(bind_host, port, secrets.token_urlsafe(32))

    @property
    def canonical_hosts(self) -> tuple[str, ...]:
        """The Host headers of the one origin the page lives at."""
        return _host_headers(_url_host(self.bind_host), self.port)

    @property
    def origin(self) -> str:
        """The page's origin (textual-serve's `public_url`, from which it builds the ws URL)."""
        return f"http://{self.canonical_hosts[0]}"

    @property
    def hosts(self) -> frozenset[str]:
        """Every Host header accepted: the bind host and the loopback names, with the port."""
        names = (_url_host(self.bind_host), *LOOPBACK_NAMES)
        return frozenset(h for name in names for h in _host_headers(name, self.port))

    @property
    def cookie_name(self) -> str:
        # Browsers share cookies across ports: one name per port keeps two dashboards apart.
        return f"torbiz_web_{self.port}"

    @property
    def login_url(self) -> str:
        return f"{self.origin}/?{TOKEN_PARAMETER}={self.token}"

    def token_matches(self, candidate: str | None) -> bool:
        if candidate is None:
            return False
        return hmac.compare_digest(candidate.encode("utf-8", "surrogatepass"),
                                   self.token.encode())


def _refuse(reason: str) -> web.Response:
    return web.Response(status=403, text=f"403 Forbidden: {reason}\n")


def access_guard(access: WebAccess) -> Middleware:
    """An aiohttp middleware that lets through only this run's own page and websocket."""
    again = f"open the URL `torbiz-tui web` printed when it started ({access.origin}/?token=...)"
    hosts, canonical_hosts = access.hosts, access.canonical_hosts

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        host = request.headers.get(hdrs.HOST, "").lower()
        if host not in hosts:
            return _refuse(f"this dashboard answers only at {access.origin} (the request named "
                           "another address; through an SSH tunnel keep the same port)")
        origin = request.headers.get(hdrs.ORIGIN)
        if origin is not None and origin != access.origin:
            return _refuse(f"requests from another origin's page are refused (Origin {origin!r})")
        websocket = request.headers.get(hdrs.UPGRADE, "").lower() == "websocket"
        if websocket and origin is None:
            return _refuse("a websocket must come from the dashboard's own page (no Origin)")
        if host not in canonical_hosts:  # localhost or [::1]: the page lives at one origin
            if websocket:
                return _refuse(f"the dashboard's websocket is at {access.origin}")
            raise web.HTTPTemporaryRedirect(f"{access.origin}{request.path_qs}")
        token = request.query.get(TOKEN_PARAMETER)
        if token is not None:
            if not access.token_matches(token):
                return _refuse(f"this URL's token is not this run's: {again}")
            return _trade_token_for_cookie(access)
        if not access.token_matches(request.cookies.get(access.cookie_name)):
            return _refuse(f"no valid session cookie: {again}")
        return await handler(request)

    return guard


# Not a 303: after a cross-site navigation (the URL clicked in a web page or a browser-based
# terminal) Chromium keeps the redirect cross-site and withholds the Strict cookie; a navigation
# the page starts itself is same-site. location.replace also keeps the token out of history.
DROP_TOKEN_PAGE = f"""<!DOCTYPE html><meta charset="utf-8"><title>torbiz</title><script>
const url = new URL(location.href); url.searchParams.delete("{TOKEN_PARAMETER}");
location.replace(url);
</script>
"""


def _trade_token_for_cookie(access: WebAccess) -> web.StreamResponse:
    """Set the session cookie; the page then reloads itself without the token."""
    response = web.Response(text=DROP_TOKEN_PAGE, content_type="text/html", headers={
        hdrs.CACHE_CONTROL: "no-store", "Referrer-Policy": "no-referrer"})
    response.set_cookie(access.cookie_name, access.token, path="/", httponly=True,
                        samesite="Strict")
    return response


async def _forbid_framing(request: web.Request, response: web.StreamResponse) -> None:
    # A page of the same site (another port of 127.0.0.1) could frame the dashboard and steer
    # the operator's keys into it.
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Content-Security-Policy"] = "frame-ancestors 'none'"


def guard_app(app: web.Application, access: WebAccess) -> None:
    """Put the guard in front of every route of an app (before the app starts)."""
    app.middlewares.append(access_guard(access))
    app.on_response_prepare.append(_forbid_framing)
