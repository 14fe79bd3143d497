"""PreferenceLabel: the model, its generated CRD, and the JSON Lines round trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from ftconsole import labels
from ftconsole.labels import CandidateResponse, PreferenceLabelSpec

REPO = Path(__file__).resolve().parents[2]
T = "2026-12-01T10:00:00Z"


def spec(choice, *, prompt="2+2?", a="4", b="5", labelled_at=T, labeller="alice"):
    return PreferenceLabelSpec(run="demo", round=1, prompt=prompt,
                               responses=[CandidateResponse(text=a, source="ppo@10"), CandidateResponse(text=b)],
                               choice=choice, labeller=labeller, labelled_at=labelled_at)


def test_crd_file_is_generated_from_the_model():
    assert (REPO / "crds" / "preferencelabels.finetune.dev.yaml").read_text() == labels.render_crd(), (
        "crds/preferencelabels.finetune.dev.yaml is stale: run `python -m ftconsole.labels > "
        "crds/preferencelabels.finetune.dev.yaml` and `python hack/chart_sync.py`")


def test_crd_schema_requires_who_and_when_and_limits_choices():
    crd = yaml.safe_load(labels.render_crd())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert set(schema["required"]) == {"run", "prompt", "responses", "choice", "labeller", "labelledAt"}
    assert schema["properties"]["choice"]["enum"] == ["a", "b", "tie", "bothBad"]
    assert schema["properties"]["responses"]["minItems"] == schema["properties"]["responses"]["maxItems"] == 2
    assert crd["spec"]["group"] == "finetune.dev" and crd["spec"]["scope"] == "Namespaced"


def test_two_opinions_on_one_pair_are_two_objects_grouped_by_pair_label():
    first = labels.label_object(spec("a", labeller="alice"), namespace="ns")
    second = labels.label_object(spec("b", labeller="bob"), namespace="ns")
    # generateName, never a fixed name: the API server gives each opinion its own object.
    assert "name" not in first["metadata"] and first["metadata"]["generateName"] == "demo-label-"
    assert first["metadata"]["labels"]["finetune.dev/pair"] == second["metadata"]["labels"]["finetune.dev/pair"]
    assert first["spec"]["choice"] == "a" and second["spec"]["choice"] == "b"
    assert first["spec"]["labelledAt"] == T and first["spec"]["responses"][0] == {"text": "4", "source": "ppo@10"}
    other = labels.label_object(spec("a", b="6"), namespace="ns")
    assert other["metadata"]["labels"]["finetune.dev/pair"] != first["metadata"]["labels"]["finetune.dev/pair"]


def test_export_turns_a_and_b_into_chosen_rejected_and_counts_the_rest():
    result = labels.preference_rows([spec("a"), spec("b"), spec("tie"), spec("bothBad"), spec("bothBad")])
    assert result.rows == [{"prompt": "2+2?", "chosen": "4", "rejected": "5"},
                           {"prompt": "2+2?", "chosen": "5", "rejected": "4"}]
    assert result.skipped == {"tie": 1, "bothBad": 2}


def test_import_then_export_gives_back_the_same_rows():
    rows = [{"prompt": "p1", "chosen": "good <b>", "rejected": "bad"},
            {"prompt": "p2\nline", "chosen": "ja ✓", "rejected": "nein"}]
    text = labels.to_jsonl(rows) + "\n"
    imported = labels.labels_from_jsonl(text, source="prefs.jsonl", run="demo", round=2, labeller="carol",
                                        labelled_at=T)
    assert [label.choice for label in imported] == ["a", "a"]
    assert all(label.labeller == "carol" and label.round == 2 for label in imported)
    # Through the API's shape and back, as export reads them.
    objects = [labels.label_object(label, namespace="ns") for label in imported]
    back = [labels.parse_label(json.loads(json.dumps(obj))) for obj in objects]
    assert labels.preference_rows(back).rows == rows


@pytest.mark.parametrize("line, message", [
    ("{not json", "prefs.jsonl:2: not JSON"),
    ('["a"]', "prefs.jsonl:2: expected an object"),
    ('{"prompt": "p", "chosen": "c"}', "prefs.jsonl:2: rejected must be strings"),
])
def test_import_names_file_and_line_of_a_bad_row(line, message):
    text = '{"prompt": "p", "chosen": "c", "rejected": "r"}\n' + line + "\n"
    with pytest.raises(ValueError, match=message):
        labels.labels_from_jsonl(text, source="prefs.jsonl", run="demo", round=0, labeller="x", labelled_at=T)


def test_export_order_is_by_time_then_run():
    late, early = spec("a", prompt="late", labelled_at="2026-12-02T00:00:00Z"), spec("a", prompt="early")
    assert [s.prompt for s in sorted([late, early], key=labels.sort_key)] == ["early", "late"]


def test_malformed_label_names_the_object():
    with pytest.raises(ValueError, match="PreferenceLabel ns/x"):
        labels.parse_label({"metadata": {"namespace": "ns", "name": "x"}, "spec": {"run": "demo"}})


def test_the_documented_commands_round_trip_through_the_cluster_api(tmp_path, monkeypatch, capsys):
    from fakes import FakeKube

    from ftconsole import cli, kube

    cluster = FakeKube()
    monkeypatch.setattr(kube, "api_client", lambda **_: None)
    monkeypatch.setattr(kube, "ConsoleKube", lambda api: cluster)
    rows = [{"prompt": "p1", "chosen": "yes", "rejected": "no"}, {"prompt": "p2", "chosen": "a", "rejected": "b"}]
    source = tmp_path / "prefs.jsonl"
    source.write_text(labels.to_jsonl(rows))
    with pytest.raises(SystemExit) as done:
        cli.main(["labels", "import", str(source), "-n", "team-a", "--run", "demo", "--round", "3"])
    assert done.value.code == 0 and len(cluster.labels) == 2
    assert {obj["metadata"]["labels"]["finetune.dev/round"] for obj in cluster.labels} == {"3"}
    out = tmp_path / "out.jsonl"
    with pytest.raises(SystemExit):
        cli.main(["labels", "export", "-n", "team-a", "--run", "demo", "-o", str(out)])
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows
    assert "exported 2 preference rows from 2 labels" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p"}\n')
    with pytest.raises(SystemExit) as failed:
        cli.main(["labels", "import", str(bad), "-n", "team-a", "--run", "demo"])
    assert failed.value.code == 2 and "bad.jsonl:1" in capsys.readouterr().err
    assert len(cluster.labels) == 2, "a bad file creates nothing"
