"""The test cluster's ``hello`` service: an HTTP server and a UDP echo, standard library only.

HTTP on :8080 answers ``GET /`` with ``hello from <pod name>, you are <client ip>:<port>``, ``GET /bytes/<n>``
with n bytes, and ``POST /sink`` with ``<length> <sha256>`` of the body it read; UDP on :7007 echoes each
datagram back. Runs unprivileged (ports above 1024) under Pod Security
"restricted".
"""

from __future__ import annotations

import hashlib
import http.server
import os
import socket
import threading

HTTP_PORT = 8080
UDP_PORT = 7007


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        if self.path.startswith("/bytes/") and self.path[7:].isdigit():
            body = b"x" * min(int(self.path[7:]), 1 << 30)
        else:
            me = os.environ.get("POD_NAME", socket.gethostname())
            body = f"hello from {me}, you are {self.client_address[0]}:{self.client_address[1]}\n".encode()
        self._reply(body)

    def do_POST(self) -> None:
        left = int(self.headers.get("Content-Length") or 0)
        digest = hashlib.sha256()
        length = left
        while left:
            chunk = self.rfile.read(min(left, 1 << 20))
            if not chunk:
                break
            digest.update(chunk)
            left -= len(chunk)
        self._reply(f"{length - left} {digest.hexdigest()}\n".encode())

    def _reply(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def udp_echo() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("0.0.0.0", UDP_PORT))  # noqa: S104 - inside the pod
        while True:
            data, peer = s.recvfrom(65535)
            s.sendto(data, peer)


def main() -> None:
    threading.Thread(target=udp_echo, daemon=True).start()
    http.server.ThreadingHTTPServer(("0.0.0.0", HTTP_PORT), Handler).serve_forever()  # noqa: S104


if __name__ == "__main__":
    main()
