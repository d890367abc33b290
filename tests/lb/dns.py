"""A tiny authoritative DNS server on loopback: the test's stand-in for Docker's embedded
DNS, which answers a network alias with one A record per running container."""

from __future__ import annotations

import socket
import threading

from dnslib import QTYPE, RCODE, RR, A, DNSRecord


class DnsServer:
    """Answers A queries for the names in :attr:`records` (name -> addresses)."""

    def __init__(self) -> None:
        self._records: dict[str, list[str]] = {}
        self._lock = threading.Lock()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.settimeout(0.2)
        self.address = f"127.0.0.1:{self._sock.getsockname()[1]}"
        self.queries = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True, name="dns")
        self._thread.start()

    def add(self, name: str, address: str) -> None:
        with self._lock:
            self._records.setdefault(name.lower(), []).append(address)

    def remove(self, name: str, address: str) -> None:
        with self._lock:
            self._records[name.lower()].remove(address)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self._sock.recvfrom(4096)
            except TimeoutError:
                continue
            try:
                query = DNSRecord.parse(data)
            except Exception:  # not DNS: ignore it, as a real server would
                continue
            self.queries += 1
            reply = query.reply()
            name = str(query.q.qname).rstrip(".").lower()
            with self._lock:
                addresses = list(self._records.get(name, []))
            if name not in self._records:
                reply.header.rcode = RCODE.NXDOMAIN
            elif query.q.qtype == QTYPE.A:
                for address in addresses:
                    reply.add_answer(RR(query.q.qname, QTYPE.A, rdata=A(address), ttl=1))
            self._sock.sendto(reply.pack(), peer)
