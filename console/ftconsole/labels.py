"""Human preference labels as durable data: the PreferenceLabel resource, its CRD, JSON Lines.

A label is one person's opinion on one pair of responses to one prompt of one run. Each is its
own object (``generateName``), so labelling the same pair twice keeps both opinions; the
``finetune.dev/pair`` label (a digest of prompt and both responses) groups them.

    python -m ftconsole.labels > crds/preferencelabels.finetune.dev.yaml

The standard preference JSON Lines row is ``{"prompt", "chosen", "rejected"}`` (TRL's format and
our trainer's ``data.preferences``). Choices ``a`` and ``b`` export as such a row; ``tie`` and
``bothBad`` say nothing about which is better, so they are counted and left out.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from typing import Any, Iterable, Literal

import yaml
from pydantic import Field, ValidationError

from ftconsole import API_VERSION, GROUP, LABEL_KIND, LABEL_PLURAL, LABEL_SHORT_NAME, LABEL_SINGULAR, VERSION
from trainer.config import ApiModel

Choice = Literal["a", "b", "tie", "bothBad"]
CHOICES: tuple[str, ...] = ("a", "b", "tie", "bothBad")
LABEL_RUN = "finetune.dev/run"
LABEL_ROUND = "finetune.dev/round"
LABEL_PAIR = "finetune.dev/pair"
MAX_TEXT = 32768
"""Characters of a prompt or response; a label is small next to the 1.5 MiB object limit."""


class CandidateResponse(ApiModel):
    """One response shown to the labeller."""

    text: str = Field(max_length=MAX_TEXT)
    """The response as the labeller saw it."""
    source: str | None = Field(None, max_length=253)
    """Where it came from, e.g. ``ppo@120`` (policy at step 120), ``sft`` or ``import``."""


class PreferenceLabelSpec(ApiModel):
    """Which of two responses to a prompt a person preferred, who and when."""

    run: str = Field(min_length=1, max_length=253)
    """Name of the FineTuneRun (same namespace) the candidates came from."""
    round: int = Field(0, ge=0)
    """Human-feedback round; 0 for labels not collected in a round (imports, ad-hoc labelling)."""
    prompt: str = Field(max_length=MAX_TEXT)
    """The prompt both responses answer."""
    responses: list[CandidateResponse] = Field(min_length=2, max_length=2)
    """The two candidates, shown as A (first) and B (second)."""
    choice: Choice
    """a: A is better; b: B is better; tie: equally good; bothBad: neither is acceptable."""
    labeller: str = Field(min_length=1, max_length=512)
    """Kubernetes user name of whoever labelled (from TokenReview in the console)."""
    labelled_at: str = Field(pattern=r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")
    """When, RFC 3339 in UTC."""


def pair_digest(prompt: str, a: str, b: str) -> str:
    """Label value grouping opinions on one pair (order of A and B matters: it is what was shown)."""
    payload = json.dumps([prompt, a, b], ensure_ascii=False).encode()
    return hashlib.sha256(payload).hexdigest()[:16]


def run_label_value(run: str) -> str:
    """The ``finetune.dev/run`` label value of a run's labels (a label value is at most 63 characters)."""
    return run[:63].rstrip("-._")


def _name_prefix(run: str) -> str:
    # generateName adds 5 characters; object names are at most 253.
    return f"{run[:200].rstrip('-.')}-label-"


def label_object(spec: PreferenceLabelSpec, *, namespace: str) -> dict[str, Any]:
    """The PreferenceLabel to create (``generateName``, so every opinion is its own object)."""
    return {
        "apiVersion": API_VERSION,
        "kind": LABEL_KIND,
        "metadata": {
            "generateName": _name_prefix(spec.run),
            "namespace": namespace,
            "labels": {
                LABEL_RUN: run_label_value(spec.run),
                LABEL_ROUND: str(spec.round),
                LABEL_PAIR: pair_digest(spec.prompt, spec.responses[0].text, spec.responses[1].text),
            },
        },
        "spec": spec.model_dump(by_alias=True, exclude_none=True),
    }


def parse_label(obj: dict[str, Any]) -> PreferenceLabelSpec:
    """The spec of a PreferenceLabel as read from the API; ValueError naming the object if malformed."""
    try:
        return PreferenceLabelSpec.model_validate(obj.get("spec") or {})
    except ValidationError as exc:
        meta = obj.get("metadata") or {}
        raise ValueError(f"PreferenceLabel {meta.get('namespace')}/{meta.get('name')}: {exc}") from exc


# ----------------------------------------------------------------------------- JSON Lines


@dataclass
class ExportResult:
    rows: list[dict[str, str]]
    skipped: dict[str, int]  # choice -> how many labels had no preferred response


def preference_rows(labels: Iterable[PreferenceLabelSpec]) -> ExportResult:
    """Standard preference rows (prompt, chosen, rejected) for labels with choice a or b, in the
    order given; ties and both-bad are counted in ``skipped``."""
    rows: list[dict[str, str]] = []
    skipped = {"tie": 0, "bothBad": 0}
    for label in labels:
        a, b = label.responses[0].text, label.responses[1].text
        if label.choice == "a":
            rows.append({"prompt": label.prompt, "chosen": a, "rejected": b})
        elif label.choice == "b":
            rows.append({"prompt": label.prompt, "chosen": b, "rejected": a})
        else:
            skipped[label.choice] += 1
    return ExportResult(rows=rows, skipped=skipped)


def run_labels(objects: Iterable[dict[str, Any]], *, run: str,
               rounds: Iterable[int] | None = None) -> list[PreferenceLabelSpec]:
    """The labels of ``run`` (optionally of some rounds only) among PreferenceLabel objects, in export
    order; malformed objects are skipped (the API server validated them against the schema)."""
    wanted = None if rounds is None else set(rounds)
    found = []
    for obj in objects:
        try:
            label = parse_label(obj)
        except ValueError:
            continue
        if label.run == run and (wanted is None or label.round in wanted):
            found.append(label)
    return sorted(found, key=sort_key)


def preferences_per_round(labels: Iterable[PreferenceLabelSpec]) -> dict[int, int]:
    """Round -> labels that prefer A or B (what a human-feedback round counts towards labelsNeeded)."""
    counts: dict[int, int] = {}
    for label in labels:
        if preference_rows([label]).rows:
            counts[label.round] = counts.get(label.round, 0) + 1
    return counts


def sort_key(label: PreferenceLabelSpec) -> tuple:
    """Export order: by time, then run and round, then content (labels of the same second would otherwise
    keep the API's order, which follows their random generated names), so an export is reproducible."""
    return (label.labelled_at, label.run, label.round, label.prompt, label.responses[0].text,
            label.responses[1].text, label.choice, label.labeller)


def labels_from_jsonl(text: str, *, source: str, run: str, round: int, labeller: str,
                      labelled_at: str) -> list[PreferenceLabelSpec]:
    """PreferenceLabels from preference JSON Lines (``chosen`` becomes A, choice ``a``).

    Blank lines are skipped. A row that is not an object with string prompt, chosen and rejected
    raises ValueError naming ``source:LINE`` and what is wrong.
    """
    labels = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{source}:{number}"
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise ValueError(f"{where}: not JSON ({exc})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected an object with prompt, chosen and rejected")
        missing = [key for key in ("prompt", "chosen", "rejected") if not isinstance(row.get(key), str)]
        if missing:
            raise ValueError(f"{where}: {', '.join(missing)} must be strings (conversational rows: "
                             "flatten them to text first)")
        try:
            labels.append(PreferenceLabelSpec(
                run=run, round=round, prompt=row["prompt"],
                responses=[CandidateResponse(text=row["chosen"], source="import"),
                           CandidateResponse(text=row["rejected"], source="import")],
                choice="a", labeller=labeller, labelled_at=labelled_at))
        except ValidationError as exc:
            raise ValueError(f"{where}: {exc}") from None
    return labels


def to_jsonl(rows: Iterable[dict[str, str]]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


# ----------------------------------------------------------------------------- CRD

CRD_NAME = f"{LABEL_PLURAL}.{GROUP}"
HEADER = (
    "# Generated by `python -m ftconsole.labels` from console/ftconsole/labels.py.\n"
    "# Do not edit: change the model and regenerate (tests/console fail when this file is stale).\n"
)
PRINTER_COLUMNS = [
    {"name": "Run", "type": "string", "jsonPath": ".spec.run"},
    {"name": "Round", "type": "integer", "jsonPath": ".spec.round"},
    {"name": "Choice", "type": "string", "jsonPath": ".spec.choice"},
    {"name": "Labeller", "type": "string", "jsonPath": ".spec.labeller"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def crd() -> dict[str, Any]:
    """The PreferenceLabel CustomResourceDefinition (apiextensions.k8s.io/v1)."""
    from ftoperator.crdgen import structural  # the same pydantic -> structural schema bridge as FineTuneRun

    raw = PreferenceLabelSpec.model_json_schema(by_alias=True)
    spec_schema = structural(raw, raw.pop("$defs", {}))
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": CRD_NAME},
        "spec": {
            "group": GROUP,
            "names": {"kind": LABEL_KIND, "listKind": f"{LABEL_KIND}List", "plural": LABEL_PLURAL,
                      "singular": LABEL_SINGULAR, "shortNames": [LABEL_SHORT_NAME], "categories": ["finetune"]},
            "scope": "Namespaced",
            "versions": [{
                "name": VERSION,
                "served": True,
                "storage": True,
                "additionalPrinterColumns": PRINTER_COLUMNS,
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "description": ("PreferenceLabel records one person's preference between two responses to a "
                                    "prompt of a FineTuneRun; export with `python -m ftconsole labels export`."),
                    "required": ["spec"],
                    "properties": {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "metadata": {"type": "object"},
                        "spec": spec_schema,
                    },
                }},
            }],
        },
    }


def render_crd() -> str:
    """The CRD file's exact text."""
    return HEADER + yaml.safe_dump(crd(), sort_keys=False, width=100, allow_unicode=True)


if __name__ == "__main__":
    sys.stdout.write(render_crd())
