"""Cluster DNS of the local cluster (localcluster.dns): the message encoding, the record lookup, the
server on a loopback port, and on the real node a pod that finds another through a headless Service."""

from __future__ import annotations

import struct
import threading
import uuid

import pytest

from localcluster import dns, node

DOMAIN = "cluster.local"


def service(name, namespace, cluster_ip, *, publish_not_ready=False):
    return {"metadata": {"name": name, "namespace": namespace},
            "spec": {"clusterIP": cluster_ip, "publishNotReadyAddresses": publish_not_ready}}


def endpoints(name, namespace, *, ready=(), not_ready=(), hostnames=None):
    hostnames = hostnames or {}
    def address(ip):
        return {"ip": ip, **({"hostname": hostnames[ip]} if ip in hostnames else {})}
    return {"metadata": {"name": name, "namespace": namespace},
            "subsets": [{"addresses": [address(ip) for ip in ready],
                         "notReadyAddresses": [address(ip) for ip in not_ready]}]}


RECORDS = dns.records_from(
    [service("kubernetes", "default", "10.0.0.1"),
     service("demo-ppo-3", "team-a", "None", publish_not_ready=True),
     service("strict", "team-a", "None"),
     service("empty", "team-a", "None")],
    [endpoints("kubernetes", "default", ready=["10.88.0.1"]),
     endpoints("demo-ppo-3", "team-a", not_ready=["10.88.0.7"]),
     endpoints("strict", "team-a", ready=["10.88.0.8"], not_ready=["10.88.0.9"],
               hostnames={"10.88.0.8": "worker-0"}),
     endpoints("empty", "team-a")])


# ----------------------------------------------------------------------------- wire format


def test_a_query_round_trips_through_the_wire_format():
    parsed = dns.parse_query(dns.encode_query("Demo-PPO-3.team-a.svc.cluster.local.", dns.TYPE_AAAA, ident=4711))
    assert parsed.id == 4711 and parsed.flags & 0x0100  # recursion desired
    assert parsed.questions == (dns.Question("demo-ppo-3.team-a.svc.cluster.local", dns.TYPE_AAAA),)


def test_a_response_carries_the_question_and_one_a_record_per_address():
    query = dns.parse_query(dns.encode_query("x.team-a.svc.cluster.local", ident=9))
    wire = dns.build_response(query, rcode=dns.NOERROR, addresses=("10.88.0.7", "10.88.0.8"))
    flags, qd, an = struct.unpack("!HHH", wire[2:8])
    assert flags & 0x8000 and (qd, an) == (1, 2)  # a response, one question, two answers
    response = dns.parse_response(wire)
    assert response == dns.Response(9, dns.NOERROR, True, ("10.88.0.7", "10.88.0.8"))


def test_a_headless_service_with_more_pods_than_fit_in_512_bytes_answers_with_those_that_fit():
    query = dns.parse_query(dns.encode_query("big.team-a.svc.cluster.local", ident=1))
    many = tuple(f"10.88.1.{n}" for n in range(100))
    wire = dns.build_response(query, rcode=dns.NOERROR, addresses=many)
    assert len(wire) <= 512
    answered = dns.parse_response(wire).addresses
    assert 20 <= len(answered) < 100 and answered == many[:len(answered)]


def test_compressed_names_are_followed_and_pointer_loops_refused():
    # "b" then a pointer back to offset 12, where "a.example" is written.
    data = b"\x00" * 12 + b"\x01a\x07example\x00" + b"\x01b\xc0\x0c"
    assert dns.decode_name(data, 12) == ("a.example", 23)
    assert dns.decode_name(data, 23) == ("b.a.example", 27)
    with pytest.raises(dns.MessageError, match="loop"):
        dns.decode_name(b"\x00" * 12 + b"\xc0\x0c", 12)


def test_malformed_messages_are_errors_not_crashes():
    with pytest.raises(dns.MessageError):
        dns.parse_query(b"\x00\x01")
    with pytest.raises(dns.MessageError):
        dns.parse_query(struct.pack("!HHHHHH", 1, 0, 1, 0, 0, 0) + b"\x05ab")
    with pytest.raises(dns.MessageError, match="1-63"):
        dns.encode_name("x" * 64 + ".local")


# ----------------------------------------------------------------------------- records and lookup


def test_a_cluster_ip_service_resolves_to_its_cluster_ip():
    assert dns.lookup(RECORDS, "kubernetes.default.svc.cluster.local", dns.TYPE_A) == dns.Answer(
        dns.NOERROR, ("10.0.0.1",))


def test_a_headless_service_publishing_not_ready_addresses_resolves_to_the_not_ready_pod():
    assert dns.lookup(RECORDS, "demo-ppo-3.team-a.svc.cluster.local", dns.TYPE_A).addresses == ("10.88.0.7",)


def test_a_headless_service_without_that_flag_resolves_to_ready_pods_only_and_to_hostnames():
    assert dns.lookup(RECORDS, "strict.team-a.svc.cluster.local", dns.TYPE_A).addresses == ("10.88.0.8",)
    assert dns.lookup(RECORDS, "worker-0.strict.team-a.svc.cluster.local", dns.TYPE_A).addresses == ("10.88.0.8",)


def test_unknown_names_in_the_domain_are_nxdomain_and_other_types_of_known_names_are_empty():
    assert dns.lookup(RECORDS, "empty.team-a.svc.cluster.local", dns.TYPE_A) == dns.Answer(dns.NXDOMAIN)
    assert dns.lookup(RECORDS, "demo-ppo-3.team-a.svc.team-a.svc.cluster.local", dns.TYPE_A).rcode == dns.NXDOMAIN
    # AAAA of an existing name: no data, not NXDOMAIN (which would hide the A record from getaddrinfo).
    assert dns.lookup(RECORDS, "demo-ppo-3.team-a.svc.cluster.local", dns.TYPE_AAAA) == dns.Answer(dns.NOERROR)
    assert dns.lookup(RECORDS, "team-a.svc.cluster.local", dns.TYPE_A) == dns.Answer(dns.NOERROR)


def test_names_outside_the_domain_are_forwarded():
    assert dns.lookup(RECORDS, "huggingface.co", dns.TYPE_A) is None
    assert dns.upstream_nameserver("search x\nnameserver 127.0.0.53\nnameserver 10.255.255.53\n") == "10.255.255.53"


def test_the_kubelet_is_told_to_use_the_cluster_dns_on_the_node_ip(tmp_path):
    config = node.kubelet_config(port=1, healthz_port=2, ca_file=tmp_path / "ca", tls_cert=tmp_path / "c",
                                 tls_key=tmp_path / "k")
    assert config["clusterDNS"] == [node.NODE_IP] and config["clusterDomain"] == DOMAIN


# ----------------------------------------------------------------------------- the server on loopback


class FixedSource:
    def __init__(self):
        self.calls = 0
        self.table = {}

    def records(self, domain):
        self.calls += 1
        return dict(self.table)


def test_the_server_answers_over_udp_and_lists_again_when_a_new_name_is_missed():
    source = FixedSource()
    resolver = dns.Resolver(source, upstream=None, log=lambda m: None)
    resolver.refresh()
    server = dns.make_server(resolver, listen="127.0.0.1", port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        name = "rank0.team-a.svc.cluster.local"
        resolver.refreshed = 0.0  # the table is old: a miss lists again
        source.table = {name: ("10.88.0.7",)}  # a Service created after the last listing
        assert dns.query("127.0.0.1", name, port=port).addresses == ("10.88.0.7",)
        assert source.calls == 2
        assert dns.query("127.0.0.1", "gone.team-a.svc.cluster.local", port=port).rcode == dns.NXDOMAIN
        # No upstream: outside names fail fast with SERVFAIL instead of timing out.
        assert dns.query("127.0.0.1", "example.com", port=port).rcode == dns.SERVFAIL
    finally:
        server.shutdown()
        server.server_close()


# ----------------------------------------------------------------------------- on the real node

RANK0 = """
import socket
server = socket.create_server(("0.0.0.0", 29500))
connection, _ = server.accept()
connection.sendall(b"hello from rank 0 at " + socket.gethostbyname(socket.gethostname()).encode())
connection.close()
"""

RANK1 = """
import json, socket, sys
name = sys.argv[1]
address = socket.gethostbyname(name)  # through the pod's resolv.conf: search path, cluster DNS
with socket.create_connection((name, 29500), timeout=30) as connection:
    greeting = connection.recv(200).decode()
print(json.dumps({"address": address, "greeting": greeting}))
"""


@pytest.mark.cluster
def test_a_pod_resolves_a_headless_service_to_the_other_pod_and_connects_to_it(kube_cluster):
    from kubernetes import client

    from localcluster.images import TRAINER_IMAGE
    from localcluster.polling import wait_for

    from .test_real_node import python_pod, run_to_json

    core = client.CoreV1Api(kube_cluster.api_client())
    namespace = f"lc-dns-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"metadata": {"name": namespace}})
    try:
        wait_for(lambda: core.read_namespaced_service_account("default", namespace), timeout=30,
                 what=f"default ServiceAccount in {namespace}")
        core.create_namespaced_service(namespace, {
            "metadata": {"name": "demo-ppo-0"},
            "spec": {"clusterIP": "None", "publishNotReadyAddresses": True, "selector": {"rank": "0"},
                     "ports": [{"name": "rendezvous", "port": 29500}]}})
        rank0 = python_pod("rank0", RANK0, image=TRAINER_IMAGE,
                           # Never Ready: the name must resolve anyway (publishNotReadyAddresses).
                           readinessProbe={"exec": {"command": ["false"]}, "periodSeconds": 1})
        rank0["metadata"]["labels"] = {"rank": "0"}
        core.create_namespaced_pod(namespace, rank0)

        def rank0_ip():
            pod = core.read_namespaced_pod("rank0", namespace)
            return pod.status.pod_ip if pod.status.phase == "Running" else None

        ip = wait_for(rank0_ip, timeout=120, what="rank0 to run with an IP")
        # The name resolves before the client asks (Endpoints written, DNS table listed).
        fqdn = f"demo-ppo-0.{namespace}.svc.{DOMAIN}"
        wait_for(lambda: dns.query(node.NODE_IP, fqdn).addresses == (ip,), timeout=30,
                 what=f"{fqdn} to resolve to {ip}")
        rank1 = python_pod("rank1", RANK1, image=TRAINER_IMAGE)
        # The short name the operator gives (MASTER_ADDR): resolved through the pod's search path.
        rank1["spec"]["containers"][0]["command"] += [f"demo-ppo-0.{namespace}.svc"]
        result = run_to_json(kube_cluster, core, namespace, rank1)
        assert result["address"] == ip
        assert result["greeting"] == f"hello from rank 0 at {ip}"
    finally:
        core.delete_namespace(namespace)
