"""A floor for scripts/bench-kube's new-connection figure: what a connection per port-forward stream
costs from Python, with ktrace's own SPDY codec and API client but no agent, no tracer, no gRPC.

    python bench_kube_streams.py NAMESPACE POD PORT N   # N times: a new stream pair, GET /, the answer

One SPDY/3.1 port-forward (``api.upgrade``, as ktrace opens it) to PORT of POD, and a stream pair per
request as kubectl opens one for each local connection, but with the request sent along with the two
SYN_STREAMs instead of after their replies. The node's runtime dials PORT in the pod when the data
stream arrives, so a request is the streams' setup, that dial and the request's round trip in one
exchange: the least any design pays that reaches the pod with a new stream per connection
(docs/performance.md, "A stream per connection through the API server"). Run in the laptop
namespace with KUBECONFIG set; prints one JSON object with the samples in microseconds.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from ktrace.kube import spdy
from ktrace.kube.api import KubeApi
from ktrace.kube.errors import ApiCall
from ktrace.kube.portforward_transports import SPDY_UPGRADE

REQUEST = b"GET / HTTP/1.1\r\nHost: hello\r\n\r\n"


class Streams:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, port: int) -> None:
        self._reader = reader
        self._writer = writer
        self._port = port
        self._encoder = spdy.Encoder()
        self._decoder = spdy.FrameDecoder()
        self._next = 1

    def open_pair(self, first: bytes) -> int:
        """A new error and data stream pair with ``first`` on the data stream, in one write."""
        error, data = self._next, self._next + 2
        self._next += 4
        opening = self._encoder.forward_pair(error, self._port, error // 4)
        self._writer.write(opening + spdy.data_header(data, len(first)) + first)
        return data

    def reset(self, stream: int) -> None:
        self._writer.write(spdy.Encoder.rst_stream(stream, spdy.RST_CANCEL))
        self._writer.write(spdy.Encoder.rst_stream(stream - 2, spdy.RST_CANCEL))

    async def response(self, stream: int) -> bytes:
        """One HTTP answer on ``stream`` (Content-Length framed); other streams' frames are dropped."""
        data = b""
        while True:
            chunk = await self._reader.read(65536)
            if not chunk:
                raise ConnectionError("port-forward closed")
            for frame in self._decoder.feed(chunk):
                if isinstance(frame, spdy.DataFrame):
                    if frame.stream == stream:
                        data += frame.payload
                    elif frame.stream == stream - 2 and frame.payload:
                        raise ConnectionError(frame.payload.decode(errors="replace"))
                elif frame.kind == spdy.PING:
                    self._writer.write(spdy.Encoder.ping(frame.body))
            head, sep, body = data.partition(b"\r\n\r\n")
            if sep and len(body) >= _content_length(head):
                return data


def _content_length(head: bytes) -> int:
    return next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))


async def main(namespace: str, pod: str, port: int, n: int) -> dict[str, list[float]]:
    api = await KubeApi.load(None, None, namespace)
    try:
        call = ApiCall("create", "pods/portforward", namespace, pod)
        path = f"/api/v1/namespaces/{namespace}/pods/{pod}/portforward"
        reader, writer = await api.upgrade(call, path, [("ports", str(port))], SPDY_UPGRADE, timeout=10.0)
        streams = Streams(reader, writer, port)
        samples: list[float] = []
        for _ in range(n):
            start = time.perf_counter()
            stream = streams.open_pair(REQUEST)
            await streams.response(stream)
            samples.append((time.perf_counter() - start) * 1e6)
            streams.reset(stream)
        writer.close()
        return {"samples": samples}
    finally:
        await api.close()


if __name__ == "__main__":
    if len(sys.argv) != 5:
        raise SystemExit(__doc__)
    namespace, pod, port, count = sys.argv[1:5]
    print(json.dumps(asyncio.run(main(namespace, pod, int(port), int(count)))))
