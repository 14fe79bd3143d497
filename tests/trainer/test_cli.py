"""``python -m trainer``: exit codes and the failure reason in the termination log."""

from __future__ import annotations

import pytest

from trainer.__main__ import main
from trainer.config import PERMANENT_FAILURE_EXIT_CODE, PERMANENT_FAILURE_PREFIX, ConfigError
from trainer.runtime import StageFailed as StageFailedForTest

from .stage_runs import progress_events, run_cli, write_job, write_jsonl


def test_missing_model_directory_fails_permanently_with_clear_reason(tmp_path):
    missing = tmp_path / "no-such-model"
    job = {"stage": "sft", "model": str(missing), "outputDir": str(tmp_path / "out"),
           "data": {"sft": str(write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "a", "completion": "b"}]))}}
    result = run_cli("sft", write_job(tmp_path / "job.yaml", **job))
    assert result.returncode == PERMANENT_FAILURE_EXIT_CODE
    reason = f"model directory {missing} does not exist"
    assert (tmp_path / "termination-log").read_text() == PERMANENT_FAILURE_PREFIX + reason
    assert reason in result.stderr
    assert "Traceback" not in result.stderr  # an expected failure is one line, not a stack
    last = progress_events(tmp_path / "out")[-1]
    assert (last["kind"], last["reason"]) == ("failed", reason)


def test_model_directory_without_config_json(tmp_path):
    from trainer.modeling import resolve_model_source
    from trainer.runtime import StageFailed

    with pytest.raises(StageFailed, match="has no config.json"):
        resolve_model_source(str(tmp_path))


@pytest.mark.parametrize(("uri", "repo_id", "revision"), [
    ("hf://gpt2", "gpt2", None),
    ("hf://org/name", "org/name", None),
    ("hf://Qwen/Qwen2.5-0.5B-Instruct@main", "Qwen/Qwen2.5-0.5B-Instruct", "main"),
    ("hf://org/name@refs/pr/1", "org/name", "refs/pr/1"),
    ("hf://org/name@0123456789abcdef0123456789abcdef01234567", "org/name", "0123456789abcdef0123456789abcdef01234567"),
])
def test_hub_sources_resolve_to_an_id_and_revision_for_from_pretrained(uri, repo_id, revision):
    from trainer.modeling import resolve_model_source

    source = resolve_model_source(uri)
    assert (source.name_or_path, source.revision) == (repo_id, revision)
    assert source.pretrained_kwargs() == ({"revision": revision} if revision else {})


@pytest.mark.parametrize("uri", ["hf://", "hf://a/b/c", "hf://org/-name", "hf://org/na--me", "hf://org/name@",
                                 "hf://org/name@../x", "hf://" + "x" * 97])
def test_invalid_hub_sources_fail_permanently(uri):
    from trainer.modeling import resolve_model_source
    from trainer.runtime import PermanentStageFailure

    with pytest.raises(PermanentStageFailure, match="model 'hf://"):
        resolve_model_source(uri)


def test_a_model_missing_on_the_hub_is_permanent_and_a_network_error_is_not():
    from huggingface_hub.errors import RepositoryNotFoundError

    from trainer.modeling import ModelSource, _missing_on_hub_is_permanent
    from trainer.runtime import PermanentStageFailure

    def wrapped(cause):  # what transformers raises: an OSError from the hub error
        try:
            raise cause
        except Exception as exc:
            raise OSError("org/name is not a local folder and is not a valid model identifier") from exc

    with pytest.raises(PermanentStageFailure, match="org/name@v1: RepositoryNotFoundError"):
        with _missing_on_hub_is_permanent(ModelSource("org/name", "v1")):
            wrapped(RepositoryNotFoundError.__new__(RepositoryNotFoundError))  # its __init__ wants an HTTP response
    with pytest.raises(OSError) as raised:
        with _missing_on_hub_is_permanent(ModelSource("org/name")):
            wrapped(ConnectionError("no route to host"))
    assert not isinstance(raised.value, PermanentStageFailure)


def test_no_cuda_when_gpus_were_requested_is_permanent():
    from trainer.runtime import PermanentStageFailure, check_cuda

    with pytest.raises(PermanentStageFailure, match="2 GPU\\(s\\) were requested"):
        check_cuda(expected_gpus="2", cuda=False)
    check_cuda(expected_gpus="0", cuda=False)
    check_cuda(expected_gpus=None, cuda=False)
    check_cuda(expected_gpus="1", cuda=True)


@pytest.mark.parametrize(("cuda_build", "driver", "expected"), [
    (None, None, "a CPU-only build): use the CUDA trainer image"),
    ("13.0", None, "built for CUDA 13.0; it needs NVIDIA driver 580 or newer on the node): no NVIDIA driver is "
                   "visible in the container"),
    ("13.0", "550.54.14", "the node's driver is 550.54.14: upgrade it to 580 or newer; for older drivers (525 or "
                          "newer) build the trainer image with --build-arg "
                          "TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128"),
    ("12.8", "520.61.05", "it needs NVIDIA driver 525 or newer on the node): the node's driver is 520.61.05"),
    ("13.0", "580.65.06", "driver 580.65.06; it needs NVIDIA driver 580 or newer on the node): CUDA failed"),
])
def test_the_no_cuda_message_names_the_driver_requirement_of_the_torch_build(cuda_build, driver, expected):
    from trainer.runtime import PermanentStageFailure, check_cuda

    with pytest.raises(PermanentStageFailure) as raised:
        check_cuda(expected_gpus="1", cuda=False, cuda_build=cuda_build, driver_version=driver)
    assert expected in str(raised.value)


def test_fewer_visible_gpus_than_requested_is_permanent():
    from trainer.runtime import PermanentStageFailure, check_cuda

    with pytest.raises(PermanentStageFailure, match="4 GPU\\(s\\) were requested .* but CUDA sees 2"):
        check_cuda(expected_gpus="4", cuda=True, visible_gpus=2)


@pytest.mark.parametrize(("text", "version"), [
    ("NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.14  Thu Feb 22 01:44:30 UTC 2024\n", "550.54.14"),
    ("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release Build  (dvs-builder@U16)\n",
     "580.65.06"),
])
def test_the_driver_version_is_read_from_the_kernel_module(tmp_path, text, version):
    from trainer.runtime import nvidia_driver_version

    (tmp_path / "version").write_text(text)
    assert nvidia_driver_version(tmp_path / "version") == version
    assert nvidia_driver_version(tmp_path / "none") is None


def test_exit_code_and_termination_message_tell_permanent_from_retryable_errors():
    from trainer.data import DatasetError
    from trainer.runtime import PermanentStageFailure, exit_code, termination_message

    for permanent in (DatasetError("p.jsonl:3: missing field 'prompt'"), PermanentStageFailure("no model"),
                      ConfigError("job.yaml: bad")):
        assert exit_code(permanent) == PERMANENT_FAILURE_EXIT_CODE
        assert termination_message(permanent).startswith(PERMANENT_FAILURE_PREFIX)
    for retryable in (StageFailedForTest("KL too high"), RuntimeError("CUDA error: an illegal memory access")):
        assert exit_code(retryable) == 1
        assert not termination_message(retryable).startswith(PERMANENT_FAILURE_PREFIX)


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
    assert main(["--stage", "sft", "--config", str(config)]) == PERMANENT_FAILURE_EXIT_CODE
    err = capsys.readouterr().err
    assert f"{config}: stage is 'reward' but --stage sft was given" in err
    # The job could not be used, so its terminationLogPath is unknown: the pod's default gets the reason.
    assert pod_termination_log.read_text().startswith(f"{PERMANENT_FAILURE_PREFIX}{config}: stage is 'reward'")


def test_invalid_config_names_file_and_field(tmp_path, capsys):
    config = write_job(tmp_path / "job.yaml", stage="sft", model="m", outputDir="o", sft={"learningRate": -1})
    assert main(["--stage", "sft", "--config", str(config)]) == PERMANENT_FAILURE_EXIT_CODE
    assert f"{config}: sft.learningRate" in capsys.readouterr().err


def test_unexpected_error_reason_names_type_and_place(tmp_path):
    from trainer.runtime import failure_reason

    try:
        {}["missing"]
    except KeyError as exc:
        reason = failure_reason(exc)
    assert reason.startswith("KeyError: 'missing' (at ") and "test_cli.py:" in reason
