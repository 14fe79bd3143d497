"""Stage pods are secure by default (Pod Security "restricted") and one run cannot touch another's data."""

from __future__ import annotations

import copy
import re
import sys
from pathlib import Path

import pytest

from ftoperator.stageplan import plan
from ftoperator.builders import TRAINER_UID, RunRef, stage_pod
from ftoperator.validation import parse_spec

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from podsecurity import RULES, restricted_violations  # noqa: E402

REPO = Path(__file__).resolve().parents[2]

FULL_TEMPLATE = {
    "labels": {"kueue.x-k8s.io/queue-name": "team-a"},
    "annotations": {"example.com/owner": "ml"},
    "imagePullSecrets": [{"name": "regcred"}],
    "env": [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}],
    "envFrom": [{"configMapRef": {"name": "settings"}}],
    "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "gpu.product", "operator": "In", "values": ["H100"]}]}]}}},
    "volumes": [{"name": "hf-cache", "persistentVolumeClaim": {"claimName": "hf-cache"}},
                {"name": "certs", "secret": {"secretName": "ca"}}],
    "volumeMounts": [{"name": "hf-cache", "mountPath": "/tmp/.cache/huggingface"},
                     {"name": "certs", "mountPath": "/etc/ssl/extra", "readOnly": True}],
    "priorityClassName": "training",
    "terminationGracePeriodSeconds": 120,
}


def typed(raw):
    spec, errors = parse_spec(raw)
    assert not errors, errors
    return spec


def all_stage_pods(raw, run, config):
    spec = typed(raw)
    return {stage: stage_pod(spec, run=run, stage=stage, attempt=1, config=config) for stage in plan(spec).stages}


@pytest.mark.parametrize("variant", ["plain", "full-template", "multi-gpu", "cpu-only"])
def test_every_stage_pod_meets_pod_security_restricted(spec, run, config, variant):
    if variant == "full-template":
        spec["podTemplate"] = FULL_TEMPLATE
    elif variant == "multi-gpu":
        spec["resources"] = {"gpus": 4, "memory": "256Gi"}
    elif variant == "cpu-only":
        spec["resources"] = {}
    for stage, pod in all_stage_pods(spec, run, config).items():
        assert restricted_violations(pod["spec"], pod["metadata"].get("annotations")) == [], stage


# One mutation per control of the profile: the checker must see each, or a passing test above proves nothing.
BREAKERS = {
    "HostProcess": lambda p: p["securityContext"].update(windowsOptions={"hostProcess": True}),
    "Host Namespaces": lambda p: p.update(hostPID=True),
    "Privileged Containers": lambda p: p["containers"][0]["securityContext"].update(privileged=True),
    "Capabilities (baseline)": lambda p: p["containers"][0]["securityContext"]["capabilities"].update(
        add=["SYS_ADMIN"]),
    "HostPath Volumes": lambda p: p["volumes"].append({"name": "h", "hostPath": {"path": "/"}}),
    "Host Ports": lambda p: p["containers"][0]["ports"][0].update(hostPort=9400),
    "AppArmor": lambda p: p["securityContext"].update(appArmorProfile={"type": "Unconfined"}),
    "SELinux": lambda p: p["securityContext"].update(seLinuxOptions={"type": "spc_t"}),
    "/proc Mount Type": lambda p: p["containers"][0]["securityContext"].update(procMount="Unmasked"),
    "Seccomp (baseline)": lambda p: p["containers"][0]["securityContext"].update(
        seccompProfile={"type": "Unconfined"}),
    "Sysctls": lambda p: p["securityContext"].update(sysctls=[{"name": "kernel.msgmax", "value": "1"}]),
    "Volume Types": lambda p: p["volumes"].append({"name": "n", "nfs": {"server": "x", "path": "/"}}),
    "Privilege Escalation": lambda p: p["containers"][0]["securityContext"].pop("allowPrivilegeEscalation"),
    "Running as Non-root": lambda p: p["containers"][0]["securityContext"].update(runAsNonRoot=False),
    "Running as Non-root user": lambda p: p["containers"][0]["securityContext"].update(runAsUser=0),
    "Seccomp (restricted)": lambda p: p["securityContext"].pop("seccompProfile"),
    "Capabilities (restricted)": lambda p: p["containers"][0]["securityContext"]["capabilities"].update(
        drop=["NET_RAW"]),
}


def test_the_checker_covers_every_control_of_the_profile():
    assert set(BREAKERS) == set(RULES) and len(RULES) == 17


@pytest.mark.parametrize("rule", sorted(BREAKERS))
def test_the_checker_catches_a_pod_that_breaks_each_control(spec, run, config, rule):
    pod = stage_pod(typed(spec), run=run, stage="ppo", attempt=1, config=config)
    broken = copy.deepcopy(pod["spec"])
    BREAKERS[rule](broken)
    assert restricted_violations(broken, pod["metadata"].get("annotations")), rule


def test_stage_pods_run_as_the_trainer_images_user_with_a_read_only_root_and_writable_scratch(spec, run, config):
    spec["resources"] = {"gpus": 4}
    pod = stage_pod(typed(spec), run=run, stage="ppo", attempt=1, config=config)
    security = pod["spec"]["securityContext"]
    assert (security["runAsUser"], security["runAsGroup"], security["fsGroup"]) == (TRAINER_UID,) * 3
    assert security["runAsNonRoot"] is True
    container = pod["spec"]["containers"][0]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    assert mounts["/tmp"]["emptyDir"] == {}
    # One GiB of memory-backed /dev/shm per trainer process (4 GPUs: 4 processes).
    assert mounts["/dev/shm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "4Gi"}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["HOME"] == "/tmp" and env["HF_HOME"].startswith("/tmp/")


def test_the_trainer_uid_is_the_dockerfiles_user():
    dockerfile = (REPO / "Dockerfile").read_text()
    users = re.findall(r"^USER\s+(\d+):(\d+)\s*$", dockerfile, re.MULTILINE)
    assert users, "Dockerfile: no numeric USER uid:gid (runAsNonRoot needs one)"
    assert set(users) == {(str(TRAINER_UID), str(TRAINER_UID))}


# ----------------------------------------------------------------------------- one run, its own data


def writable_artifacts_paths(pod):
    """(subPath, mountPath) of every read-write mount of the artifacts claim."""
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    found = []
    for mount in pod["spec"]["containers"][0]["volumeMounts"]:
        claim = (volumes[mount["name"]].get("persistentVolumeClaim") or {}).get("claimName")
        if claim == "runs" and not mount.get("readOnly"):
            found.append((mount.get("subPath"), mount["mountPath"]))
    return found


def test_a_stage_pod_can_write_only_its_own_output_directory_of_the_artifacts_claim(spec, run, config):
    for stage, pod in all_stage_pods(spec, run, config).items():
        assert writable_artifacts_paths(pod) == [(f"team-a/demo/{stage}", f"/artifacts/team-a/demo/{stage}")]


def test_two_runs_never_share_a_writable_path(spec, config):
    first = RunRef(name="demo", namespace="team-a", uid="u1")
    second = RunRef(name="demo", namespace="team-b", uid="u2")
    third = RunRef(name="other", namespace="team-a", uid="u3")
    paths = [set(writable_artifacts_paths(pod)) for run in (first, second, third)
             for pod in all_stage_pods(spec, run, config).values()]
    for index, mine in enumerate(paths):
        for other in paths[index + 1:]:
            assert not mine & other


def test_inputs_are_mounted_read_only_and_only_the_input_itself(spec, run, config):
    # PPO reads the SFT and reward models of its run, and a dataset from another run's output.
    spec["data"]["prompts"] = "pvc://runs/team-a/older/prompts.jsonl"
    pod = stage_pod(typed(spec), run=run, stage="ppo", attempt=1, config=config)
    mounts = pod["spec"]["containers"][0]["volumeMounts"]
    inputs = {m["mountPath"]: m for m in mounts if m["mountPath"].startswith("/artifacts/")
              and m["mountPath"] != "/artifacts/team-a/demo/ppo"}
    assert set(inputs) == {"/artifacts/team-a/demo/sft/final", "/artifacts/team-a/demo/reward/final",
                           "/artifacts/team-a/older/prompts.jsonl"}
    assert all(m["readOnly"] and m["subPath"] == path.removeprefix("/artifacts/") for path, m in inputs.items())
    # Its inputs are all on the artifacts claim: the claims of the other stages' data are not mounted.
    assert not [m for m in mounts if m["mountPath"].startswith("/data/")]
    sft = stage_pod(typed(spec), run=run, stage="sft", attempt=1, config=config)
    data = [m for m in sft["spec"]["containers"][0]["volumeMounts"] if m["mountPath"].startswith("/data/")]
    assert {m["mountPath"] for m in data} == {"/data/models", "/data/datasets"}
    assert all(m["readOnly"] for m in data)
    volumes = {v["name"]: v for v in sft["spec"]["volumes"]}
    assert all(volumes[m["name"]]["persistentVolumeClaim"]["readOnly"] for m in data)
    # Nothing mounts the artifacts claim's root.
    assert not [m for m in mounts if m["mountPath"] == "/artifacts" or
                (m["name"] == "finetune-artifacts" and not m.get("subPath"))]
