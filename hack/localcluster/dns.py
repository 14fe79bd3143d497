"""Cluster DNS for the local cluster: Service names resolve in pods as on any conformant cluster.

A small authoritative server for ``<domain>`` (``cluster.local``), run by the cluster on the node
IP and named by the kubelet's ``clusterDNS``, so pods get it in their resolv.conf with the usual
search path (``<ns>.svc.<domain> svc.<domain> <domain>``). It answers, per the Kubernetes DNS
specification (kubernetes/dns, docs/specification.md):

* ``<svc>.<ns>.svc.<domain>`` A: the ClusterIP of a normal Service; for a headless Service
  (``clusterIP: None``) the addresses of its Endpoints (the not-ready ones too when the Service
  says ``publishNotReadyAddresses``);
* ``<hostname>.<svc>.<ns>.svc.<domain>`` A: an endpoint that has a hostname (a pod with
  ``spec.hostname`` and ``spec.subdomain``);
* other types for an existing name: no data (NOERROR, no answer), so IPv6 lookups do not hide
  the A record; anything else in the domain: NXDOMAIN.

Names outside the domain are forwarded to the host's nameserver. Only A records, UDP, no
caching beyond the record table, which is refreshed from the API every second and on a miss.
The message encoding and the lookup are pure functions; ``serve`` does the I/O.

Run: ``python -m localcluster.dns --kubeconfig FILE --listen 10.88.0.1 [--port 53]``.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import ipaddress
import json
import os
import pathlib
import socket
import socketserver
import ssl
import struct
import tempfile
import threading
import time
import urllib.request

import yaml

CLUSTER_DOMAIN = "cluster.local"
TTL_SECONDS = 5
"""Short: a rank 0 that moves to a new pod must be found by the next attempt."""
REFRESH_SECONDS = 1.0
MISS_REFRESH_SECONDS = 0.25
"""On a miss in the domain, re-list if the table is older than this (a Service created a moment ago)."""

TYPE_A, TYPE_AAAA, TYPE_ANY = 1, 28, 255
CLASS_IN = 1
NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP = 0, 1, 2, 3, 4


class MessageError(ValueError):
    """A DNS message we cannot parse (answered with FORMERR)."""


# ----------------------------------------------------------------------------- wire format (RFC 1035)


@dataclasses.dataclass(frozen=True)
class Question:
    name: str
    """Lower-case, without the trailing dot."""
    qtype: int
    qclass: int = CLASS_IN


@dataclasses.dataclass(frozen=True)
class Query:
    id: int
    flags: int
    questions: tuple


def encode_name(name: str) -> bytes:
    """A domain name as length-prefixed labels ending with the root label."""
    out = bytearray()
    for label in name.strip(".").split(".") if name.strip(".") else []:
        raw = label.encode("ascii")
        if not 0 < len(raw) < 64:
            raise MessageError(f"label {label!r} of {name!r} must be 1-63 bytes")
        out += bytes([len(raw)]) + raw
    if len(out) + 1 > 255:
        raise MessageError(f"name {name!r} is longer than 255 bytes")
    return bytes(out) + b"\x00"


def decode_name(data: bytes, offset: int) -> tuple:
    """(name, offset after it) at ``offset``; follows compression pointers (RFC 1035 4.1.4)."""
    labels, end, jumps = [], None, 0
    while True:
        if offset >= len(data):
            raise MessageError("name runs past the end of the message")
        length = data[offset]
        if length & 0xC0 == 0xC0:
            if offset + 1 >= len(data):
                raise MessageError("truncated compression pointer")
            if end is None:
                end = offset + 2
            offset = ((length & 0x3F) << 8) | data[offset + 1]
            jumps += 1
            if jumps > 32:
                raise MessageError("compression pointer loop")
            continue
        if length & 0xC0:
            raise MessageError(f"unsupported label type {length:#x}")
        offset += 1
        if length == 0:
            break
        labels.append(data[offset:offset + length].decode("ascii", errors="replace"))
        offset += length
    return ".".join(labels).lower(), (end if end is not None else offset)


def parse_query(data: bytes) -> Query:
    """The header and questions of a query; MessageError when it is malformed."""
    if len(data) < 12:
        raise MessageError("shorter than a DNS header")
    ident, flags, qdcount = struct.unpack("!HHH", data[:6])
    offset, questions = 12, []
    for _ in range(qdcount):
        name, offset = decode_name(data, offset)
        if offset + 4 > len(data):
            raise MessageError("truncated question")
        qtype, qclass = struct.unpack("!HH", data[offset:offset + 4])
        offset += 4
        questions.append(Question(name, qtype, qclass))
    return Query(ident, flags, tuple(questions))


def encode_query(name: str, qtype: int = TYPE_A, *, ident: int = 0) -> bytes:
    """A recursive query for one name (clients and tests)."""
    return struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 0) + encode_name(name) + struct.pack("!HH", qtype, CLASS_IN)


UDP_LIMIT = 512
"""Bytes of a UDP response without EDNS (RFC 1035 4.2.1)."""


def build_response(query: Query, *, rcode: int, addresses=(), ttl: int = TTL_SECONDS) -> bytes:
    """A response echoing the first question, with one A record per IPv4 address.

    Flags: QR, AA (we are the authority for the names we answer), RD copied, RA set. When the
    addresses do not fit in 512 bytes, as many as fit are sent, without the truncation bit (we
    serve no TCP): a client gets a subset of a large headless Service, as from a round-robin server.
    """
    opcode_rd = query.flags & 0x7900
    flags = 0x8000 | opcode_rd | 0x0400 | 0x0080 | (rcode & 0xF)
    question = query.questions[:1]
    room = UDP_LIMIT - 12 - sum(len(encode_name(q.name)) + 4 for q in question)
    addresses = tuple(addresses)[:max(room // 16, 0)]  # an A record with a name pointer: 16 bytes
    header = struct.pack("!HHHHHH", query.id, flags, len(question), len(addresses), 0, 0)
    body = b"".join(encode_name(q.name) + struct.pack("!HH", q.qtype, q.qclass) for q in question)
    for address in addresses:
        # 0xC00C: a pointer to the question's name, right after the 12-byte header.
        body += struct.pack("!HHHIH", 0xC00C, TYPE_A, CLASS_IN, ttl, 4) + ipaddress.IPv4Address(address).packed
    return header + body


@dataclasses.dataclass(frozen=True)
class Response:
    id: int
    rcode: int
    authoritative: bool
    addresses: tuple


def parse_response(data: bytes) -> Response:
    """The id, rcode and A-record addresses of a response (clients and tests)."""
    if len(data) < 12:
        raise MessageError("shorter than a DNS header")
    ident, flags, qdcount, ancount = struct.unpack("!HHHH", data[:8])
    offset = 12
    for _ in range(qdcount):
        _, offset = decode_name(data, offset)
        offset += 4
    addresses = []
    for _ in range(ancount):
        _, offset = decode_name(data, offset)
        rtype, _, _, length = struct.unpack("!HHIH", data[offset:offset + 10])
        offset += 10
        if rtype == TYPE_A and length == 4:
            addresses.append(str(ipaddress.IPv4Address(data[offset:offset + 4])))
        offset += length
    return Response(ident, flags & 0xF, bool(flags & 0x0400), tuple(addresses))


# ----------------------------------------------------------------------------- records


def records_from(services: list, endpoints: list, *, domain: str = CLUSTER_DOMAIN) -> dict:
    """name -> tuple of IPv4 addresses, from the API's Service and Endpoints objects (raw dicts).

    Names without an address are left out: they answer NXDOMAIN, like a headless Service
    whose pods have no IP yet.
    """
    records: dict = {}
    headless = {}
    for service in services:
        meta, spec = service.get("metadata") or {}, service.get("spec") or {}
        name = f"{meta.get('name')}.{meta.get('namespace')}.svc.{domain}".lower()
        cluster_ip = spec.get("clusterIP")
        if cluster_ip and cluster_ip != "None":
            records[name] = (cluster_ip,)
        elif cluster_ip == "None":
            headless[(meta.get("namespace"), meta.get("name"))] = bool(spec.get("publishNotReadyAddresses"))
    for endpoint in endpoints:
        meta = endpoint.get("metadata") or {}
        key = (meta.get("namespace"), meta.get("name"))
        if key not in headless:
            continue
        name = f"{key[1]}.{key[0]}.svc.{domain}".lower()
        ips = []
        for subset in endpoint.get("subsets") or []:
            addresses = list(subset.get("addresses") or [])
            if headless[key]:
                addresses += subset.get("notReadyAddresses") or []
            for address in addresses:
                ip = address.get("ip")
                if not ip or ":" in ip:
                    continue
                if ip not in ips:
                    ips.append(ip)
                if address.get("hostname"):
                    records[f"{address['hostname']}.{name}".lower()] = (ip,)
        if ips:
            records[name] = tuple(ips)
    return records


@dataclasses.dataclass(frozen=True)
class Answer:
    rcode: int
    addresses: tuple = ()


def lookup(records: dict, name: str, qtype: int, *, domain: str = CLUSTER_DOMAIN):
    """The Answer for a question in our domain, or None when the name is outside it (forward it)."""
    name = name.lower().strip(".")
    if name != domain and not name.endswith("." + domain):
        return None
    if name in records:
        return Answer(NOERROR, records[name] if qtype in (TYPE_A, TYPE_ANY) else ())
    suffix = "." + name
    if name == domain or any(known.endswith(suffix) for known in records):
        return Answer(NOERROR)  # an empty non-terminal such as <ns>.svc.<domain>
    return Answer(NXDOMAIN)


def upstream_nameserver(resolv_conf: str) -> str | None:
    """The first IPv4 nameserver in a resolv.conf text that is not loopback (None if there is none)."""
    for line in resolv_conf.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            try:
                address = ipaddress.ip_address(parts[1])
            except ValueError:
                continue
            if address.version == 4 and not address.is_loopback:
                return parts[1]
    return None


# ----------------------------------------------------------------------------- the server (I/O)


class ApiSource:
    """Lists Services and Endpoints from the API server with the credentials of a kubeconfig."""

    def __init__(self, kubeconfig: pathlib.Path):
        config = yaml.safe_load(pathlib.Path(kubeconfig).read_text())
        cluster = config["clusters"][0]["cluster"]
        user = config["users"][0]["user"]
        self.server = cluster["server"].rstrip("/")
        context = ssl.create_default_context()
        if cluster.get("certificate-authority-data"):
            context.load_verify_locations(cadata=base64.b64decode(cluster["certificate-authority-data"]).decode())
        elif cluster.get("certificate-authority"):
            context.load_verify_locations(cafile=cluster["certificate-authority"])
        if user.get("client-certificate"):
            context.load_cert_chain(user["client-certificate"], user["client-key"])
        elif user.get("client-certificate-data"):
            with tempfile.NamedTemporaryFile("wb", suffix=".pem") as pem:
                pem.write(base64.b64decode(user["client-certificate-data"]) + b"\n"
                          + base64.b64decode(user["client-key-data"]))
                pem.flush()
                context.load_cert_chain(pem.name)
        self.context = context
        self.headers = {"Authorization": f"Bearer {user['token']}"} if user.get("token") else {}

    def _list(self, resource: str) -> list:
        request = urllib.request.Request(f"{self.server}/api/v1/{resource}", headers=self.headers)
        with urllib.request.urlopen(request, context=self.context, timeout=5) as response:
            return json.load(response).get("items") or []

    def records(self, domain: str) -> dict:
        return records_from(self._list("services"), self._list("endpoints"), domain=domain)


class Resolver:
    """The record table, refreshed in the background and on a miss; thread-safe."""

    def __init__(self, source, *, domain: str = CLUSTER_DOMAIN, upstream: str | None = None, log=print):
        self.source, self.domain, self.upstream, self.log = source, domain, upstream, log
        self.records: dict = {}
        self.refreshed = 0.0
        self.lock = threading.Lock()
        self.stopped = threading.Event()

    def refresh(self) -> None:
        try:
            records = self.source.records(self.domain)
        except Exception as exc:  # the API server restarting: keep answering from the last table
            self.log(f"[dns] listing Services/Endpoints failed: {type(exc).__name__}: {exc}")
            return
        with self.lock:
            self.records, self.refreshed = records, time.monotonic()

    def refresh_forever(self) -> None:
        while not self.stopped.wait(REFRESH_SECONDS):
            self.refresh()

    def respond(self, data: bytes) -> bytes | None:
        try:
            query = parse_query(data)
        except MessageError:
            return None if len(data) < 2 else build_response(Query(struct.unpack("!H", data[:2])[0], 0, ()),
                                                             rcode=FORMERR)
        if len(query.questions) != 1 or query.questions[0].qclass != CLASS_IN:
            return build_response(query, rcode=NOTIMP)
        question = query.questions[0]
        answer = lookup(self.records, question.name, question.qtype, domain=self.domain)
        if answer is not None and answer.rcode == NXDOMAIN and time.monotonic() - self.refreshed > MISS_REFRESH_SECONDS:
            self.refresh()
            answer = lookup(self.records, question.name, question.qtype, domain=self.domain)
        if answer is None:
            return self.forward(query, data)
        return build_response(query, rcode=answer.rcode, addresses=answer.addresses)

    def forward(self, query: Query, data: bytes) -> bytes:
        if self.upstream is None:
            return build_response(query, rcode=SERVFAIL)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as upstream:
            upstream.settimeout(2.0)
            try:
                upstream.sendto(data, (self.upstream, 53))
                return upstream.recv(4096)
            except OSError:
                return build_response(query, rcode=SERVFAIL)


def make_server(resolver: Resolver, *, listen: str, port: int) -> socketserver.ThreadingUDPServer:
    class Handler(socketserver.BaseRequestHandler):
        def handle(self):
            data, sock = self.request
            reply = resolver.respond(data)
            if reply is not None:
                sock.sendto(reply, self.client_address)

    socketserver.ThreadingUDPServer.allow_reuse_address = True
    server = socketserver.ThreadingUDPServer((listen, port), Handler)
    server.daemon_threads = True
    return server


def query(server: str, name: str, qtype: int = TYPE_A, *, port: int = 53, timeout: float = 2.0) -> Response:
    """Ask ``server`` one question over UDP (the cluster's readiness probe and tests)."""
    ident = int.from_bytes(os.urandom(2), "big")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(encode_query(name, qtype, ident=ident), (server, port))
        response = parse_response(sock.recv(4096))
    if response.id != ident:
        raise MessageError(f"response id {response.id} does not match query id {ident}")
    return response


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m localcluster.dns", description=__doc__.split("\n")[0])
    parser.add_argument("--kubeconfig", required=True, type=pathlib.Path)
    parser.add_argument("--listen", required=True)
    parser.add_argument("--port", type=int, default=53)
    parser.add_argument("--domain", default=CLUSTER_DOMAIN)
    parser.add_argument("--resolv-conf", type=pathlib.Path, default=pathlib.Path("/etc/resolv.conf"))
    args = parser.parse_args(argv)
    try:
        upstream = upstream_nameserver(args.resolv_conf.read_text())
    except OSError:
        upstream = None
    resolver = Resolver(ApiSource(args.kubeconfig), domain=args.domain, upstream=upstream,
                        log=lambda m: print(m, flush=True))
    resolver.refresh()
    threading.Thread(target=resolver.refresh_forever, daemon=True, name="dns-refresh").start()
    server = make_server(resolver, listen=args.listen, port=args.port)
    print(f"[dns] serving {args.domain} on {args.listen}:{args.port}/udp, forwarding to {upstream}", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
