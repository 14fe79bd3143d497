"""DPO end to end on a tiny model: learning a clear preference (sigmoid and IPO), the reference
log-probs computed once, resume after a kill, two processes, bad rows, outputs."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
import torch

from trainer import dpo
from trainer.checkpoint import complete_checkpoints, latest_checkpoint
from trainer.data import PreferenceRow

from .stage_runs import (load_state_dict, max_abs_diff, progress_events, run_cli, run_in_process, subprocess_env,
                         write_job, write_jsonl)
from .test_reward_model import preference_rows

TRAIN_METRICS = ("loss", "chosen_reward", "rejected_reward", "reward_margin", "preference_accuracy")
EVAL_METRICS = ("eval_loss", "eval_reward_margin", "eval_preference_accuracy")


def dpo_job(tmp_path, model_dir, *, output="out", rows=None, **dpo_settings) -> dict:
    settings = {"learningRate": 1e-3, "batchSize": 8, "epochs": 3, "evalFraction": 0.25, "beta": 0.1,
                "checkpointEverySteps": 100, "logEverySteps": 3, "precision": "fp32",
                "chatTemplate": False}  # the prompts are raw text, as the reward stage's test data
    settings.update(dpo_settings)
    data = write_jsonl(tmp_path / "prefs.jsonl", preference_rows() if rows is None else rows)
    return {"stage": "dpo", "model": str(model_dir), "outputDir": str(tmp_path / output),
            "data": {"preferences": str(data)}, "dpo": settings}


def logged(output) -> list[dict]:
    return [e["metrics"] for e in progress_events(output) if e["kind"] == "progress" and e.get("metrics")]


def test_dpo_cli_learns_a_clear_preference_and_saves_a_plain_model(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = write_job(tmp_path / "job.yaml", **dpo_job(tmp_path, tiny_model_dir))
    result = run_cli("dpo", config)
    assert result.returncode == 0, result.stderr[-3000:]
    output = tmp_path / "out"
    metrics = logged(output)
    for m in metrics:
        assert set(TRAIN_METRICS + EVAL_METRICS) <= set(m), sorted(m)
    first, last = metrics[0], metrics[-1]
    print(f"held-out after 3 steps: accuracy {first['eval_preference_accuracy']:.3f} margin "
          f"{first['eval_reward_margin']:.3f}; at the end: accuracy {last['eval_preference_accuracy']:.3f} "
          f"margin {last['eval_reward_margin']:.3f}")
    assert last["eval_preference_accuracy"] >= 0.9
    assert last["eval_reward_margin"] > 1.0 and last["eval_reward_margin"] > first["eval_reward_margin"]
    assert last["eval_chosen_reward"] > last["eval_rejected_reward"]
    assert last["eval_loss"] < 0.5 * first["eval_loss"]
    # Every log (and step 0) shows the policy's greedy answers to the first held-out prompts beside their pairs.
    samples = [e for e in progress_events(output) if e["kind"] == "samples"]
    assert [e["step"] for e in samples] == [0, 3, 6, 9, 12, 15]
    shown = samples[-1]["samples"]
    assert len(shown) == 4 and all(s["prompt"].startswith("Tell me about") and s["response"] for s in shown)
    assert sum(s["chosen_reward"] > s["rejected_reward"] for s in shown) >= 3

    final = output / "final"
    AutoModelForCausalLM.from_pretrained(final)
    assert AutoTokenizer.from_pretrained(final).padding_side == "left"
    card = (final / "README.md").read_text()
    assert "DPO on preference pairs" in card and "eval_preference_accuracy" in card


def test_the_dpo_metrics_that_matter_are_prometheus_gauges():
    from prometheus_client import generate_latest

    from trainer.metrics import TrainerMetrics

    metrics = TrainerMetrics(stage="dpo")
    names = ("preference_accuracy", "reward_margin", "eval_preference_accuracy", "eval_reward_margin")
    metrics.update(**{name: 0.75 for name in names})
    body = generate_latest(metrics.registry).decode()
    assert all(f'finetune_trainer_{name}{{stage="dpo"}} 0.75' in body for name in names)


def test_dpo_stage_without_preferences_fails_permanently(tmp_path, tiny_model_dir):
    job = dpo_job(tmp_path, tiny_model_dir)
    del job["data"]["preferences"]
    assert run_in_process("dpo", write_job(tmp_path / "job.yaml", **job)) == 3
    assert "dpo stage needs data.preferences" in (tmp_path / "termination-log").read_text()


def test_ipo_with_lora_learns_and_ships_merged_weights(tmp_path, tiny_model_dir):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    job = dpo_job(tmp_path, tiny_model_dir, lossType="ipo", beta=0.5, learningRate=3e-3, logEverySteps=4,
                  lora={"rank": 8, "alpha": 16, "dropout": 0.0})
    assert run_in_process("dpo", write_job(tmp_path / "job.yaml", **job)) == 0
    metrics = logged(tmp_path / "out")
    first, last = metrics[0], metrics[-1]
    print(f"IPO held-out: accuracy {first['eval_preference_accuracy']:.3f} -> {last['eval_preference_accuracy']:.3f}, "
          f"margin {first['eval_reward_margin']:.3f} -> {last['eval_reward_margin']:.3f}")
    # IPO's implicit rewards are beta times length-averaged log-ratios, so margins are small: its target
    # h = 1 / (2 beta) = 1 means a reward margin of beta * 1 = 0.5 at the optimum.
    assert last["eval_preference_accuracy"] >= 0.9
    assert last["eval_reward_margin"] > 0.1 and last["eval_reward_margin"] > first["eval_reward_margin"]

    final = tmp_path / "out" / "final"
    with safe_open(str(final / "model.safetensors"), "pt") as weights:
        assert not any("lora" in name for name in weights.keys())
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    tuned = AutoModelForCausalLM.from_pretrained(final).state_dict()
    changed = [k for k in base if not torch.equal(base[k], tuned[k])]
    assert changed and all(k.split(".")[-2] in {"q_proj", "k_proj", "v_proj", "o_proj"} for k in changed), changed


def test_resume_after_a_kill_reads_the_saved_reference_and_matches_an_uninterrupted_run(
        tmp_path, tiny_model_dir, capfd):
    settings = dict(epochs=2, batchSize=4, gradientAccumulationSteps=2, checkpointEverySteps=2, logEverySteps=2,
                    labelSmoothing=0.1, warmupSteps=1)
    straight = dpo_job(tmp_path, tiny_model_dir, output="straight", **settings)
    assert run_in_process("dpo", write_job(tmp_path / "straight.yaml", **straight)) == 0

    config = write_job(tmp_path / "resumed.yaml", **dpo_job(tmp_path, tiny_model_dir, output="resumed", **settings))
    killed = run_cli("dpo", config, env={"FINETUNE_FAIL_AT_STEP": "4"})
    assert killed.returncode == 137, killed.stderr[-3000:]
    output = tmp_path / "resumed"
    assert latest_checkpoint(output).name == "step-4" and not (output / "final").exists()
    assert (output / dpo.REFERENCE_DIR / "COMPLETE").is_file()
    capfd.readouterr()
    assert run_in_process("dpo", config) == 0
    err = capfd.readouterr().err
    assert f"reference log-probs read from {output / dpo.REFERENCE_DIR}" in err
    assert f"resumed from {output / 'checkpoints' / 'step-4'} at step 4" in err

    # 36 training pairs in micro-batches of 4: 9 per epoch, 18 in 2 epochs, 2 per step: 9 steps.
    assert progress_events(output)[-1]["step"] == progress_events(tmp_path / "straight")[-1]["step"] == 9
    diff = max_abs_diff(load_state_dict(tmp_path / "straight" / "final"), load_state_dict(output / "final"))
    print(f"max abs weight difference after resume: {diff:.3g}")
    assert diff < 1e-5, diff  # as test_checkpoint_resume: a subprocess may order float sums differently
    assert logged(output)[-1]["eval_loss"] == pytest.approx(logged(tmp_path / "straight")[-1]["eval_loss"], abs=1e-5)
    assert [step for step, _ in complete_checkpoints(output)] == [8, 9]


def test_a_run_resumed_at_its_last_step_still_reports_the_held_out_metrics(tmp_path, tiny_model_dir):
    import shutil

    config = write_job(tmp_path / "job.yaml", **dpo_job(tmp_path, tiny_model_dir, epochs=1))
    assert run_in_process("dpo", config) == 0
    output = tmp_path / "out"
    finished = logged(output)[-1]
    shutil.rmtree(output / "final")  # as if the pod died while writing final/
    (output / "progress.jsonl").unlink()
    assert run_in_process("dpo", config) == 0
    again = logged(output)
    assert len(again) == 1 and again[0]["eval_reward_margin"] == pytest.approx(finished["eval_reward_margin"])
    assert (output / "final" / "COMPLETE").is_file()


def test_a_bad_row_is_reported_with_file_and_line(tmp_path, tiny_model_dir):
    rows = preference_rows(6)
    rows[4] = {"prompt": "Tell me about cats? ", "chosen": "Sure!", "rejected": ""}
    job = dpo_job(tmp_path, tiny_model_dir, rows=rows)
    assert run_in_process("dpo", write_job(tmp_path / "job.yaml", **job)) == 3
    reason = (tmp_path / "termination-log").read_text()
    assert reason == f"PermanentError: {tmp_path / 'prefs.jsonl'}:5: field 'rejected' is empty"


def test_a_non_finite_loss_stops_dpo_before_the_optimizer_step(tmp_path, tiny_model_dir):
    from .test_interruptions import _model_with_nan

    broken = _model_with_nan(tiny_model_dir, tmp_path / "nan-model")
    job = dpo_job(tmp_path, broken, checkpointEverySteps=1)
    assert run_in_process("dpo", write_job(tmp_path / "job.yaml", **job)) == 1  # retryable, like SFT's guard
    reason = (tmp_path / "termination-log").read_text()
    assert reason.startswith("dpo: non-finite values at step 1: grad_norm=nan, loss=nan; lower dpo.learningRate")
    assert complete_checkpoints(tmp_path / "out") == []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_run_learns_and_reports_once(tmp_path, tiny_model_dir):
    job = dpo_job(tmp_path, tiny_model_dir, batchSize=4)
    config = write_job(tmp_path / "job.yaml", **job)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
               "-m", "trainer", "--stage", "dpo", "--config", str(config)]
    result = subprocess.run(command, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    output = tmp_path / "out"
    events = progress_events(output)
    assert [e["kind"] for e in events].count("started") == 1 and events[-1]["kind"] == "succeeded"
    # 36 pairs, 4 per process per step, 2 processes: 5 steps per epoch (the last filled up), 3 epochs.
    assert events[-1]["total_steps"] == 15
    last = logged(output)[-1]
    print(f"2 processes, held-out: accuracy {last['eval_preference_accuracy']:.3f}, "
          f"margin {last['eval_reward_margin']:.3f}")
    assert last["eval_preference_accuracy"] >= 0.9 and last["eval_reward_margin"] > 1.0


# --------------------------------------------------------------------------- encoding and the saved reference


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_pairs_share_the_prompt_and_each_reply_ends_with_eos(tokenizer):
    row = PreferenceRow(where="f:1", prompt="Tell me about cats? ", chosen="Sure, thanks!", rejected="No.")
    raw = dpo.encode_pair(row, tokenizer=tokenizer, max_length=64, chat_template=False)
    assert tokenizer.decode(raw.prompt) == "Tell me about cats? "
    assert tokenizer.decode(raw.chosen) == "Sure, thanks!</s>" and tokenizer.decode(raw.rejected) == "No.</s>"
    templated = dpo.encode_pair(row, tokenizer=tokenizer, max_length=64, chat_template=True)
    assert tokenizer.decode(templated.prompt) == "<|user|>Tell me about cats? <|assistant|>"
    # A conversational row's prompt is already rendered by the template: never templated twice.
    chat = PreferenceRow(where="f:2", prompt="<|user|>hi<|assistant|>", chosen="hello", rejected="go", chat=True)
    assert tokenizer.decode(dpo.encode_pair(chat, tokenizer=tokenizer, max_length=64, chat_template=True).prompt) \
        == "<|user|>hi<|assistant|>"

    batch = dpo.collate_pairs([raw], pad_token_id=0, device="cpu")
    p, c, r = len(raw.prompt), len(raw.chosen), len(raw.rejected)
    assert batch["input_ids"].shape == (2, p + c)  # chosen row, then rejected row padded to it
    assert batch["completion_mask"].tolist() == [[0] * p + [1] * c, [0] * p + [1] * r + [0] * (c - r)]
    assert batch["attention_mask"][1].tolist() == [1] * (p + r) + [0] * (c - r)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_a_shared_prompt_sequence_scores_each_reply_as_its_own_sequence_would(tiny_model_dir, tokenizer, attention):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attention).eval()
    texts = [("Tell me about cats? ", "Sure, thanks! Cats are nice.", "No."),
             ("hello ", "yes", "I hate that, never ask me again."),
             ("", "Tell me about dogs? Sure!", "Tell me about dogs? No.")]  # an implicit prompt
    pairs = [dpo.encode_pair(PreferenceRow(where="f", prompt=p, chosen=c, rejected=r), tokenizer=tokenizer,
                             max_length=64, chat_template=False) for p, c, r in texts]
    with torch.no_grad():
        separate = dpo.pair_logprobs(model, pairs, pad_token_id=0, device="cpu")
        shared = dpo.pair_logprobs(model, pairs, pad_token_id=0, device="cpu", shared_prompt_attention=attention)
    assert torch.equal(shared[1], separate[1])  # the same tokens are scored
    assert torch.allclose(shared[0], separate[0], atol=1e-4), (shared[0], separate[0])
    batch = dpo.collate_shared_prompt(pairs[:1], pad_token_id=0, device="cpu", attention="sdpa")
    p, c, r = len(pairs[0].prompt), len(pairs[0].chosen), len(pairs[0].rejected)
    assert batch["input_ids"].shape == (1, p + c + r)
    assert batch["position_ids"][0].tolist() == list(range(p + c)) + list(range(p, p + r))
    assert not batch["attention_mask"][0, 0, p + c:, p:p + c].any()  # the rejected reply never sees the chosen one
    assert batch["rejected_sources"][0, :2].tolist() == [p - 1, p + c]


def test_models_that_cannot_take_the_shared_prompt_mask_run_pairs_as_two_sequences():
    from types import SimpleNamespace as Config

    assert dpo.shared_prompt_attention(Config(_attn_implementation="sdpa")) == "sdpa"
    assert dpo.shared_prompt_attention(Config(_attn_implementation="flash_attention_2")) is None
    assert dpo.shared_prompt_attention(Config(_attn_implementation="sdpa", sliding_window=4096)) is None
    assert dpo.shared_prompt_attention(Config(_attn_implementation="eager", sliding_window=4096,
                                              use_sliding_window=False)) == "eager"  # Qwen2's default


def test_conversational_rows_are_templated_once_and_train_the_assistant_content(tmp_path, tokenizer):
    from trainer.data import load_preference_rows

    user = [{"role": "user", "content": "hello"}]
    path = write_jsonl(tmp_path / "prefs.jsonl", [
        {"prompt": user, "chosen": [{"role": "assistant", "content": "hello world"}],
         "rejected": [{"role": "assistant", "content": "go away"}]}])
    (row,) = load_preference_rows(path, tokenizer=tokenizer)
    pair = dpo.encode_pair(row, tokenizer=tokenizer, max_length=64, chat_template=True)
    assert tokenizer.decode(pair.prompt) == "<|user|>hello<|assistant|>"
    assert tokenizer.decode(pair.chosen) == "hello world</s>" and tokenizer.decode(pair.rejected) == "go away</s>"


def test_implicit_prompts_split_at_the_common_start_and_long_pairs_keep_their_replies(tokenizer):
    row = PreferenceRow(where="f:1", prompt="", chosen="Tell me about cats? Sure, thanks!",
                        rejected="Tell me about cats? No.")
    pair = dpo.encode_pair(row, tokenizer=tokenizer, max_length=64, chat_template=True)
    assert tokenizer.decode(pair.prompt + pair.chosen) == "Tell me about cats? Sure, thanks!</s>"
    assert tokenizer.decode(pair.prompt).startswith("Tell me about cats?") and len(pair.rejected) >= 2

    long = PreferenceRow(where="f:2", prompt="hello world " * 20, chosen="yes " * 20, rejected="no")
    cut = dpo.encode_pair(long, tokenizer=tokenizer, max_length=16, chat_template=False)
    assert len(cut.prompt) + len(cut.chosen) == 16 and len(cut.chosen) == 8  # replies keep half
    assert cut.prompt == dpo.encode_pair(long, tokenizer=tokenizer, max_length=10 ** 4,
                                         chat_template=False).prompt[-8:]  # the prompt loses its start


def _context(tmp_path, *, run_uid="run-1", **dpo_settings):
    from types import SimpleNamespace

    from trainer.config import StageJob
    from trainer.provenance import job_fingerprint

    job = StageJob.model_validate({"stage": "dpo", "model": str(tmp_path / "no-model"), "outputDir": str(tmp_path),
                                   "runUid": run_uid, "dpo": dpo_settings})
    accelerator = SimpleNamespace(num_processes=1, is_main_process=True, wait_for_everyone=lambda: None)
    return SimpleNamespace(job=job, output_dir=tmp_path, accelerator=accelerator, device=torch.device("cpu"),
                           is_main_process=True, fingerprint=job_fingerprint(job, processes=1))


def test_saved_reference_is_reused_only_by_the_same_run_with_the_same_tokenisation(tmp_path):
    train, held_out = torch.arange(12.0).reshape(3, 4), torch.ones(1, 4)
    dpo.save_reference(_context(tmp_path), train, held_out)
    assert json.loads((tmp_path / dpo.REFERENCE_DIR / "fingerprint.json").read_text())["runUid"] == "run-1"

    found = dpo.load_reference(_context(tmp_path, learningRate=0.5, beta=2.0), train=3, held_out=1)
    assert found is not None and torch.equal(found[0], train) and torch.equal(found[1], held_out)
    assert dpo.load_reference(_context(tmp_path, run_uid="run-2"), train=3, held_out=1) is None
    assert dpo.load_reference(_context(tmp_path, maxSeqLengthTokens=64), train=3, held_out=1) is None
    assert dpo.load_reference(_context(tmp_path, evalFraction=0.5), train=3, held_out=1) is None
    assert dpo.load_reference(_context(tmp_path), train=4, held_out=1) is None
    saved = tmp_path / dpo.REFERENCE_DIR / dpo.REFERENCE_FILE
    saved.write_bytes(saved.read_bytes()[:40])  # damaged behind our back: recomputed, never a failing stage
    assert dpo.load_reference(_context(tmp_path), train=3, held_out=1) is None
