"""spec.podTemplate: one place for the settings of every stage pod, checked as the Pod API would."""

from __future__ import annotations

import pytest

from ftoperator.stageplan import plan
from ftoperator.builders import stage_pod
from ftoperator.validation import parse_spec, validate_spec


def typed(raw):
    spec, errors = parse_spec(raw)
    assert not errors, errors
    return spec


def errors_of(raw):
    _, errors = validate_spec(raw, max_gpus_per_stage=8)
    return {e.field: e.message for e in errors}


TEMPLATE = {
    "labels": {"kueue.x-k8s.io/queue-name": "team-a-queue", "team": "nlp"},
    "annotations": {"example.com/cost-center": "42"},
    "imagePullSecrets": [{"name": "regcred"}],
    "env": [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "token"}}},
            {"name": "HF_HOME", "value": "/models-cache"}],
    "envFrom": [{"secretRef": {"name": "wandb"}, "prefix": "WANDB_"}, {"configMapRef": {"name": "settings"}}],
    "nodeSelector": {"pool": "a100"},
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
        {"weight": 50, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname",
                                           "labelSelector": {"matchLabels": {"app": "inference"}}}}]}},
    "priorityClassName": "batch-high",
    "schedulerName": "volcano",
    "runtimeClassName": "nvidia",
    "volumes": [{"name": "models-cache", "persistentVolumeClaim": {"claimName": "hf-cache"}}],
    "volumeMounts": [{"name": "models-cache", "mountPath": "/models-cache"}],
    "acceleratorResource": "amd.com/gpu",
    "extraResources": {"rdma/hca_shared_devices_a": 1},
    "terminationGracePeriodSeconds": 300,
}


def test_every_field_of_the_template_reaches_every_stage_pod(spec, run, config):
    spec["podTemplate"] = TEMPLATE
    for stage in plan(typed(spec)).stages:
        pod = stage_pod(typed(spec), run=run, stage=stage, attempt=1, config=config)
        meta, pod_spec = pod["metadata"], pod["spec"]
        container = pod_spec["containers"][0]
        assert meta["labels"]["kueue.x-k8s.io/queue-name"] == "team-a-queue" and meta["labels"]["team"] == "nlp"
        assert meta["labels"]["finetune.dev/stage"] == stage
        assert meta["annotations"]["example.com/cost-center"] == "42"
        assert meta["annotations"]["prometheus.io/scrape"] == "true"
        assert pod_spec["imagePullSecrets"] == [{"name": "regcred"}]
        env = {e["name"]: e for e in container["env"]}
        assert env["HF_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "hf-token", "key": "token"}}
        assert [e["name"] for e in container["env"]].count("HF_HOME") == 1  # the user's replaces the default
        assert env["HF_HOME"]["value"] == "/models-cache"
        assert container["envFrom"] == [{"prefix": "WANDB_", "secretRef": {"name": "wandb"}},
                                        {"configMapRef": {"name": "settings"}}]
        assert pod_spec["nodeSelector"] == {"pool": "a100"}
        assert pod_spec["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        assert pod_spec["affinity"] == TEMPLATE["affinity"]
        assert pod_spec["priorityClassName"] == "batch-high"
        assert pod_spec["schedulerName"] == "volcano"
        assert pod_spec["runtimeClassName"] == "nvidia"
        assert pod_spec["terminationGracePeriodSeconds"] == 300
        assert {"name": "models-cache", "persistentVolumeClaim": {"claimName": "hf-cache"}} in pod_spec["volumes"]
        assert {"name": "models-cache", "mountPath": "/models-cache"} in container["volumeMounts"]
        assert container["resources"]["limits"] == {"memory": "64Gi", "amd.com/gpu": "1",
                                                    "rdma/hca_shared_devices_a": "1"}
        assert container["resources"]["requests"] == container["resources"]["limits"]


def test_without_a_template_the_accelerator_is_nvidia_and_nothing_extra_is_set(spec, run, config):
    pod = stage_pod(typed(spec), run=run, stage="sft", attempt=1, config=config)
    assert pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    for field in ("imagePullSecrets", "affinity", "priorityClassName", "schedulerName", "runtimeClassName",
                  "terminationGracePeriodSeconds", "nodeSelector", "tolerations"):
        assert field not in pod["spec"]
    assert "envFrom" not in pod["spec"]["containers"][0]


def test_a_mig_profile_can_be_the_accelerator(spec, run, config):
    spec["podTemplate"] = {"acceleratorResource": "nvidia.com/mig-1g.10gb"}
    pod = stage_pod(typed(spec), run=run, stage="sft", attempt=1, config=config)
    assert pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/mig-1g.10gb"] == "1"


def test_deprecated_top_level_node_selector_and_tolerations_still_apply_merged_with_the_template(spec, run, config):
    spec["nodeSelector"] = {"zone": "a"}
    spec["tolerations"] = [{"key": "old", "operator": "Exists"}]
    spec["podTemplate"] = {"nodeSelector": {"pool": "gpu"}, "tolerations": [{"key": "new", "operator": "Exists"}]}
    pod = stage_pod(typed(spec), run=run, stage="sft", attempt=1, config=config)
    assert pod["spec"]["nodeSelector"] == {"zone": "a", "pool": "gpu"}
    assert [t["key"] for t in pod["spec"]["tolerations"]] == ["new", "old"]


@pytest.mark.parametrize("template, field, expected", [
    ({"labels": {"finetune.dev/run": "x"}}, "spec.podTemplate.labels", "set by the operator"),
    ({"labels": {"app.kubernetes.io/name": "x"}}, "spec.podTemplate.labels", "set by the operator"),
    ({"labels": {"bad key!": "x"}}, "spec.podTemplate.labels", "key 'bad key!'"),
    ({"env": [{"name": "POD_NAME", "value": "x"}]}, "spec.podTemplate.env[0].name", "set by the operator"),
    ({"env": [{"name": "1X", "value": "x"}]}, "spec.podTemplate.env[0].name", "not a valid variable name"),
    ({"env": [{"name": "A", "value": "x", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]},
     "spec.podTemplate.env[0]", "not both"),
    ({"env": [{"name": "A", "valueFrom": {}}]}, "spec.podTemplate.env[0].valueFrom", "exactly one"),
    ({"envFrom": [{"prefix": "X_"}]}, "spec.podTemplate.envFrom[0]", "exactly one of secretRef"),
    ({"imagePullSecrets": [{"name": "Reg_Cred"}]}, "spec.podTemplate.imagePullSecrets[0].name", "DNS subdomain"),
    ({"volumes": [{"name": "x", "hostPath": {"path": "/"}}]}, "spec.podTemplate.volumes[0].hostPath",
     "Extra inputs are not permitted"),
    ({"volumes": [{"name": "x"}]}, "spec.podTemplate.volumes[0]", "exactly one of configMap"),
    ({"volumes": [{"name": "finetune-x", "emptyDir": {}}]}, "spec.podTemplate.volumes[0].name", "operator's"),
    ({"volumes": [{"name": "y", "persistentVolumeClaim": {"claimName": "runs"}}]},
     "spec.podTemplate.volumes[0].persistentVolumeClaim.claimName", "artifacts claim"),
    ({"volumeMounts": [{"name": "nope", "mountPath": "/x"}]}, "spec.podTemplate.volumeMounts[0].name",
     "not in spec.podTemplate.volumes"),
    ({"volumes": [{"name": "v", "emptyDir": {}}], "volumeMounts": [{"name": "v", "mountPath": "/artifacts/x"}]},
     "spec.podTemplate.volumeMounts[0].mountPath", "overlaps /artifacts"),
    ({"volumes": [{"name": "v", "emptyDir": {}}], "volumeMounts": [{"name": "v", "mountPath": "/"}]},
     "spec.podTemplate.volumeMounts[0].mountPath", "overlaps"),
    ({"volumes": [{"name": "v", "emptyDir": {}}], "volumeMounts": [{"name": "v", "mountPath": "relative"}]},
     "spec.podTemplate.volumeMounts[0].mountPath", "absolute"),
    ({"acceleratorResource": "gpu"}, "spec.podTemplate.acceleratorResource", "extended resource name"),
    ({"acceleratorResource": "kubernetes.io/gpu"}, "spec.podTemplate.acceleratorResource", "spec.resources"),
    ({"extraResources": {"rdma/hca": "0.5"}}, "spec.podTemplate.extraResources", "whole number"),
    ({"extraResources": {"nvidia.com/gpu": 1}}, "spec.podTemplate.extraResources", "resources.gpus"),
    ({"nodeSelector": {"zone": "b"}}, "spec.podTemplate.nodeSelector", "contradicts spec.nodeSelector"),
    ({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "a", "operator": "In"}]}]}}}},
     "spec.podTemplate.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0]"
     ".matchExpressions[0]", "at least one value"),
    ({"terminationGracePeriodSeconds": -1}, "spec.podTemplate.terminationGracePeriodSeconds", "greater than"),
    ({"priorityClassName": "High"}, "spec.podTemplate.priorityClassName", "DNS subdomain"),
])
def test_template_values_the_pod_api_or_the_operator_would_refuse_are_rejected_naming_the_field(
        spec, template, field, expected):
    spec["nodeSelector"] = {"zone": "a"}
    spec["podTemplate"] = template
    errors = errors_of(spec)
    assert field in errors, errors
    assert expected in errors[field]


def test_a_cache_volume_below_tmp_is_allowed(spec):
    spec["podTemplate"] = {"volumes": [{"name": "hf", "persistentVolumeClaim": {"claimName": "hf-cache"}}],
                           "volumeMounts": [{"name": "hf", "mountPath": "/tmp/.cache/huggingface"}]}
    assert errors_of(spec) == {}
