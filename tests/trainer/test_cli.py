"""``python -m trainer``: exit codes and the failure reason in the termination log."""

from __future__ import annotations

import pytest

from trainer.__main__ import main

from .stage_runs import progress_events, run_cli, write_job, write_jsonl


def test_missing_model_directory_fails_with_clear_reason(tmp_path):
    missing = tmp_path / "no-such-model"
    job = {"stage": "sft", "model": str(missing), "outputDir": str(tmp_path / "out"),
           "data": {"sft": str(write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "a", "completion": "b"}]))}}
    result = run_cli("sft", write_job(tmp_path / "job.yaml", **job))
    assert result.returncode == 1
    reason = f"model directory {missing} does not exist"
    assert (tmp_path / "termination-log").read_text() == reason
    assert reason in result.stderr
    assert "Traceback" not in result.stderr  # an expected failure is one line, not a stack
    last = progress_events(tmp_path / "out")[-1]
    assert (last["kind"], last["reason"]) == ("failed", reason)


def test_model_directory_without_config_json(tmp_path):
    from trainer.modeling import resolve_model_source
    from trainer.runtime import StageFailed

    with pytest.raises(StageFailed, match="has no config.json"):
        resolve_model_source(str(tmp_path))
    assert resolve_model_source("hf://org/name") == "org/name"
    with pytest.raises(StageFailed, match="expected hf://org/name"):
        resolve_model_source("hf://just-a-name")


@pytest.fixture(autouse=True)
def pod_termination_log(tmp_path, monkeypatch):
    """Stands in for /dev/termination-log, which the kubelet creates in a pod (never write the real one)."""
    import trainer.__main__

    path = tmp_path / "pod-termination-log"
    path.write_text("")
    monkeypatch.setattr(trainer.__main__, "DEFAULT_TERMINATION_LOG", path)
    return path


def test_stage_flag_must_match_config_file(tmp_path, capsys, pod_termination_log):
    config = write_job(tmp_path / "job.yaml", stage="reward", model="m", outputDir=str(tmp_path / "out"))
    assert main(["--stage", "sft", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert f"{config}: stage is 'reward' but --stage sft was given" in err
    # The job could not be used, so its terminationLogPath is unknown: the pod's default gets the reason.
    assert pod_termination_log.read_text().startswith(f"{config}: stage is 'reward'")


def test_invalid_config_names_file_and_field(tmp_path, capsys):
    config = write_job(tmp_path / "job.yaml", stage="sft", model="m", outputDir="o", sft={"learningRate": -1})
    assert main(["--stage", "sft", "--config", str(config)]) == 1
    assert f"{config}: sft.learningRate" in capsys.readouterr().err


def test_unexpected_error_reason_names_type_and_place(tmp_path):
    from trainer.runtime import failure_reason

    try:
        {}["missing"]
    except KeyError as exc:
        reason = failure_reason(exc)
    assert reason.startswith("KeyError: 'missing' (at ") and "test_cli.py:" in reason
