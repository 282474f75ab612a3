"""The only module that touches the Kubernetes client (``kubernetes.aio``) and its HTTP stack (aiohttp).

``kubernetes.aio`` reads the kubeconfig (contexts, client certificates, tokens, exec plugins) and
builds the TLS context and auth headers; requests are made through its REST client with plain
JSON dicts in and out, so nothing else in ktrace depends on the generated model classes. Watches
and the port-forward WebSocket use the same aiohttp session directly, because they stream.

Imported lazily (only ``--agent kube`` and ``ktrace cleanup`` need it): it costs ~0.5 s.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import urllib.parse
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import aiohttp
from kubernetes.aio import client as kube_client
from kubernetes.aio import config as kube_config

from ktrace.errors import KtraceError

from .errors import ApiCall, KubeApiError, kubeconfig_error

log = logging.getLogger("ktrace.kube")

REQUEST_TIMEOUT = 30.0
UPGRADED_BUFFER = 1024 * 1024  # what an upgraded connection's reader holds before it pauses the socket


def kubeconfig_paths(explicit: str | None, env: Mapping[str, str]) -> tuple[str, list[str]]:
    """``--kubeconfig``, else ``$KUBECONFIG`` (a ':'-list), else ~/.kube/config; and the files that exist."""
    if explicit:
        return explicit, [explicit] if os.path.exists(explicit) else []
    listed = env.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
    existing = [p for p in listed.split(":") if p and os.path.exists(os.path.expanduser(p))]
    return listed, existing


class UpgradeUnavailable(KubeApiError):
    """This client cannot make an upgraded connection to the API server (it is behind a proxy)."""


class WebSocket:
    """A binary WebSocket: ``send``, ``receive`` (``None`` once closed), ``close``."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws
        self.close_reason = ""

    async def send(self, data: bytes) -> None:
        await self._ws.send_bytes(data)

    async def receive(self) -> bytes | None:
        msg = await self._ws.receive()
        if msg.type == aiohttp.WSMsgType.BINARY:
            return bytes(msg.data)
        if msg.type == aiohttp.WSMsgType.TEXT:
            return str(msg.data).encode()
        if msg.type == aiohttp.WSMsgType.ERROR:
            self.close_reason = f"error: {msg.data}"
        elif msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED):
            code = self._ws.close_code
            self.close_reason = f"closed by the server (code {code})" if code is not None else "closed"
        return None

    async def close(self) -> None:
        await self._ws.close()


def _context_names(files: str) -> list[str] | None:
    """The contexts of the kubeconfig ``files``, or None when they cannot be read."""
    try:
        contexts, _ = kube_config.list_kube_config_contexts(files)  # type: ignore[no-untyped-call]
    except (kube_config.ConfigException, KeyError, TypeError, ValueError, OSError):
        return None
    return [str(c.get("name")) for c in contexts or () if isinstance(c, dict)]


class KubeApi:
    """An API client for one context and namespace. ``await KubeApi.load(...)``, then requests; ``close()``."""

    def __init__(self, api_client: Any, context: str, namespace: str, user: str) -> None:
        self._client = api_client
        self.context = context
        self.namespace = namespace
        self.user = user
        self.server: str = str(api_client.configuration.host)

    @classmethod
    async def load(cls, kubeconfig: str | None, context: str | None, namespace: str | None) -> KubeApi:
        wanted, existing = kubeconfig_paths(kubeconfig, os.environ)
        if not existing:
            raise KtraceError(
                f"no kubeconfig found (looked at {wanted})",
                "pass --kubeconfig or set KUBECONFIG; without a cluster, --agent local runs the agent in ktrace",
            )
        configuration = kube_client.Configuration()
        try:
            loader = await kube_config.load_kube_config(  # type: ignore[no-untyped-call]
                config_file=":".join(existing),
                context=context,
                client_configuration=configuration,
                persist_config=False,  # never rewrite the user's kubeconfig
            )
        except kube_config.ConfigException as exc:
            files = ":".join(existing)
            raise kubeconfig_error(str(exc), files, context, _context_names(files)) from None
        except (KeyError, TypeError, ValueError, OSError) as exc:
            raise KtraceError(
                f"cannot use kubeconfig {':'.join(existing)}: {type(exc).__name__}: {exc}",
                "check it with kubectl config view",
            ) from None
        current = loader.current_context
        chosen = namespace or current.get("context", {}).get("namespace") or "default"
        user = str(current.get("context", {}).get("user") or "")
        return cls(kube_client.ApiClient(configuration), str(current.get("name", "")), chosen, user)

    async def close(self) -> None:
        await self._client.close()

    # -- plumbing -----------------------------------------------------------------------------------

    def _session(self) -> aiohttp.ClientSession:
        rest = self._client.rest_client
        if rest.pool_manager is None:
            rest.pool_manager = rest._create_pool_manager()
        session: aiohttp.ClientSession = rest.pool_manager
        return session

    async def _prepare(
        self,
        method: str,
        path: str,
        query: Sequence[tuple[str, str]] | None,
        content_type: str | None,
        *,
        accept: str | None = "application/json",
    ) -> tuple[str, dict[str, str]]:
        headers = {"Accept": accept} if accept else {}
        if content_type is not None:
            headers["Content-Type"] = content_type
        _method, url, headers, _body, _post = await self._client.param_serialize(
            method, path, query_params=list(query or []), header_params=headers, auth_settings=["BearerToken"]
        )
        return str(url), dict(headers)

    def _ssl_kwargs(self) -> dict[str, Any]:
        name = self._client.configuration.tls_server_name
        return {"server_hostname": name} if name else {}

    async def request(
        self,
        call: ApiCall,
        method: str,
        path: str,
        *,
        query: Sequence[tuple[str, str]] | None = None,
        body: Mapping[str, Any] | None = None,
        content_type: str = "application/json",
        timeout: float = REQUEST_TIMEOUT,
    ) -> dict[str, Any]:
        """One JSON request; raises ``KubeApiError`` (status 0 when the server was not reached)."""
        url, headers = await self._prepare(method, path, query, content_type if body is not None else None)
        data = json.dumps(body) if body is not None else None
        try:
            async with self._session().request(
                method,
                url,
                headers=headers,
                data=data,
                timeout=aiohttp.ClientTimeout(total=timeout),
                **self._ssl_kwargs(),
            ) as response:
                text = await response.text()
                status = response.status
                reason = response.reason or ""
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise KubeApiError(call, 0, _describe(exc)) from exc
        if not 200 <= status < 300:
            raise KubeApiError(call, status, text, reason)
        decoded = json.loads(text) if text else {}
        return decoded if isinstance(decoded, dict) else {"items": decoded}

    async def read(self, resource: str, name: str, namespace: str | None) -> dict[str, Any] | None:
        """A core (``/api/v1``) object, or None when it does not exist (404)."""
        where = f"/api/v1/namespaces/{namespace}/{resource}/{name}" if namespace else f"/api/v1/{resource}/{name}"
        try:
            return await self.request(ApiCall("get", resource, namespace, name), "GET", where)
        except KubeApiError as exc:
            if exc.status == 404:
                return None
            raise

    async def list(self, resource: str, namespace: str) -> list[dict[str, Any]]:
        """The core objects of a kind in a namespace."""
        listing = await self.request(
            ApiCall("list", resource, namespace), "GET", f"/api/v1/namespaces/{namespace}/{resource}"
        )
        return [dict(item) for item in listing.get("items") or []]

    async def delete_pod(self, namespace: str, name: str, timeout: float = REQUEST_TIMEOUT) -> bool:
        """Delete a pod with a 1 s grace period; False when it was already gone (404)."""
        try:
            await self.request(
                ApiCall("delete", "pods", namespace, name),
                "DELETE",
                f"/api/v1/namespaces/{namespace}/pods/{name}",
                body={"gracePeriodSeconds": 1},
                timeout=timeout,
            )
        except KubeApiError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    async def watch(
        self, call: ApiCall, path: str, query: Sequence[tuple[str, str]], *, read_timeout: float
    ) -> AsyncIterator[dict[str, Any]]:
        """The events of a watch request (``watch=1`` is added), until the server ends it.

        ``read_timeout``: the longest silence accepted (ask for bookmarks, or a ``timeoutSeconds``
        shorter than this).
        """
        url, headers = await self._prepare("GET", path, [*query, ("watch", "1")], None)
        try:
            async with self._session().get(
                url,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=REQUEST_TIMEOUT, sock_read=read_timeout),
                **self._ssl_kwargs(),
            ) as response:
                if response.status != 200:
                    raise KubeApiError(call, response.status, await response.text(), response.reason or "")
                while True:
                    line = await response.content.readline()
                    if not line:
                        return
                    if line.strip():
                        event = json.loads(line)
                        if isinstance(event, dict):
                            yield event
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            raise KubeApiError(call, 0, _describe(exc)) from exc

    async def websocket(
        self, call: ApiCall, path: str, query: Sequence[tuple[str, str]], protocol: str, *, timeout: float
    ) -> WebSocket:
        url, headers = await self._prepare("GET", path, query, None, accept=None)
        url = (
            "wss://" + url.removeprefix("https://")
            if url.startswith("https://")
            else "ws://" + url.removeprefix("http://")
        )
        try:
            async with asyncio.timeout(timeout):
                ws = await self._session().ws_connect(
                    url,
                    headers=headers,
                    protocols=[protocol],
                    timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=5.0),
                    autoping=True,
                    compress=0,
                    **self._ssl_kwargs(),
                )
        except aiohttp.WSServerHandshakeError as exc:
            raise KubeApiError(call, exc.status, exc.message, exc.message) from exc
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise KubeApiError(call, 0, _describe(exc)) from exc
        if ws.protocol != protocol:
            await ws.close()
            raise KubeApiError(call, 0, f"the server does not speak {protocol} (it chose {ws.protocol!r})")
        return WebSocket(ws)

    async def upgrade(
        self,
        call: ApiCall,
        path: str,
        query: Sequence[tuple[str, str]],
        upgrade_headers: Mapping[str, str],
        *,
        timeout: float,
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """An HTTP/1.1 ``POST`` answered by ``101 Switching Protocols``: the raw connection after it.

        aiohttp speaks WebSocket but no other upgraded protocol, so this one request is written on a
        connection of its own, with the client's TLS context and auth headers. Raises ``KubeApiError``
        (status 0 when the server was not reached or no HTTP answer came).
        """
        configuration = self._client.configuration
        if configuration.proxy:
            raise UpgradeUnavailable(call, 0, "an upgraded connection through an HTTP proxy is not supported")
        url, headers = await self._prepare("POST", path, query, None, accept=None)
        parts = urllib.parse.urlsplit(url)
        secure = parts.scheme == "https"
        ssl_context = self._client.rest_client.ssl_context if secure else None
        host = parts.hostname or ""
        headers.update(upgrade_headers)
        headers.update({"Host": parts.netloc, "Connection": "Upgrade", "Content-Length": "0"})
        target = f"{parts.path}?{parts.query}" if parts.query else parts.path
        request = f"POST {target} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(
                    host,
                    parts.port or (443 if secure else 80),
                    ssl=ssl_context,
                    server_hostname=(configuration.tls_server_name or host) if secure else None,
                    limit=UPGRADED_BUFFER,
                )
                writer.write(request.encode("latin-1"))
                status, reason, answer = await _read_answer(reader)
                if status != 101:
                    length = int(answer.get("content-length", "0") or 0)
                    body = await reader.read(min(length, 65536)) if length else b""
                    raise KubeApiError(call, status, body.decode("utf-8", "replace"), reason)
        except KubeApiError:
            if writer is not None:
                writer.transport.abort()
            raise
        except (TimeoutError, OSError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            if writer is not None:
                writer.transport.abort()
            raise KubeApiError(call, 0, _describe(exc)) from exc
        return reader, writer


async def _read_answer(reader: asyncio.StreamReader) -> tuple[int, str, dict[str, str]]:
    """An HTTP/1.1 status line and headers (names lower-cased)."""
    line = (await reader.readuntil(b"\r\n")).decode("latin-1")
    version, _, rest = line.strip().partition(" ")
    code, _, reason = rest.partition(" ")
    if not version.startswith("HTTP/") or not code.isdigit():
        raise ValueError(f"not an HTTP answer: {line.strip()[:80]!r}")
    headers: dict[str, str] = {}
    while (field := (await reader.readuntil(b"\r\n")).decode("latin-1").strip()) != "":
        name, _, value = field.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(code), reason, headers


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, TimeoutError):
        return "timed out"
    return text
