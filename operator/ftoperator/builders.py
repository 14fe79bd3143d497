"""Pure builders of the objects a run owns: stage pods, their StageJob ConfigMaps, and the
per-run ServiceAccount, Role, RoleBinding and progress ConfigMap.

Paths inside a stage pod:

* ``/etc/finetune/job.yaml`` -- the StageJob the trainer reads (ConfigMap ``<run>-<stage>-job``);
* ``/artifacts/<namespace>/<run>/<stage>`` -- the stage's output directory, read-write: the only
  part of the artifacts PVC the pod can write (a ``subPath`` mount), so no run can overwrite or
  delete another's models or checkpoints, and no stage its predecessors'. The final model goes to
  ``.../final``;
* ``/artifacts/<path>`` for each input on the artifacts PVC (the previous stages' ``final``, or a
  ``pvc://<artifacts claim>/<path>`` URI) -- that path alone, read-only;
* ``/data/<claim>`` -- every other PVC holding one of the stage's inputs (its model and its dataset,
  as ``stageplan`` says), read-only;
* ``/tmp`` (HOME and caches) and ``/dev/shm`` (memory-backed) -- emptyDirs: the root filesystem is
  read-only.

Every stage pod meets the Pod Security Standards "restricted" profile: it runs as the trainer
image's non-root user (``TRAINER_UID``), with seccomp RuntimeDefault, no capabilities and no
privilege escalation; ``fsGroup`` makes freshly provisioned volumes writable by that user.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from ftoperator import API_VERSION, GROUP, KIND
from ftoperator import naming, stageplan
from ftoperator.api import FineTuneRunSpec, ResourcesSpec, effective_resources, trainer_processes
from ftoperator.naming import ARTIFACTS_MOUNT, CONFIG_DIR, DATA_MOUNT_ROOT, SHM_DIR, TERMINATION_LOG, TMP_DIR
from ftoperator.config import OperatorConfig
from trainer.multinode import PROGRESS_TIMEOUT_ENV
from trainer.config import (
    EXPECTED_GPUS_ENV, DataPaths, DPOConfig, GRPOConfig, PPOConfig, ReportingConfig, RewardConfig, SFTConfig,
    StageJob,
)

JOB_FILE = "job.yaml"
TRAINER_CONTAINER = naming.TRAINER_CONTAINER
TRAINER_UID = 65532
"""The trainer image's USER (uid and gid; tests/chart/test_dockerfile.py holds the Dockerfile to it).
Stage pods run as it, and fsGroup gives it write access to new volumes."""
SHM_GIB_PER_PROCESS = 1
"""Size limit of the memory-backed /dev/shm per trainer process (DataLoader workers, NCCL); its use
counts against the pod's memory limit."""
# Defaults for a read-only root filesystem, set unless podTemplate.env sets them: caches under /tmp.
CACHE_ENV = {
    "HOME": TMP_DIR,
    "XDG_CACHE_HOME": f"{TMP_DIR}/.cache",
    "HF_HOME": f"{TMP_DIR}/.cache/huggingface",
    "PYTHONDONTWRITEBYTECODE": "1",
}
VOLUME_CONFIG = "finetune-config"
VOLUME_ARTIFACTS = "finetune-artifacts"
VOLUME_TMP = "finetune-tmp"
VOLUME_SHM = "finetune-shm"
_STAGE_CONFIG_CLASSES = {"sft": SFTConfig, "reward": RewardConfig, "ppo": PPOConfig, "grpo": GRPOConfig,
                         "dpo": DPOConfig}
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


def _step(spec: FineTuneRunSpec, stage: str) -> stageplan.Step:
    """The stage's inputs from the plan; KeyError for a stage that does not run."""
    return stageplan.plan(spec).step(stage)


def _input_model(spec: FineTuneRunSpec, run: RunRef, stage: str) -> ResolvedUri:
    source = _step(spec, stage).model_from
    if source is not None:
        return ResolvedUri(f"{stage_output_dir(run, source)}/final", None)
    return resolve_uri(spec.model.source, artifacts_claim=spec.artifacts.pvc)


def _dataset(spec: FineTuneRunSpec, stage: str) -> str | None:
    """The URI of the one dataset the stage reads."""
    return getattr(spec.data, _step(spec, stage).dataset)


def _claims(spec: FineTuneRunSpec, run: RunRef, stage: str) -> list[str]:
    """Read-only claims the stage pod mounts, in a stable order: its model's and its dataset's."""
    uris = [_input_model(spec, run, stage)]
    dataset = _dataset(spec, stage)
    if dataset is not None:
        uris.append(resolve_uri(dataset, artifacts_claim=spec.artifacts.pvc))
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


def feedback_rounds(spec: FineTuneRunSpec) -> int:
    """Human-feedback rounds the run's online stage opens (0 without spec.humanFeedback or an online stage)."""
    online = next((s for s in stageplan.ONLINE_STAGES if getattr(spec.stages, s) is not None), None)
    if spec.human_feedback is None or online is None:
        return 0
    return max(0, spec.human_feedback.rounds(getattr(spec.stages, online).steps))


def stage_job(spec: FineTuneRunSpec, *, run: RunRef, stage: str, config: OperatorConfig) -> StageJob:
    """The file the trainer reads for ``stage`` of this run."""
    def resolve(uri: str | None) -> str | None:
        return None if uri is None else resolve_uri(uri, artifacts_claim=spec.artifacts.pvc).path

    step = _step(spec, stage)
    reward_model = None
    if step.reward_model_from is not None:
        reward_model = f"{stage_output_dir(run, step.reward_model_from)}/final"
    return StageJob(
        stage=stage,
        run_uid=run.uid,  # outputs of a deleted run of the same name are never reused (trainer.outputs)
        model=_input_model(spec, run, stage).path,
        reward_model=reward_model,
        output_dir=stage_output_dir(run, stage),
        data=DataPaths(**{step.dataset: resolve(_dataset(spec, stage))}),  # its own dataset only
        # Every stage's settings: the online stages read reward.functions beside their own.
        sft=_stage_config(spec, "sft"),
        reward=_stage_config(spec, "reward"),
        ppo=_stage_config(spec, "ppo"),
        grpo=_stage_config(spec, "grpo"),
        dpo=_stage_config(spec, "dpo"),
        reporting=ReportingConfig(
            metrics_port=config.trainer_metrics_port,
            termination_log_path=TERMINATION_LOG,
            progress_config_map=naming.progress_config_map_name(run.name),
            history_config_map=naming.history_config_map_name(run.name),
            report_interval_seconds=config.report_interval_seconds,
            feedback_config_maps=[naming.feedback_config_map_name(run.name, r)
                                  for r in range(1, feedback_rounds(spec) + 1)] if stage in stageplan.ONLINE_STAGES else [],
        ),
        # Only runs with human-feedback rounds carry these, so every other run's job file is unchanged.
        human_feedback=spec.human_feedback if stage in ("reward", *stageplan.ONLINE_STAGES) else None,
        run_name=run.name if spec.human_feedback is not None else None,
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


def _container_resources(resources: ResourcesSpec, *, accelerator: str,
                         extra: dict[str, str]) -> dict[str, Any]:
    amounts: dict[str, str] = {}
    if resources.cpu is not None:
        amounts["cpu"] = resources.cpu
    if resources.memory is not None:
        amounts["memory"] = resources.memory
    if resources.gpus:
        amounts[accelerator] = str(resources.gpus)
    amounts.update(extra)
    return {"requests": dict(amounts), "limits": dict(amounts)} if amounts else {}


def pod_security_context() -> dict[str, Any]:
    """Pod-level securityContext: Pod Security "restricted", as the trainer image's user."""
    return {
        "runAsNonRoot": True,
        "runAsUser": TRAINER_UID,
        "runAsGroup": TRAINER_UID,
        # New volumes (a fresh PVC, the subPath directories kubelet creates) become group-writable
        # by the trainer; OnRootMismatch skips the recursive chown of a large PVC already right.
        "fsGroup": TRAINER_UID,
        "fsGroupChangePolicy": "OnRootMismatch",
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context() -> dict[str, Any]:
    """Container-level securityContext: nothing beyond what an unprivileged process needs."""
    return {
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }


def _artifacts_inputs(job: StageJob) -> list[str]:
    """Paths under /artifacts the stage reads (previous stages' models, URIs on the artifacts claim)."""
    candidates = [job.model, job.reward_model, job.data.sft, job.data.preferences, job.data.prompts]
    inputs: list[str] = []
    for path in candidates:
        if path and path.startswith(f"{ARTIFACTS_MOUNT}/") and path not in inputs:
            inputs.append(path)
    return inputs


def _artifacts_mounts(job: StageJob) -> list[dict[str, Any]]:
    """The stage's own output directory read-write, each input on the artifacts claim read-only.

    subPath mounts: the pod never sees the claim's root, so it cannot reach other runs' outputs
    (kubelet creates a missing output directory; with fsGroup it is writable by the trainer).
    """
    def sub_path(path: str) -> str:
        return path.removeprefix(f"{ARTIFACTS_MOUNT}/")

    mounts = [{"name": VOLUME_ARTIFACTS, "mountPath": job.output_dir, "subPath": sub_path(job.output_dir)}]
    for path in _artifacts_inputs(job):
        mounts.append({"name": VOLUME_ARTIFACTS, "mountPath": path, "subPath": sub_path(path), "readOnly": True})
    return mounts


def trainer_command(stage: str, gpus: int) -> list[str]:
    """``python -m trainer`` for one process, ``accelerate launch`` with one process per GPU above one."""
    args = ["-m", "trainer", "--stage", stage, "--config", f"{CONFIG_DIR}/{JOB_FILE}"]
    if trainer_processes(gpus) > 1:
        return ["accelerate", "launch", "--num_processes", str(gpus), *args]
    return ["python", *args]


def stage_pod(
    spec: FineTuneRunSpec, *, run: RunRef, stage: str, attempt: int, config: OperatorConfig
) -> dict[str, Any]:
    """The pod of one attempt of one stage. restartPolicy Never: the operator does the retries.

    spec.podTemplate is applied on top of what the operator needs; validation has already
    refused anything in it that would clash (reserved labels, env names, volume names and paths).
    """
    name = naming.pod_name(run.name, stage, attempt)
    template = spec.pod_template
    resources = effective_resources(spec, stage)
    processes = trainer_processes(resources.gpus)
    claims = _claims(spec, run, stage)
    job = stage_job(spec, run=run, stage=stage, config=config)
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
    if spec.distributed.progress_timeout_seconds is not None:  # the trainer's watchdog (trainer/watchdog.py)
        env.append({"name": PROGRESS_TIMEOUT_ENV, "value": str(spec.distributed.progress_timeout_seconds)})
    user_env = [var.model_dump(mode="json", by_alias=True, exclude_none=True) for var in template.env]
    user_names = {var["name"] for var in user_env}
    env += [{"name": key, "value": value} for key, value in CACHE_ENV.items() if key not in user_names]
    if not user_names & {"HF_HOME", "HF_HUB_CACHE"}:  # hf:// downloads on the artifacts volume: retries reuse them
        env.append({"name": "HF_HUB_CACHE", "value": f"{stage_output_dir(run, stage)}/hf-cache"})
    env = [var for var in env if var["name"] not in user_names] + user_env
    if config.stage_command_override is not None:
        command = ["/bin/sh", "-c", config.stage_command_override]
    else:
        command = trainer_command(stage, resources.gpus or 0)

    mounts = [
        {"name": VOLUME_CONFIG, "mountPath": CONFIG_DIR, "readOnly": True},
        *_artifacts_mounts(job),
    ]
    volumes: list[dict[str, Any]] = [
        {"name": VOLUME_CONFIG,
         "configMap": {"name": naming.stage_config_map_name(run.name, stage)}},
        {"name": VOLUME_ARTIFACTS, "persistentVolumeClaim": {"claimName": spec.artifacts.pvc}},
    ]
    for index, claim in enumerate(claims):
        volume = f"{naming.OPERATOR_VOLUME_PREFIX}data-{index}"
        mounts.append({"name": volume, "mountPath": f"{DATA_MOUNT_ROOT}/{claim}", "readOnly": True})
        volumes.append({"name": volume, "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
    mounts += [{"name": VOLUME_TMP, "mountPath": TMP_DIR}, {"name": VOLUME_SHM, "mountPath": SHM_DIR}]
    volumes += [
        {"name": VOLUME_TMP, "emptyDir": {}},
        {"name": VOLUME_SHM, "emptyDir": {"medium": "Memory", "sizeLimit": f"{SHM_GIB_PER_PROCESS * processes}Gi"}},
    ]
    mounts += [m.model_dump(mode="json", by_alias=True, exclude_none=True) for m in template.volume_mounts]
    volumes += [v.model_dump(mode="json", by_alias=True, exclude_none=True, exclude_defaults=True)
                for v in template.volumes]

    container: dict[str, Any] = {
        "name": TRAINER_CONTAINER,
        "image": image,
        "command": command,
        "env": env,
        "volumeMounts": mounts,
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": container_security_context(),
    }
    if template.env_from:
        container["envFrom"] = [source.model_dump(mode="json", by_alias=True, exclude_none=True)
                                for source in template.env_from]
    annotations: dict[str, str] = {}
    if config.trainer_metrics_port is not None:
        container["ports"] = [{"name": "metrics", "containerPort": config.trainer_metrics_port,
                               "protocol": "TCP"}]
        annotations = {"prometheus.io/scrape": "true", "prometheus.io/port": str(config.trainer_metrics_port),
                       "prometheus.io/path": "/metrics"}
    annotations = {**annotations, **template.annotations}
    container_resources = _container_resources(resources, accelerator=template.accelerator_resource,
                                               extra=template.extra_resources)
    if container_resources:
        container["resources"] = container_resources

    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "serviceAccountName": naming.trainer_service_account_name(run.name),
        "securityContext": pod_security_context(),
        "containers": [container],
        "volumes": volumes,
    }
    node_selector = spec.merged_node_selector()
    if node_selector:
        pod_spec["nodeSelector"] = node_selector
    tolerations = spec.merged_tolerations()
    if tolerations:
        pod_spec["tolerations"] = [t.model_dump(mode="json", by_alias=True, exclude_none=True) for t in tolerations]
    if template.affinity is not None:
        pod_spec["affinity"] = template.affinity.model_dump(mode="json", by_alias=True, exclude_none=True,
                                                            exclude_defaults=True)
    if template.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": ref.name} for ref in template.image_pull_secrets]
    for field, key in (("priority_class_name", "priorityClassName"), ("scheduler_name", "schedulerName"),
                       ("runtime_class_name", "runtimeClassName"),
                       ("termination_grace_period_seconds", "terminationGracePeriodSeconds")):
        value = getattr(template, field)
        if value is not None:
            pod_spec[key] = value
    labels = {**template.labels, **naming.pod_labels(run.name, stage, attempt)}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": _metadata(run, name, labels=labels, annotations=annotations),
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


def history_config_map(run: RunRef) -> dict[str, Any]:
    """The ConfigMap the trainer keeps the run's bounded metric history in, for the console (docs/console.md).

    Not the progress ConfigMap: the operator watches that one and need not receive the history."""
    labels = {**naming.run_labels(run.name), naming.LABEL_COMPONENT: naming.COMPONENT_HISTORY}
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(run, naming.history_config_map_name(run.name), labels=labels),
        "data": {},
    }


def feedback_config_map(run: RunRef, round_: int) -> dict[str, Any]:
    """The ConfigMap the online stage writes human-feedback round ``round_``'s candidates into (empty until then).

    Created by the operator because a Role cannot grant ``create`` by name; the trainer patches it."""
    labels = {**naming.run_labels(run.name), naming.LABEL_COMPONENT: naming.COMPONENT_FEEDBACK}
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(run, naming.feedback_config_map_name(run.name, round_), labels=labels),
        "data": {},
    }


def trainer_access(run: RunRef, *, feedback_rounds: int = 0) -> list[dict[str, Any]]:
    """ServiceAccount, Role and RoleBinding that let the run's pods change only its progress and history
    ConfigMaps -- and, with ``feedback_rounds`` human-feedback rounds, the rounds' ConfigMaps by name and
    ``list`` PreferenceLabels (the reward stage reads the labels it retrains on)."""
    name = naming.trainer_service_account_name(run.name)
    names = [naming.progress_config_map_name(run.name), naming.history_config_map_name(run.name)]
    names += [naming.feedback_config_map_name(run.name, r) for r in range(1, feedback_rounds + 1)]
    rules: list[dict[str, Any]] = [{
        "apiGroups": [""],
        "resources": ["configmaps"],
        "resourceNames": names,
        "verbs": ["get", "patch", "update"],
    }]
    if feedback_rounds:
        rules.append({"apiGroups": [GROUP], "resources": ["preferencelabels"], "verbs": ["list"]})
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _metadata(run, name)},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": _metadata(run, name),
            "rules": rules,
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": _metadata(run, name),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": run.namespace}],
        },
    ]


def run_infrastructure(run: RunRef, *, feedback_rounds: int = 0) -> list[dict[str, Any]]:
    """Everything created once when a run starts, in creation order (``feedback_rounds``: the human-feedback
    rounds of spec.humanFeedback, each with its ConfigMap)."""
    return [*trainer_access(run, feedback_rounds=feedback_rounds), progress_config_map(run), history_config_map(run),
            *(feedback_config_map(run, r) for r in range(1, feedback_rounds + 1))]
