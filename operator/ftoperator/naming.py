"""Deterministic names and labels of the objects a run owns.

Names are a pure function of (run, stage, attempt) so that a restarted
operator finds what it created and a repeated create answers 409 instead of
making a duplicate.
"""

from __future__ import annotations

import hashlib

from ftoperator import GROUP
from trainer.config import EXPECTED_GPUS_ENV

MAX_NAME = 63
"""Every child name stays a valid DNS label (pod hostnames, label values, Service-like names)."""

TRAINER_CONTAINER = "trainer"
"""Name of the trainer container in every stage pod."""

# Paths inside a stage pod (the operator's; podTemplate.volumeMounts may not use them).
CONFIG_DIR = "/etc/finetune"
ARTIFACTS_MOUNT = "/artifacts"
DATA_MOUNT_ROOT = "/data"
TMP_DIR = "/tmp"
SHM_DIR = "/dev/shm"
TERMINATION_LOG = "/dev/termination-log"
OPERATOR_MOUNT_PATHS = (CONFIG_DIR, ARTIFACTS_MOUNT, DATA_MOUNT_ROOT, TMP_DIR, SHM_DIR, TERMINATION_LOG)
OPERATOR_VOLUME_PREFIX = "finetune-"
"""Stage pod volumes the operator adds are named finetune-*; podTemplate.volumes may not be."""
OPERATOR_ENV = ("POD_NAMESPACE", "POD_NAME", "FINETUNE_RUN", "FINETUNE_STAGE", "FINETUNE_ATTEMPT",
                "FINETUNE_OUTPUT_DIR", EXPECTED_GPUS_ENV)
"""Variables the operator sets in every stage pod; podTemplate.env may not set them."""
LABEL_RUN = f"{GROUP}/run"
LABEL_STAGE = f"{GROUP}/stage"
LABEL_ATTEMPT = f"{GROUP}/attempt"
LABEL_RANK = f"{GROUP}/rank"
"""Node rank of a pod of a multi-node stage (0..N-1); rank 0 hosts the rendezvous. Absent on single pods."""
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_NAME = "app.kubernetes.io/name"
MANAGED_BY = "finetune-operator"
TRAINER_APP = "finetune-trainer"
COMPONENT_PROGRESS = "progress"
COMPONENT_HISTORY = "history"
COMPONENT_FEEDBACK = "feedback"
COMPONENT_TRAINER = "trainer"
COMPONENT_STAGE_CONFIG = "stage-config"


def _digest(text: str, length: int = 8) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def bounded(base: str, suffix: str = "", *, limit: int = MAX_NAME) -> str:
    """``base + suffix`` if it fits in ``limit``; else base truncated plus a hash of base, then suffix.

    The hash keeps two long names that share a prefix distinct.
    """
    if len(base) + len(suffix) <= limit:
        return base + suffix
    keep = limit - len(suffix) - 9  # "-" + 8 hex digits
    if keep < 1:
        raise ValueError(f"suffix {suffix!r} leaves no room in a {limit}-character name")
    return f"{base[:keep].rstrip('-.')}-{_digest(base)}{suffix}"


def run_label_value(run: str) -> str:
    """The value of the finetune.dev/run label (label values are at most 63 characters)."""
    return bounded(run)


def pod_name(run: str, stage: str, attempt: int) -> str:
    """``<run>-<stage>-<attempt>``, shortened with a hash when the run name is long."""
    return bounded(run, f"-{stage}-{attempt}")


def stage_config_map_name(run: str, stage: str) -> str:
    """ConfigMap with the stage's StageJob file (the same for every attempt)."""
    return bounded(run, f"-{stage}-job")


def progress_config_map_name(run: str) -> str:
    """ConfigMap the trainer writes live progress into; the only object it may change."""
    return bounded(run, "-progress")


def history_config_map_name(run: str) -> str:
    """ConfigMap the trainer writes the run's bounded metric history into (read by the console)."""
    return bounded(run, "-history")


def feedback_config_map_name(run: str, round_: int) -> str:
    """ConfigMap the online stage writes a human-feedback round's candidate pairs into (read by the console)."""
    return bounded(run, f"-feedback-{round_}")


def trainer_service_account_name(run: str) -> str:
    """ServiceAccount of the run's stage pods; its Role covers only the progress ConfigMap."""
    return bounded(run, "-trainer")


def run_labels(run: str) -> dict[str, str]:
    return {LABEL_RUN: run_label_value(run), LABEL_MANAGED_BY: MANAGED_BY}


def pod_labels(run: str, stage: str, attempt: int) -> dict[str, str]:
    """Labels of a stage pod: selectable per run, stage and attempt, and by a PodMonitor."""
    return {
        **run_labels(run),
        LABEL_STAGE: stage,
        LABEL_ATTEMPT: str(attempt),
        LABEL_NAME: TRAINER_APP,
        LABEL_COMPONENT: COMPONENT_TRAINER,
    }


OPERATOR_LABEL_PREFIX = f"{GROUP}/"
OPERATOR_LABELS = (LABEL_NAME, LABEL_COMPONENT, LABEL_MANAGED_BY)
"""With every finetune.dev/* key: the labels the operator selects stage pods by; podTemplate.labels may not set them."""


def is_operator_label(key: str) -> bool:
    """True for label keys the operator sets and selects on."""
    return key.startswith(OPERATOR_LABEL_PREFIX) or key in OPERATOR_LABELS


def run_selector(run: str) -> str:
    """Label selector of everything labelled as belonging to ``run``."""
    return f"{LABEL_RUN}={run_label_value(run)}"
