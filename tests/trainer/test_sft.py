"""SFT end to end: the loss falls on a memorisable set and final/ loads with plain transformers."""

from __future__ import annotations

from .stage_runs import progress_events, run_cli, run_in_process, write_job, write_jsonl

WORDS = "cats dogs weather today happy sad hello world".split()


def sft_rows() -> list:
    rows = [{"prompt": f"Tell me about {w}?", "completion": f" {w.capitalize()} is very nice!"} for w in WORDS]
    rows.insert(3, "")  # blank lines are allowed anywhere
    rows.append({"messages": [{"role": "user", "content": "hello"},
                              {"role": "assistant", "content": "hello world"}]})
    return rows


def sft_job(tmp_path, model_dir, *, output="out", **sft) -> dict:
    settings = {"learningRate": 3e-3, "batchSize": 4, "epochs": 8, "checkpointEverySteps": 100,
                "logEverySteps": 2, "warmupSteps": 2}
    settings.update(sft)
    return {"stage": "sft", "model": str(model_dir), "outputDir": str(tmp_path / output),
            "data": {"sft": str(write_jsonl(tmp_path / "sft.jsonl", sft_rows()))}, "sft": settings}


def test_sft_cli_run_lowers_loss_and_saves_loadable_model(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = write_job(tmp_path / "job.yaml", **sft_job(tmp_path, tiny_model_dir))
    result = run_cli("sft", config)
    assert result.returncode == 0, result.stderr[-3000:]

    events = progress_events(tmp_path / "out")
    losses = [e["metrics"]["loss"] for e in events if e["kind"] == "progress" and "loss" in e["metrics"]]
    # 9 rows (one chat) x 8 epochs, batch 4 -> 24 steps, logged every 2.
    assert len(losses) == 12
    # A clear drop, not noise: measured 6.13 -> 2.57 (fixed seeds, CPU fp32); asking for halving
    # leaves room for float differences across machines while a broken mask or LR would fail it.
    assert losses[-1] < 0.5 * losses[0], losses
    assert events[-1]["kind"] == "succeeded" and events[-1]["artifact"] == str(tmp_path / "out" / "final")
    assert events[-1]["step"] == events[-1]["total_steps"] == 24

    final = tmp_path / "out" / "final"
    assert (final / "COMPLETE").is_file()
    model = AutoModelForCausalLM.from_pretrained(final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert model.config.vocab_size == len(tokenizer) and tokenizer.chat_template


def test_lora_run_saves_a_merged_plain_model(tmp_path, tiny_model_dir):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    job = sft_job(tmp_path, tiny_model_dir, epochs=1, lora={"rank": 4, "alpha": 8, "dropout": 0.0})
    assert run_in_process("sft", write_job(tmp_path / "job.yaml", **job)) == 0

    final = tmp_path / "out" / "final"
    with safe_open(str(final / "model.safetensors"), "pt") as weights:
        names = list(weights.keys())
    assert names and not any("lora" in n for n in names)  # merged: no adapter weights shipped
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    tuned = AutoModelForCausalLM.from_pretrained(final).state_dict()
    changed = [k for k in base if not (base[k] == tuned[k]).all()]
    # LoRA targets q/k/v/o projections only, so exactly those changed.
    assert changed and all(k.split(".")[-2] in {"q_proj", "k_proj", "v_proj", "o_proj"} for k in changed), changed
