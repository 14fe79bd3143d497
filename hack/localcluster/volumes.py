"""PersistentVolumes backed by host directories, provisioned for every claim.

Like rancher's local-path-provisioner, in one thread: each PersistentVolumeClaim
that is Pending without a volume gets a hostPath PersistentVolume at
`<root>/<namespace>/<claim>`, pre-bound to it through `claimRef`; the
controller-manager's PV controller then binds the pair. The directory is
world-writable (mode 0777, as local-path-provisioner does) because hostPath
volumes ignore `fsGroup` and the trainer runs as a non-root uid.

A default StorageClass `local-hostpath` makes claims that name no class work,
as on clusters with a default class. Claims naming another class are served too:
the PV takes the claim's class.
"""

import pathlib
import threading
import time

STORAGE_CLASS = "local-hostpath"
PROVISIONER = "localcluster.finetune.dev/hostpath"


def storage_class() -> dict:
    return {
        "apiVersion": "storage.k8s.io/v1",
        "kind": "StorageClass",
        "metadata": {"name": STORAGE_CLASS,
                     "annotations": {"storageclass.kubernetes.io/is-default-class": "true"}},
        "provisioner": PROVISIONER,
        "reclaimPolicy": "Retain",
        "volumeBindingMode": "Immediate",
    }


def volume_name(claim_uid: str) -> str:
    # By uid, not name: a claim deleted and created again under its name gets a new
    # volume (the old one is Released and kept), on the same directory.
    return f"hostpath-{claim_uid}"


def persistent_volume_for(claim: dict, *, host_dir: pathlib.Path) -> dict:
    """The hostPath PV for a claim (a dict as the API returns it, camelCase)."""
    metadata, spec = claim["metadata"], claim.get("spec") or {}
    requests = ((spec.get("resources") or {}).get("requests") or {})
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": volume_name(metadata["uid"]),
                     "annotations": {"pv.kubernetes.io/provisioned-by": PROVISIONER}},
        "spec": {
            "capacity": {"storage": requests.get("storage", "1Gi")},
            "accessModes": spec.get("accessModes") or ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Retain",
            "storageClassName": spec.get("storageClassName") or "",
            "volumeMode": spec.get("volumeMode") or "Filesystem",
            "hostPath": {"path": str(host_dir), "type": "DirectoryOrCreate"},
            "claimRef": {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                         "namespace": metadata["namespace"], "name": metadata["name"],
                         "uid": metadata["uid"]},
        },
    }


def needs_volume(claim: dict) -> bool:
    return not (claim.get("spec") or {}).get("volumeName") and \
        (claim.get("status") or {}).get("phase", "Pending") == "Pending"


def host_dir(root: pathlib.Path, namespace: str, claim: str) -> pathlib.Path:
    directory = root / namespace / claim
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o777)
    return directory


class HostPathProvisioner:
    """Watches claims and creates their volumes until `stop()`."""

    def __init__(self, *, api_client_factory, root: pathlib.Path, log=print):
        self.api_client_factory = api_client_factory
        self.root = root
        self.log = log
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hostpath-provisioner", daemon=True)

    def start(self) -> None:
        from kubernetes import client

        storage = client.StorageV1Api(self.api_client_factory())
        try:
            storage.create_storage_class(storage_class())
        except client.exceptions.ApiException as exc:
            if exc.status != 409:
                raise
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        from kubernetes import client, watch

        api = self.api_client_factory()
        core = client.CoreV1Api(api)
        while not self._stop.is_set():
            try:
                listing = core.list_persistent_volume_claim_for_all_namespaces()
                for claim in listing.items:
                    self._serve(core, api.sanitize_for_serialization(claim))
                stream = watch.Watch().stream(
                    core.list_persistent_volume_claim_for_all_namespaces,
                    resource_version=listing.metadata.resource_version, timeout_seconds=30)
                for event in stream:
                    if self._stop.is_set():
                        return
                    if event["type"] in ("ADDED", "MODIFIED"):
                        self._serve(core, api.sanitize_for_serialization(event["object"]))
            except Exception as exc:  # the API server restarting must not end the provisioner
                if not self._stop.is_set():
                    self.log(f"[localcluster provisioner] {type(exc).__name__}: {exc}; retrying")
                    time.sleep(1)

    def _serve(self, core, claim: dict) -> None:
        from kubernetes.client.exceptions import ApiException

        if not needs_volume(claim):
            return
        metadata = claim["metadata"]
        directory = host_dir(self.root, metadata["namespace"], metadata["name"])
        try:
            core.create_persistent_volume(persistent_volume_for(claim, host_dir=directory))
        except ApiException as exc:
            if exc.status != 409:
                raise
