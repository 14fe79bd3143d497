"""Pure builders of the objects a run owns: stage pods, their StageJob ConfigMaps, and the
per-run ServiceAccount, Role, RoleBinding and progress ConfigMap.

Paths inside a stage pod:

* ``/etc/finetune/job.yaml`` -- the StageJob the trainer reads (ConfigMap ``<run>-<stage>-job``);
* ``/artifacts`` -- the artifacts PVC, read-write; stage outputs go to
  ``/artifacts/<namespace>/<run>/<stage>`` and the final model to ``.../final``;
* ``/data/<claim>`` -- every other PVC named by a ``pvc://<claim>/<path>`` URI, read-only.
  A URI on the artifacts claim itself is read through ``/artifacts`` (one volume per claim).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from ftoperator import API_VERSION, KIND
from ftoperator import naming
from ftoperator.api import FineTuneRunSpec, ResourcesSpec, effective_resources, trainer_processes
from ftoperator.config import OperatorConfig
from ftoperator.validation import stage_enabled, trains_reward_model
from trainer.config import EXPECTED_GPUS_ENV, DataPaths, PPOConfig, ReportingConfig, RewardConfig, SFTConfig, StageJob

CONFIG_DIR = "/etc/finetune"
JOB_FILE = "job.yaml"
ARTIFACTS_MOUNT = "/artifacts"
DATA_MOUNT_ROOT = "/data"
TERMINATION_LOG = "/dev/termination-log"
TRAINER_CONTAINER = naming.TRAINER_CONTAINER
GPU_RESOURCE = "nvidia.com/gpu"
_STAGE_CONFIG_CLASSES = {"sft": SFTConfig, "reward": RewardConfig, "ppo": PPOConfig}
_CONTROL_FIELDS = {"enabled", "resources"}


@dataclass(frozen=True)
class RunRef:
    """The identity of a FineTuneRun that children refer to."""

    name: str
    namespace: str
    uid: str
    generation: int = 1


def owner_reference(run: RunRef) -> dict[str, Any]:
    """Controller owner reference: children are garbage-collected with the run."""
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": run.name,
        "uid": run.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(run: RunRef, name: str, *, labels: dict[str, str] | None = None,
              annotations: dict[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "namespace": run.namespace,
        "labels": labels if labels is not None else naming.run_labels(run.name),
        "ownerReferences": [owner_reference(run)],
    }
    if annotations:
        meta["annotations"] = annotations
    return meta


# ----------------------------------------------------------------------------- paths


@dataclass(frozen=True)
class ResolvedUri:
    path: str
    """Where the file or directory is seen inside the pod (or an hf:// URI, passed through)."""
    claim: str | None
    """The read-only PVC to mount for it, if any."""


def resolve_uri(uri: str, *, artifacts_claim: str) -> ResolvedUri:
    """Map ``pvc://claim/path`` to its path in the pod; hf:// URIs and image paths pass through."""
    if not uri.startswith("pvc://"):
        return ResolvedUri(uri, None)
    claim, _, rest = uri.removeprefix("pvc://").partition("/")
    rest = rest.strip("/")
    if claim == artifacts_claim:
        return ResolvedUri(f"{ARTIFACTS_MOUNT}/{rest}".rstrip("/"), None)
    return ResolvedUri(f"{DATA_MOUNT_ROOT}/{claim}/{rest}".rstrip("/"), claim)


def stage_output_dir(run: RunRef, stage: str) -> str:
    """The stage's output directory inside the pod; a retry reuses it and resumes."""
    return f"{ARTIFACTS_MOUNT}/{run.namespace}/{run.name}/{stage}"


def stage_artifact_uri(spec: FineTuneRunSpec, run: RunRef, stage: str) -> str:
    """Where the stage's final model is, as a URI a user (or another run) can use."""
    return f"pvc://{spec.artifacts.pvc}/{run.namespace}/{run.name}/{stage}/final"


def _input_model(spec: FineTuneRunSpec, run: RunRef, stage: str) -> ResolvedUri:
    if stage != "sft" and stage_enabled(spec, "sft"):
        return ResolvedUri(f"{stage_output_dir(run, 'sft')}/final", None)
    return resolve_uri(spec.model.source, artifacts_claim=spec.artifacts.pvc)


def _claims(spec: FineTuneRunSpec, run: RunRef, stage: str) -> list[str]:
    """Read-only claims the stage pod mounts, in a stable order."""
    uris = [_input_model(spec, run, stage)]
    for uri in (spec.data.sft, spec.data.preferences, spec.data.prompts):
        if uri is not None:
            uris.append(resolve_uri(uri, artifacts_claim=spec.artifacts.pvc))
    claims: list[str] = []
    for resolved in uris:
        if resolved.claim is not None and resolved.claim not in claims:
            claims.append(resolved.claim)
    return claims


# ----------------------------------------------------------------------------- StageJob


def _stage_config(spec: FineTuneRunSpec, stage: str) -> Any:
    settings = getattr(spec.stages, stage)
    cls = _STAGE_CONFIG_CLASSES[stage]
    if settings is None:
        return cls()
    return cls.model_validate(settings.model_dump(exclude=_CONTROL_FIELDS))


def stage_job(spec: FineTuneRunSpec, *, run: RunRef, stage: str, config: OperatorConfig) -> StageJob:
    """The file the trainer reads for ``stage`` of this run."""
    def resolve(uri: str | None) -> str | None:
        return None if uri is None else resolve_uri(uri, artifacts_claim=spec.artifacts.pvc).path

    reward_model = None
    if stage == "ppo" and trains_reward_model(spec):
        reward_model = f"{stage_output_dir(run, 'reward')}/final"
    return StageJob(
        stage=stage,
        model=_input_model(spec, run, stage).path,
        reward_model=reward_model,
        output_dir=stage_output_dir(run, stage),
        data=DataPaths(
            sft=resolve(spec.data.sft),
            preferences=resolve(spec.data.preferences),
            prompts=resolve(spec.data.prompts),
        ),
        sft=_stage_config(spec, "sft"),
        reward=_stage_config(spec, "reward"),
        ppo=_stage_config(spec, "ppo"),
        reporting=ReportingConfig(
            metrics_port=config.trainer_metrics_port,
            termination_log_path=TERMINATION_LOG,
            progress_config_map=naming.progress_config_map_name(run.name),
            report_interval_seconds=config.report_interval_seconds,
        ),
    )


def stage_config_map(spec: FineTuneRunSpec, *, run: RunRef, stage: str, config: OperatorConfig) -> dict[str, Any]:
    """ConfigMap ``<run>-<stage>-job`` holding the StageJob YAML."""
    job = stage_job(spec, run=run, stage=stage, config=config)
    text = yaml.safe_dump(job.model_dump(mode="json", by_alias=True), sort_keys=False)
    labels = {**naming.run_labels(run.name), naming.LABEL_STAGE: stage,
              naming.LABEL_COMPONENT: naming.COMPONENT_STAGE_CONFIG}
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(run, naming.stage_config_map_name(run.name, stage), labels=labels),
        "data": {JOB_FILE: text},
    }


# ----------------------------------------------------------------------------- Pod


def _container_resources(resources: ResourcesSpec) -> dict[str, Any]:
    amounts: dict[str, str] = {}
    if resources.cpu is not None:
        amounts["cpu"] = resources.cpu
    if resources.memory is not None:
        amounts["memory"] = resources.memory
    if resources.gpus:
        amounts[GPU_RESOURCE] = str(resources.gpus)
    return {"requests": dict(amounts), "limits": dict(amounts)} if amounts else {}


def trainer_command(stage: str, gpus: int) -> list[str]:
    """``python -m trainer`` for one process, ``accelerate launch`` with one process per GPU above one."""
    args = ["-m", "trainer", "--stage", stage, "--config", f"{CONFIG_DIR}/{JOB_FILE}"]
    if trainer_processes(gpus) > 1:
        return ["accelerate", "launch", "--num_processes", str(gpus), *args]
    return ["python", *args]


def stage_pod(
    spec: FineTuneRunSpec, *, run: RunRef, stage: str, attempt: int, config: OperatorConfig
) -> dict[str, Any]:
    """The pod of one attempt of one stage. restartPolicy Never: the operator does the retries."""
    name = naming.pod_name(run.name, stage, attempt)
    resources = effective_resources(spec, stage)
    claims = _claims(spec, run, stage)
    image = spec.image or config.trainer_image
    env = [
        {"name": "POD_NAMESPACE", "value": run.namespace},
        {"name": "POD_NAME", "value": name},
        {"name": "FINETUNE_RUN", "value": run.name},
        {"name": "FINETUNE_STAGE", "value": stage},
        {"name": "FINETUNE_ATTEMPT", "value": str(attempt)},
        {"name": "FINETUNE_OUTPUT_DIR", "value": stage_output_dir(run, stage)},
        {"name": EXPECTED_GPUS_ENV, "value": str(resources.gpus or 0)},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    if config.stage_command_override is not None:
        command = ["/bin/sh", "-c", config.stage_command_override]
    else:
        command = trainer_command(stage, resources.gpus or 0)

    mounts = [
        {"name": "stage-config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "artifacts", "mountPath": ARTIFACTS_MOUNT},
    ]
    volumes: list[dict[str, Any]] = [
        {"name": "stage-config",
         "configMap": {"name": naming.stage_config_map_name(run.name, stage)}},
        {"name": "artifacts", "persistentVolumeClaim": {"claimName": spec.artifacts.pvc}},
    ]
    for index, claim in enumerate(claims):
        volume = f"data-{index}"
        mounts.append({"name": volume, "mountPath": f"{DATA_MOUNT_ROOT}/{claim}", "readOnly": True})
        volumes.append({"name": volume, "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})

    container: dict[str, Any] = {
        "name": TRAINER_CONTAINER,
        "image": image,
        "command": command,
        "env": env,
        "volumeMounts": mounts,
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    annotations: dict[str, str] = {}
    if config.trainer_metrics_port is not None:
        container["ports"] = [{"name": "metrics", "containerPort": config.trainer_metrics_port,
                               "protocol": "TCP"}]
        annotations = {"prometheus.io/scrape": "true", "prometheus.io/port": str(config.trainer_metrics_port),
                       "prometheus.io/path": "/metrics"}
    container_resources = _container_resources(resources)
    if container_resources:
        container["resources"] = container_resources

    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "serviceAccountName": naming.trainer_service_account_name(run.name),
        "containers": [container],
        "volumes": volumes,
    }
    if spec.node_selector:
        pod_spec["nodeSelector"] = dict(spec.node_selector)
    if spec.tolerations:
        pod_spec["tolerations"] = [t.model_dump(mode="json", by_alias=True, exclude_none=True)
                                   for t in spec.tolerations]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": _metadata(run, name, labels=naming.pod_labels(run.name, stage, attempt),
                              annotations=annotations),
        "spec": pod_spec,
    }


# ----------------------------------------------------------------------------- per-run access


def progress_config_map(run: RunRef) -> dict[str, Any]:
    """The ConfigMap the trainer reports into; the operator copies it into the run's status."""
    labels = {**naming.run_labels(run.name), naming.LABEL_COMPONENT: naming.COMPONENT_PROGRESS}
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(run, naming.progress_config_map_name(run.name), labels=labels),
        "data": {},
    }


def trainer_access(run: RunRef) -> list[dict[str, Any]]:
    """ServiceAccount, Role and RoleBinding that let the run's pods change only its progress ConfigMap."""
    name = naming.trainer_service_account_name(run.name)
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _metadata(run, name)},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": _metadata(run, name),
            "rules": [{
                "apiGroups": [""],
                "resources": ["configmaps"],
                "resourceNames": [naming.progress_config_map_name(run.name)],
                "verbs": ["get", "patch", "update"],
            }],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": _metadata(run, name),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": run.namespace}],
        },
    ]


def run_infrastructure(run: RunRef) -> list[dict[str, Any]]:
    """Everything created once when a run starts, in creation order."""
    return [*trainer_access(run), progress_config_map(run)]
