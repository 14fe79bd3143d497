"""The part of the core/v1 Pod API a FineTuneRun may set on its stage pods: ``spec.podTemplate``.

Each model is the Pod API's own shape (same field names, so a snippet from a
Deployment pastes in) cut down to what a training pod needs, and checked the
way the API server would check it: a value the Pod API refuses would otherwise
be accepted at ``kubectl apply`` and fail much later, at pod creation.

Volumes are limited to the types the Pod Security Standards "restricted"
profile allows (configMap, secret, emptyDir, persistentVolumeClaim, csi), so a
run never asks for a pod that a restricted namespace refuses.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, WithJsonSchema, field_validator, model_validator

from trainer.config import ApiModel

# The Pod API's rules for label keys (qualified names) and values (k8s.io/apimachinery validation).
_NAME_PART = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_DNS_SUBDOMAIN = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
_DNS_LABEL = r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"
_LABEL_VALUE = rf"({_NAME_PART})?"
_ENV_NAME = r"[-._a-zA-Z][-._a-zA-Z0-9]*"
DEFAULT_ACCELERATOR = "nvidia.com/gpu"


def qualified_name_problem(key: str) -> str | None:
    """Why ``key`` is not a valid label key / taint key ([prefix/]name), or None when it is."""
    prefix, slash, name = key.rpartition("/")
    if slash and (not prefix or len(prefix) > 253 or not re.fullmatch(_DNS_SUBDOMAIN, prefix)):
        return f"key {key!r}: the prefix before '/' must be a DNS subdomain (lowercase, e.g. example.com)"
    if not re.fullmatch(_NAME_PART, name):
        return (f"key {key!r}: the name must be at most 63 characters of letters, digits, '-', '_', '.', "
                "starting and ending with a letter or digit")
    return None


def label_value_problem(value: str) -> str | None:
    """Why ``value`` is not a valid label value / taint value, or None when it is."""
    if not re.fullmatch(_LABEL_VALUE, value):
        return (f"value {value!r} must be at most 63 characters of letters, digits, '-', '_', '.', "
                "starting and ending with a letter or digit")
    return None


def _dns_subdomain(value: str) -> str:
    if len(value) > 253 or not re.fullmatch(_DNS_SUBDOMAIN, value):
        raise ValueError(f"{value!r} must be a DNS subdomain: lowercase letters, digits, '-' and '.', "
                         "starting and ending with a letter or digit")
    return value


def _dns_label(value: str) -> str:
    if not re.fullmatch(_DNS_LABEL, value):
        raise ValueError(f"{value!r} must be a DNS label: at most 63 lowercase letters, digits and '-', "
                         "starting and ending with a letter or digit")
    return value


def _labels(labels: dict[str, str]) -> dict[str, str]:
    for key, value in labels.items():
        problem = qualified_name_problem(key) or label_value_problem(value)
        if problem:
            raise ValueError(f"{problem} (in {key}: {value})")
    return labels


def _quantity_to_string(value: Any) -> Any:
    # YAML turns `cpu: 4` into an int; Kubernetes quantities are int-or-string.
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return value


Quantity = Annotated[
    str,
    BeforeValidator(_quantity_to_string),
    WithJsonSchema({"anyOf": [{"type": "integer"}, {"type": "string"}], "x-kubernetes-int-or-string": True}),
]
DnsSubdomain = Annotated[str, BeforeValidator(_dns_subdomain)]
DnsLabel = Annotated[str, BeforeValidator(_dns_label)]
Labels = Annotated[dict[str, str], BeforeValidator(lambda v: _labels(v) if isinstance(v, dict) else v)]


# --------------------------------------------------------------------------- scheduling


class Toleration(ApiModel):
    """A pod toleration, as in the core/v1 Pod API."""

    key: str | None = None
    """Taint key; empty with operator Exists matches every taint."""
    operator: Literal["Exists", "Equal"] | None = None
    """Exists or Equal (the default)."""
    value: str | None = None
    """Taint value for operator Equal."""
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    """Taint effect to match; empty matches all effects."""
    toleration_seconds: int | None = None
    """For NoExecute: how long the pod stays bound after the taint appears."""

    @model_validator(mode="after")
    def _as_the_pod_api_checks(self) -> "Toleration":
        # core/v1 validation.ValidateTolerations: a toleration the Pod API refuses would only fail
        # at pod creation, long after kubectl apply said yes.
        if self.key:
            problem = qualified_name_problem(self.key)
            if problem:
                raise ValueError(problem)
        elif self.operator != "Exists":
            raise ValueError("key: an empty key needs operator Exists (it then tolerates every taint)")
        if self.operator == "Exists" and self.value:
            raise ValueError(f"value {self.value!r} must be empty when operator is Exists (remove value, or use "
                             "operator Equal)")
        if self.operator != "Exists" and self.value:
            problem = label_value_problem(self.value)
            if problem:
                raise ValueError(problem)
        if self.toleration_seconds is not None and self.effect != "NoExecute":
            raise ValueError("tolerationSeconds is only allowed with effect NoExecute")
        return self


def _check_requirement(key: str, operator: str, values: list[str], *, node: bool) -> None:
    problem = qualified_name_problem(key)
    if problem:
        raise ValueError(problem)
    if operator in ("In", "NotIn") and not values:
        raise ValueError(f"operator {operator} needs at least one value")
    if operator in ("Exists", "DoesNotExist") and values:
        raise ValueError(f"operator {operator} takes no values (remove values)")
    if node and operator in ("Gt", "Lt"):
        if len(values) != 1 or not re.fullmatch(r"-?[0-9]+", values[0]):
            raise ValueError(f"operator {operator} takes exactly one integer value")


class NodeSelectorRequirement(ApiModel):
    """A node label (or field) and the values it may take."""

    key: str
    """Label key the requirement applies to."""
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt"]
    """How the node's label relates to values."""
    values: list[str] = Field(default_factory=list)
    """Values for In and NotIn (at least one), one integer for Gt and Lt, none for Exists and DoesNotExist."""

    @model_validator(mode="after")
    def _as_the_pod_api_checks(self) -> "NodeSelectorRequirement":
        _check_requirement(self.key, self.operator, self.values, node=True)
        return self


class NodeSelectorTerm(ApiModel):
    """Requirements a node must all meet (ANDed)."""

    match_expressions: list[NodeSelectorRequirement] = Field(default_factory=list)
    """Requirements on node labels."""
    match_fields: list[NodeSelectorRequirement] = Field(default_factory=list)
    """Requirements on node fields (metadata.name)."""


class NodeSelector(ApiModel):
    """Terms a node must meet; the terms are ORed."""

    node_selector_terms: list[NodeSelectorTerm] = Field(min_length=1)
    """At least one term."""


class PreferredSchedulingTerm(ApiModel):
    """A weighted node preference."""

    weight: int = Field(ge=1, le=100)
    """1-100, added to the score of the nodes that match."""
    preference: NodeSelectorTerm
    """The node selector term."""


class NodeAffinity(ApiModel):
    """Node affinity: which nodes a stage pod may or should run on."""

    required_during_scheduling_ignored_during_execution: NodeSelector | None = None
    """Nodes the pod must run on."""
    preferred_during_scheduling_ignored_during_execution: list[PreferredSchedulingTerm] = Field(default_factory=list)
    """Nodes the scheduler prefers, by weight."""


class LabelSelectorRequirement(ApiModel):
    """A label and the values it may take."""

    key: str
    """Label key."""
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    """How the label relates to values."""
    values: list[str] = Field(default_factory=list)
    """Values for In and NotIn (at least one); none for Exists and DoesNotExist."""

    @model_validator(mode="after")
    def _as_the_pod_api_checks(self) -> "LabelSelectorRequirement":
        _check_requirement(self.key, self.operator, self.values, node=False)
        return self


class LabelSelector(ApiModel):
    """A label query (metav1.LabelSelector); the requirements are ANDed."""

    match_labels: Labels = Field(default_factory=dict)
    """Labels that must all be present with these values."""
    match_expressions: list[LabelSelectorRequirement] = Field(default_factory=list)
    """Further requirements."""


class PodAffinityTerm(ApiModel):
    """Pods (matched by labels) near which, per topology domain, a stage pod should (not) run."""

    label_selector: LabelSelector | None = None
    """Pods this term is about."""
    namespaces: list[str] = Field(default_factory=list)
    """Namespaces of those pods; empty: the run's namespace."""
    namespace_selector: LabelSelector | None = None
    """Namespaces of those pods, by label ({} means all)."""
    topology_key: str
    """Node label defining the domain, e.g. kubernetes.io/hostname or topology.kubernetes.io/zone."""

    @field_validator("topology_key")
    @classmethod
    def _qualified(cls, key: str) -> str:
        problem = qualified_name_problem(key)
        if problem:
            raise ValueError(problem)
        return key


class WeightedPodAffinityTerm(ApiModel):
    """A weighted pod (anti-)affinity preference."""

    weight: int = Field(ge=1, le=100)
    """1-100, added to the score of the nodes that match."""
    pod_affinity_term: PodAffinityTerm
    """The term."""


class PodAffinity(ApiModel):
    """Run near (affinity) or away from (anti-affinity) other pods."""

    required_during_scheduling_ignored_during_execution: list[PodAffinityTerm] = Field(default_factory=list)
    """Terms that must hold."""
    preferred_during_scheduling_ignored_during_execution: list[WeightedPodAffinityTerm] = Field(default_factory=list)
    """Terms the scheduler prefers, by weight."""


class Affinity(ApiModel):
    """Scheduling constraints, as in the core/v1 Pod API."""

    node_affinity: NodeAffinity | None = None
    """Which nodes."""
    pod_affinity: PodAffinity | None = None
    """Near which pods."""
    pod_anti_affinity: PodAffinity | None = None
    """Away from which pods."""


# --------------------------------------------------------------------------- environment


class LocalObjectReference(ApiModel):
    """An object in the run's namespace, by name."""

    name: DnsSubdomain
    """Name of the object."""


class KeySelector(ApiModel):
    """One key of a Secret or ConfigMap in the run's namespace."""

    name: DnsSubdomain
    """Name of the Secret or ConfigMap."""
    key: str = Field(min_length=1)
    """The key."""
    optional: bool | None = None
    """true: the variable is left unset when the object or key is missing (else the pod cannot start)."""


class ObjectFieldSelector(ApiModel):
    """A field of the pod (downward API)."""

    field_path: str
    """e.g. metadata.name, metadata.labels['x'], spec.nodeName, status.podIP."""
    api_version: str | None = None
    """Version of the schema fieldPath is written in; default v1."""


class ResourceFieldSelector(ApiModel):
    """A resource request or limit of the trainer container."""

    resource: str
    """e.g. limits.memory, requests.cpu."""
    container_name: str | None = None
    """Container; default the trainer."""
    divisor: Quantity | None = None
    """Output unit, e.g. 1Mi."""


class EnvVarSource(ApiModel):
    """Where a variable's value comes from: exactly one of the fields."""

    secret_key_ref: KeySelector | None = None
    """A key of a Secret, e.g. {name: hf-token, key: token} for HF_TOKEN."""
    config_map_key_ref: KeySelector | None = None
    """A key of a ConfigMap."""
    field_ref: ObjectFieldSelector | None = None
    """A field of the pod."""
    resource_field_ref: ResourceFieldSelector | None = None
    """A resource of the container."""

    @model_validator(mode="after")
    def _exactly_one(self) -> "EnvVarSource":
        set_ = [name for name in type(self).model_fields if getattr(self, name) is not None]
        if len(set_) != 1:
            raise ValueError("set exactly one of secretKeyRef, configMapKeyRef, fieldRef, resourceFieldRef")
        return self


class EnvVar(ApiModel):
    """An environment variable of the trainer container."""

    name: str
    """Variable name, e.g. HF_TOKEN."""
    value: str | None = None
    """Literal value (do not put secrets here; use valueFrom.secretKeyRef)."""
    value_from: EnvVarSource | None = None
    """Value taken from a Secret, a ConfigMap or the pod."""

    @field_validator("name")
    @classmethod
    def _env_name(cls, name: str) -> str:
        if not re.fullmatch(_ENV_NAME, name):
            raise ValueError(f"{name!r} is not a valid variable name (letters, digits, '_', '-', '.'; "
                             "not starting with a digit)")
        return name

    @model_validator(mode="after")
    def _value_or_value_from(self) -> "EnvVar":
        if self.value is not None and self.value_from is not None:
            raise ValueError(f"{self.name}: set value or valueFrom, not both")
        return self


class EnvSourceReference(ApiModel):
    """A whole Secret or ConfigMap in the run's namespace."""

    name: DnsSubdomain
    """Name of the object."""
    optional: bool | None = None
    """true: the pod starts even when the object is missing."""


class EnvFromSource(ApiModel):
    """Every key of a Secret or ConfigMap as environment variables (exactly one of secretRef, configMapRef)."""

    prefix: str | None = None
    """Prepended to every key."""
    secret_ref: EnvSourceReference | None = None
    """The Secret."""
    config_map_ref: EnvSourceReference | None = None
    """The ConfigMap."""

    @model_validator(mode="after")
    def _exactly_one(self) -> "EnvFromSource":
        if (self.secret_ref is None) == (self.config_map_ref is None):
            raise ValueError("set exactly one of secretRef, configMapRef")
        return self


# --------------------------------------------------------------------------- volumes


class KeyToPath(ApiModel):
    """One key of a Secret or ConfigMap, projected to a file."""

    key: str
    """The key."""
    path: str
    """Relative path of the file (no '..')."""
    mode: int | None = Field(None, ge=0, le=0o777)
    """File mode bits (octal 0400 is 256)."""

    @field_validator("path")
    @classmethod
    def _relative(cls, path: str) -> str:
        if not path or path.startswith("/") or ".." in path.split("/"):
            raise ValueError(f"path {path!r} must be relative and must not contain '..'")
        return path


class ConfigMapVolumeSource(ApiModel):
    """A ConfigMap's keys as files."""

    name: DnsSubdomain
    """Name of the ConfigMap."""
    items: list[KeyToPath] = Field(default_factory=list)
    """Only these keys, at these paths; default: every key, named after it."""
    default_mode: int | None = Field(None, ge=0, le=0o777)
    """File mode bits; default 0644."""
    optional: bool | None = None
    """true: the pod starts without the ConfigMap."""


class SecretVolumeSource(ApiModel):
    """A Secret's keys as files."""

    secret_name: DnsSubdomain
    """Name of the Secret."""
    items: list[KeyToPath] = Field(default_factory=list)
    """Only these keys, at these paths; default: every key, named after it."""
    default_mode: int | None = Field(None, ge=0, le=0o777)
    """File mode bits; default 0644."""
    optional: bool | None = None
    """true: the pod starts without the Secret."""


class EmptyDirVolumeSource(ApiModel):
    """A scratch directory that lives as long as the pod."""

    medium: Literal["", "Memory"] | None = None
    """Memory: a tmpfs, counted against the container's memory limit."""
    size_limit: Quantity | None = None
    """Upper bound, e.g. 100Gi."""


class PersistentVolumeClaimVolumeSource(ApiModel):
    """A PVC in the run's namespace (not the artifacts claim: outputs are mounted per run)."""

    claim_name: DnsSubdomain
    """Name of the claim."""
    read_only: bool | None = None
    """Mount it read-only."""


class CSIVolumeSource(ApiModel):
    """A volume provided by a CSI driver (e.g. secrets-store.csi.k8s.io)."""

    driver: str
    """Name of the CSI driver."""
    read_only: bool | None = None
    """Mount it read-only."""
    fs_type: str | None = None
    """Filesystem type, e.g. ext4."""
    volume_attributes: dict[str, str] = Field(default_factory=dict)
    """Driver-specific attributes."""
    node_publish_secret_ref: LocalObjectReference | None = None
    """Secret with the driver's credentials."""


class Volume(ApiModel):
    """An extra volume of every stage pod: a name and exactly one source."""

    name: DnsLabel
    """Volume name, referenced by volumeMounts; names starting with "finetune-" are the operator's."""
    config_map: ConfigMapVolumeSource | None = None
    """A ConfigMap."""
    secret: SecretVolumeSource | None = None
    """A Secret."""
    empty_dir: EmptyDirVolumeSource | None = None
    """A scratch directory."""
    persistent_volume_claim: PersistentVolumeClaimVolumeSource | None = None
    """A PVC, e.g. a shared Hugging Face cache."""
    csi: CSIVolumeSource | None = None
    """A CSI volume."""

    @model_validator(mode="after")
    def _exactly_one_source(self) -> "Volume":
        sources = [name for name in type(self).model_fields if name != "name" and getattr(self, name) is not None]
        if len(sources) != 1:
            raise ValueError(f"volume {self.name!r}: set exactly one of configMap, secret, emptyDir, "
                             "persistentVolumeClaim, csi (the volume types Pod Security 'restricted' allows)")
        return self

    def claim(self) -> str | None:
        """The PVC this volume mounts, if any."""
        return self.persistent_volume_claim.claim_name if self.persistent_volume_claim else None


class VolumeMount(ApiModel):
    """Where the trainer container sees one of podTemplate.volumes."""

    name: DnsLabel
    """Name of a volume in podTemplate.volumes."""
    mount_path: str
    """Absolute path in the container; not /artifacts, /data, /etc/finetune, /dev/shm or /tmp itself (the operator's)."""
    sub_path: str | None = None
    """Mount only this relative path of the volume."""
    read_only: bool | None = None
    """Mount it read-only."""

    @field_validator("mount_path")
    @classmethod
    def _absolute(cls, path: str) -> str:
        if not path.startswith("/") or ".." in path.split("/"):
            raise ValueError(f"mountPath {path!r} must be an absolute path without '..'")
        return path

    @field_validator("sub_path")
    @classmethod
    def _relative(cls, path: str | None) -> str | None:
        if path is not None and (path.startswith("/") or ".." in path.split("/")):
            raise ValueError(f"subPath {path!r} must be relative and must not contain '..'")
        return path


# --------------------------------------------------------------------------- the template


class PodTemplate(ApiModel):
    """Settings of every stage pod of the run, in the Pod API's own field names. Changes apply to the next pod."""

    labels: Labels = Field(default_factory=dict)
    """Extra pod labels, e.g. kueue.x-k8s.io/queue-name to queue the stage pods with Kueue. The operator's own (finetune.dev/*, app.kubernetes.io/name, component, managed-by) cannot be set."""
    annotations: dict[str, str] = Field(default_factory=dict)
    """Extra pod annotations."""
    image_pull_secrets: list[LocalObjectReference] = Field(default_factory=list)
    """Secrets (type kubernetes.io/dockerconfigjson) in the run's namespace for pulling the trainer image."""
    env: list[EnvVar] = Field(default_factory=list)
    """Extra environment variables of the trainer, e.g. HF_TOKEN from a Secret for gated Hub models. The operator's own (POD_NAME, POD_NAMESPACE, FINETUNE_*) cannot be set."""
    env_from: list[EnvFromSource] = Field(default_factory=list)
    """Every key of these Secrets and ConfigMaps as environment variables."""
    node_selector: Labels = Field(default_factory=dict)
    """Node labels every stage pod requires."""
    tolerations: list[Toleration] = Field(default_factory=list)
    """Tolerations of every stage pod."""
    affinity: Affinity | None = None
    """Node and pod (anti-)affinity of every stage pod."""
    priority_class_name: DnsSubdomain | None = None
    """PriorityClass of the stage pods (preemption order, Kueue priority)."""
    scheduler_name: DnsSubdomain | None = None
    """Scheduler of the stage pods, e.g. a gang or topology-aware scheduler; default the cluster's."""
    runtime_class_name: DnsSubdomain | None = None
    """RuntimeClass of the stage pods, e.g. nvidia or a sandboxed runtime."""
    volumes: list[Volume] = Field(default_factory=list)
    """Extra volumes (configMap, secret, emptyDir, persistentVolumeClaim, csi); mounted with volumeMounts."""
    volume_mounts: list[VolumeMount] = Field(default_factory=list)
    """Where the trainer container sees the extra volumes."""
    accelerator_resource: str = DEFAULT_ACCELERATOR
    """Extended resource that resources.gpus requests: nvidia.com/gpu, amd.com/gpu, or a MIG profile such as nvidia.com/mig-1g.10gb."""
    extra_resources: dict[str, Quantity] = Field(default_factory=dict)
    """Further extended resources every stage pod requests (requests = limits), whole numbers, e.g. {rdma/hca_shared_devices_a: 1} for RDMA."""
    termination_grace_period_seconds: int | None = Field(None, ge=0)
    """Seconds between SIGTERM and SIGKILL when a stage pod is deleted (suspend, deadline, preemption); default 30. Give the trainer time to finish writing a checkpoint."""

    @field_validator("accelerator_resource")
    @classmethod
    def _extended_resource(cls, name: str) -> str:
        return _check_extended_resource(name)

    @field_validator("extra_resources")
    @classmethod
    def _extended_resources(cls, resources: dict[str, str]) -> dict[str, str]:
        for name, amount in resources.items():
            _check_extended_resource(name)
            if not re.fullmatch(r"[1-9][0-9]*", amount):
                raise ValueError(f"{name}: {amount!r} must be a positive whole number (extended resources "
                                 "cannot be fractional)")
        return resources


def _check_extended_resource(name: str) -> str:
    # The API server's rule: extended resources are domain-prefixed, outside kubernetes.io.
    prefix, slash, _ = name.partition("/")
    problem = qualified_name_problem(name)
    if problem or not slash:
        raise ValueError(f"{name!r} must be an extended resource name such as nvidia.com/gpu "
                         "(<domain>/<name>)")
    if prefix == "kubernetes.io" or prefix.endswith(".kubernetes.io"):
        raise ValueError(f"{name!r}: kubernetes.io resources (cpu, memory ...) are set in spec.resources")
    return name
