"""Pure parts of the real node: component configs, certificates, the pause image, host-path volumes."""

import datetime
import hashlib
import io
import ipaddress
import json
import os
import pathlib
import tarfile
import tomllib

import pytest

from cryptography import x509
from cryptography.x509.oid import NameOID

from localcluster import node, pause, pki, volumes


def test_containerd_config_restricts_oom_score_adj_and_keeps_its_state_in_our_dirs(tmp_path):
    text = node.containerd_config(root=tmp_path / "root", state=tmp_path / "state",
                                  address=tmp_path / "sock", cni_conf_dir=tmp_path / "cni")
    config = tomllib.loads(text)
    cri = config["plugins"]["io.containerd.grpc.v1.cri"]
    # Without it every sandbox fails here: root lacks CAP_SYS_RESOURCE.
    assert cri["restrict_oom_score_adj"] is True
    assert cri["sandbox_image"] == pause.SANDBOX_IMAGE
    assert cri["cni"]["conf_dir"] == str(tmp_path / "cni")
    options = cri["containerd"]["runtimes"]["runc"]["options"]
    assert options["Root"] == str(tmp_path / "state" / "runc") and options["SystemdCgroup"] is False
    assert config["grpc"]["address"] == str(tmp_path / "sock")


def test_housekeeping_containerd_has_no_cri_plugin(tmp_path):
    config = tomllib.loads(node.containerd_config(root=tmp_path, state=tmp_path, address=tmp_path / "s",
                                                  cni_conf_dir=tmp_path, cri=False))
    assert config["disabled_plugins"] == ["io.containerd.grpc.v1.cri"]
    assert "plugins" not in config


def test_cni_bridge_gives_addresses_from_the_pod_cidr_and_keeps_leases_in_our_dir(tmp_path):
    bridge = node.cni_config(ipam_data_dir=tmp_path)["plugins"][0]
    assert bridge["type"] == "bridge" and bridge["bridge"] == node.BRIDGE and bridge["isGateway"]
    (subnet,) = bridge["ipam"]["ranges"][0]
    assert subnet == {"subnet": node.POD_CIDR, "gateway": node.GATEWAY_IP}
    assert ipaddress.ip_address(node.GATEWAY_IP) in ipaddress.ip_network(node.POD_CIDR)
    assert bridge["ipam"]["dataDir"] == str(tmp_path)  # not /var/lib/cni: cleaned with the node


def test_kubelet_accepts_only_clients_of_our_ca_and_never_collects_our_images(tmp_path):
    config = node.kubelet_config(port=1, healthz_port=2, ca_file=tmp_path / "ca.crt",
                                 tls_cert=tmp_path / "c", tls_key=tmp_path / "k")
    assert config["authentication"]["anonymous"]["enabled"] is False
    assert config["authentication"]["x509"]["clientCAFile"] == str(tmp_path / "ca.crt")
    assert config["readOnlyPort"] == 0
    assert config["imageGCHighThresholdPercent"] == 100
    assert config["cgroupRoot"] == f"/{node.CGROUP_ROOT}" and config["cgroupDriver"] == "cgroupfs"


def test_extended_resource_patch_escapes_the_slash():
    assert node.extended_resources_patch(2) == [
        {"op": "add", "path": "/status/capacity/nvidia.com~1gpu", "value": "2"}]


def _subject(pem: bytes):
    cert = x509.load_pem_x509_certificate(pem)
    common = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    groups = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)]
    return cert, common, groups


def test_node_identities_are_signed_for_the_node_authorizer():
    material = pki.generate(now=datetime.datetime.now(datetime.timezone.utc), apiserver_ips=(node.GATEWAY_IP,),
                            identities=pki.node_identities("n1", node.NODE_IP))
    _, common, groups = _subject(material.identities["kubelet-client"][0])
    assert (common, groups) == ("system:node:n1", ["system:nodes"])
    _, common, groups = _subject(material.identities["apiserver-kubelet-client"][0])
    assert groups == ["system:masters"]
    assert _subject(material.identities["kube-proxy"][0])[1] == "system:kube-proxy"
    serving, _, _ = _subject(material.identities["kubelet-serving"][0])
    ips = serving.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.IPAddress)
    assert ipaddress.ip_address(node.NODE_IP) in ips
    apiserver, _, _ = _subject(material.apiserver_cert)
    ips = apiserver.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.IPAddress)
    assert ipaddress.ip_address(node.GATEWAY_IP) in ips  # pods reach the API server there


def test_pause_image_archive_is_a_docker_archive_with_one_executable():
    archive = pause.one_file_image(binary=b"\x7fELF fake", path_in_image="/pause",
                                   repo_tag=pause.SANDBOX_IMAGE, user=pause.PAUSE_USER)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        (manifest,) = json.load(tar.extractfile("manifest.json"))
        config = json.load(tar.extractfile(manifest["Config"]))
        layer_bytes = tar.extractfile(manifest["Layers"][0]).read()
    assert manifest["RepoTags"] == [pause.SANDBOX_IMAGE]
    assert config["rootfs"]["diff_ids"] == [f"sha256:{hashlib.sha256(layer_bytes).hexdigest()}"]
    assert config["config"]["Entrypoint"] == ["/pause"]
    with tarfile.open(fileobj=io.BytesIO(layer_bytes)) as layer:
        (member,) = layer.getmembers()
        assert (member.name, member.mode) == ("pause", 0o755)
        assert layer.extractfile(member).read() == b"\x7fELF fake"


def test_a_claim_gets_a_prebound_host_path_volume(tmp_path):
    claim = {"metadata": {"name": "runs", "namespace": "team", "uid": "u-1"},
             "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "fast",
                      "resources": {"requests": {"storage": "5Gi"}}},
             "status": {"phase": "Pending"}}
    assert volumes.needs_volume(claim)
    directory = volumes.host_dir(tmp_path, "team", "runs")
    volume = volumes.persistent_volume_for(claim, host_dir=directory)

    assert volume["spec"]["claimRef"]["uid"] == "u-1"
    assert volume["spec"]["storageClassName"] == "fast"
    assert volume["spec"]["capacity"] == {"storage": "5Gi"}
    assert volume["spec"]["hostPath"]["path"] == str(tmp_path / "team" / "runs")
    assert pathlib.Path(directory).stat().st_mode & 0o777 == 0o777  # a non-root trainer writes there
    bound = {**claim, "spec": {**claim["spec"], "volumeName": "x"}, "status": {"phase": "Bound"}}
    assert not volumes.needs_volume(bound)


def test_node_lock_refuses_a_second_holder_and_waits_when_asked(tmp_path, monkeypatch):
    import threading

    from localcluster.node import NodeError, NodeLock

    monkeypatch.setenv("FINETUNE_LOCALCLUSTER_CACHE", str(tmp_path))
    first = NodeLock()
    first.acquire()
    second = NodeLock()
    with pytest.raises(NodeError, match=f"pid {os.getpid()}"):
        second.acquire(wait_seconds=0)
    released = threading.Event()

    def release_later():
        released.wait()
        first.release()

    thread = threading.Thread(target=release_later)
    thread.start()
    released.set()
    second.acquire(wait_seconds=30)  # returns once the first holder lets go
    thread.join()
    assert (tmp_path / "node" / "lock").read_text() == f"pid {os.getpid()}\n"
    second.release()


def test_a_node_refused_the_lock_cleans_nothing_of_the_node_that_holds_it(tmp_path, monkeypatch):
    from localcluster.node import NodeError, NodeLock, RealNode

    monkeypatch.setenv("FINETUNE_LOCALCLUSTER_CACHE", str(tmp_path))
    monkeypatch.delenv("FINETUNE_NODE_LOCK_WAIT_SECONDS", raising=False)  # refuse at once
    cleaned = []
    monkeypatch.setattr(node, "clean_machine", lambda **kwargs: cleaned.append(kwargs))
    holder = NodeLock()
    holder.acquire()
    second = RealNode(name="n", gpus=0, labels={}, bin_dir=tmp_path, state_dir=tmp_path, processes=None,
                      pki_dir=tmp_path, kubeconfig_for=None, free_port=None, log=lambda *_: None)
    with pytest.raises(NodeError, match="another local cluster"):
        second.prepare()
    second.stop()  # as Cluster.start does after a failed start
    assert cleaned == []
    holder.release()
