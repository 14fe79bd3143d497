"""PPO with ppo.valueModel: head, a linear value head on the policy's backbone instead of a separate value model:
it learns the toy task, resumes bit-identically (head weights and optimizer state in the checkpoint), works
with LoRA and on two processes, and the final policy stays a plain causal LM with the head saved beside it."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from trainer import ppo
from trainer.checkpoint import complete_checkpoints
from trainer.config import ConfigError, load_stage_job

from .stage_runs import (checkpoint_tensor_names, final_weight_difference, kill_and_resume, load_state_dict,
                         max_abs_diff, progress_events, run_cli, run_in_process, write_job)
from .test_ppo import ppo_job, samples_by_step, toy_sft_dir  # noqa: F401  (fixture)
from .test_ppo_distributed import _job as two_process_job
from .test_ppo_distributed import run_two_processes
from .test_ppo_lora import LORA


def test_a_value_head_policy_learns_to_say_the_rewarded_word_while_kl_stays_bounded(tmp_path, toy_sft_dir):  # noqa: F811
    """test_ppo's learning test with the value head (same task, seeds and settings).

    Held-out reward (32 prompts) went 0.0 -> 0.84, 0.03 -> 0.91 and 0.0 -> 1.0 for seeds 0, 1, 2 when this
    test was written (held-out KL 3.2-4.1 nats), like the separate value model's 0.88-0.97. Asserted as there: final >= 0.6,
    a gain >= 0.4, KL < 15 nats.
    """
    job = ppo_job(tmp_path, toy_sft_dir, output="out", steps=30, batchSize=16, ppoEpochs=4, miniBatches=1,
                  learningRate=3e-3, samplePrompts=32, sampleEverySteps=10, checkpointEverySteps=1000,
                  klCoef=0.05, logEverySteps=10, valueModel="head")
    assert run_in_process("ppo", write_job(tmp_path / "ppo.yaml", **job)) == 0
    by_step = samples_by_step(tmp_path / "out")
    mean = {step: sum(s["reward"] for s in v) / len(v) for step, v in by_step.items()}
    kl = {step: sum(s["kl"] for s in v) / len(v) for step, v in by_step.items()}
    metrics = [e["metrics"] for e in progress_events(tmp_path / "out") if e.get("metrics") and "value_loss" in e["metrics"]]
    print(f"held-out reward by step {mean}, KL {kl}, value loss {[m['value_loss'] for m in metrics]}")
    assert mean[30] >= 0.6
    assert mean[30] - mean[0] >= 0.4
    assert kl[30] < 15.0


def test_the_final_policy_is_a_plain_causal_lm_and_the_trained_head_lies_beside_it(tmp_path, toy_sft_dir):  # noqa: F811
    from transformers import AutoModelForCausalLM

    job = ppo_job(tmp_path, toy_sft_dir, output="out", valueModel="head")
    result = run_cli("ppo", write_job(tmp_path / "ppo.yaml", **job))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "value head on the policy's last hidden state" in result.stdout + result.stderr
    final = tmp_path / "out" / "final"
    policy = AutoModelForCausalLM.from_pretrained(final)  # no head inside: loads as it is, nothing missing
    head = load_file(str(final / ppo.VALUE_HEAD_FILE))
    assert head["weight"].shape == (1, policy.config.hidden_size) and head["bias"].shape == (1,)
    assert head["weight"].abs().sum() > 0  # trained away from its zero start

    # The checkpoint: the policy (model), the head alone (model_1: no second transformer), the optimizer.
    checkpoint = complete_checkpoints(tmp_path / "out")[-1][1]
    keys = checkpoint_tensor_names(checkpoint)
    assert sorted(keys["model_1.safetensors"]) == ["head.bias", "head.weight"]
    assert (checkpoint / "optimizer.bin").exists()


@pytest.mark.parametrize("lora", [None, LORA], ids=["full", "lora"])
def test_a_value_head_run_resumed_after_a_kill_ends_like_an_uninterrupted_one(tmp_path, toy_sft_dir, lora):  # noqa: F811
    """The final policy and the head beside it are compared. Observed difference: 0 (bitwise). Asserted < 1e-5:
    a head or its AdamW moments not restored would differ by far more (learning rate 1e-2 with LoRA)."""
    settings = dict(steps=4, checkpointEverySteps=2, valueModel="head", adaptiveKl={"targetKl": 0.5, "horizon": 100},
                    **({"lora": LORA, "learningRate": 1e-2} if lora else {}))
    straight = write_job(tmp_path / "straight.yaml", **ppo_job(tmp_path, toy_sft_dir, output="straight", **settings))
    result = run_cli("ppo", straight)
    assert result.returncode == 0, result.stderr[-3000:]
    if lora:  # the head trains beside the adapters; checkpoints hold neither base
        keys = checkpoint_tensor_names(complete_checkpoints(tmp_path / "straight")[-1][1])
        assert keys["model.safetensors"] and all("lora_" in k for k in keys["model.safetensors"])
        assert sorted(keys["model_1.safetensors"]) == ["head.bias", "head.weight"]
        assert max_abs_diff(load_state_dict(toy_sft_dir),
                            {k: v for k, v in load_state_dict(tmp_path / "straight" / "final").items()
                             if k not in ("weight", "bias")}) > 0  # the adapters did train

    resumed = write_job(tmp_path / "resumed.yaml", **ppo_job(tmp_path, toy_sft_dir, output="resumed", **settings))
    kill_and_resume("ppo", resumed, tmp_path / "resumed")
    heads = [load_file(str(tmp_path / run / "final" / ppo.VALUE_HEAD_FILE)) for run in ("straight", "resumed")]
    assert max_abs_diff(*heads) < 1e-5
    assert final_weight_difference(tmp_path / "straight", tmp_path / "resumed") < 1e-5


def test_two_process_value_head_ppo_resumed_after_a_kill_ends_like_an_uninterrupted_run(tmp_path, tiny_model_dir):
    """test_ppo_distributed's resume test with the head (DDP over the policy and over the head); asserted < 1e-5."""
    straight = write_job(tmp_path / "straight.yaml",
                         **two_process_job(tmp_path, tiny_model_dir, output="straight", valueModel="head"))
    result = run_two_processes(tmp_path, straight)
    assert result.returncode == 0, result.stderr[-4000:]

    resumed = write_job(tmp_path / "resumed.yaml",
                        **two_process_job(tmp_path, tiny_model_dir, output="resumed", valueModel="head"))
    killed = run_two_processes(tmp_path, resumed, env={"FINETUNE_FAIL_AT_STEP": "2"})
    assert killed.returncode != 0 and "FINETUNE_FAIL_AT_STEP=2" in killed.stderr, killed.stderr[-4000:]
    result = run_two_processes(tmp_path, resumed)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "resumed from" in result.stdout + result.stderr
    assert final_weight_difference(tmp_path / "straight", tmp_path / "resumed") < 1e-5


def test_value_model_setting_names_the_field_and_its_choices(tmp_path, toy_sft_dir):  # noqa: F811
    config = write_job(tmp_path / "ppo.yaml", **ppo_job(tmp_path, toy_sft_dir, output="out", valueModel="shared"))
    with pytest.raises(ConfigError, match=r"ppo\.valueModel: .*'separate' or 'head'"):
        load_stage_job(config)
    assert load_stage_job(write_job(tmp_path / "ok.yaml", **ppo_job(tmp_path, toy_sft_dir, output="out"))
                          ).ppo.value_model == "separate"  # the default: existing runs are unchanged


def test_the_value_heads_pass_gives_the_models_own_logits_and_last_hidden_state(tiny_model_dir):
    """policy_pass through the lean path and through the model's own forward (here: eager attention, which the
    lean pass does not cover; likewise PEFT and DDP) agree with the model's output, so the head reads the same
    features on one process, on two, and with LoRA."""
    from transformers import AutoModelForCausalLM

    from trainer.lean_decoder import LeanDecoder

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
    eager = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager")
    assert LeanDecoder.of(model) is not None and LeanDecoder.of(eager) is None
    ids = torch.tensor([[0, 0, 5, 6, 7, 8, 9], [3, 4, 5, 6, 7, 8, 9]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7])
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=ppo.positions(mask), output_hidden_states=True)
        expected = out.logits[:, -4:-1] / 0.5
        for policy in (model, eager):
            hidden, logits = ppo.policy_pass(policy, ids, mask, response_length=3, temperature=0.5)
            assert hidden.shape == (2, 7, model.config.hidden_size) and logits.shape == expected.shape
            real = mask.bool()  # padded positions' hidden states are never read
            assert torch.allclose(hidden[real], out.hidden_states[-1][real], atol=1e-5)
            assert torch.allclose(logits, expected, atol=1e-4)
            assert ppo.policy_pass(policy, ids, mask, response_length=3, temperature=None)[1] is None


@pytest.mark.parametrize("value_model", ["separate", "head"])
def test_the_value_loss_moves_the_policy_only_through_a_shared_head(tmp_path, toy_sft_dir, value_model):  # noqa: F811
    """vfCoef 0 against 1, same seeds, one PPO step of 4 optimizer steps: with a separate value model the policy
    ends the same (the value loss trains only that model); with the head it differs, since the value loss is
    back-propagated through the policy's backbone (from the second optimizer step on, once the zero-initialised
    head is not zero). One step, so that the values' effect on the next rollout's advantages does not enter,
    and no gradient clipping, whose shared norm would couple even separate networks. Observed: separate 0
    (bitwise), head 3.6e-3."""
    finals = []
    for vf_coef in (0.0, 1.0):
        output = f"vf{vf_coef}"
        job = ppo_job(tmp_path, toy_sft_dir, output=output, steps=1, vfCoef=vf_coef, valueModel=value_model, maxGradNorm=1e9,
                      checkpointEverySteps=1000, sampleEverySteps=1000)
        assert run_in_process("ppo", write_job(tmp_path / f"{output}.yaml", **job)) == 0
        finals.append({k: v for k, v in load_state_dict(tmp_path / output / "final").items()
                       if k not in ("weight", "bias")})  # the policy's weights, not the head beside them
    difference = max_abs_diff(*finals)
    print(f"{value_model}: policy weight difference between vfCoef 0 and 1: {difference:.3g}")
    assert (difference > 1e-6) == (value_model == "head")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_in_low_precision_one_policy_pass_gives_the_old_logprobs_and_the_values_of_two(tiny_model_dir, dtype):
    """The rollout's head pass (bf16/fp16) returns bit for bit the old log-probs and entropies of old_logprobs's
    own policy pass and the values of a hidden-state pass, so dropping one of the two passes changes nothing."""
    from transformers import AutoModelForCausalLM

    from trainer.rollout import SampledBatch, response_logits

    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    head = ppo.ValueHead(policy.config.hidden_size)
    with torch.no_grad():  # a zero head would give zero values whatever it read
        head.head.weight.normal_()
        head.head.bias.fill_(0.5)
    query = torch.tensor([[0, 0, 5, 6], [3, 4, 5, 6]])
    responses = torch.tensor([[7, 8, 9], [10, 11, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    batch = SampledBatch(prompts=["a", "b"], responses_text=[], input_ids=torch.cat([query, responses], 1),
                         attention_mask=torch.cat([(query != 0).long(), mask], 1), prompt_length=4,
                         responses=responses, mask=mask.float(), has_stop=torch.ones(2, dtype=torch.bool),
                         scores=torch.zeros(2), sampling_logprobs=torch.zeros(2, 3), sampling_entropy=torch.zeros(2, 3))
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        got = ppo.head_rollout_passes(policy, head, batch, temperature=0.7, with_logprobs=True)
        logits = response_logits(policy, batch.input_ids, batch.attention_mask, response_length=3, temperature=0.7)
        hidden, _ = ppo.policy_pass(policy, batch.input_ids, batch.attention_mask, response_length=3,
                                    temperature=None)
        values = head(hidden[:, 3:-1]).float()
        assert torch.equal(got["logprobs"], ppo.ppo_math.logprobs_from_logits(logits, responses))
        assert torch.equal(got["entropy"], ppo.ppo_math.entropy_from_logits(logits))
    assert torch.equal(got["values"], values)
    assert float(values.abs().sum()) > 0
    assert set(ppo.head_rollout_passes(policy, head, batch, temperature=0.7, with_logprobs=False)) == {"values"}


def test_a_bf16_value_head_run_takes_its_old_logprobs_from_the_pass_the_update_repeats(tmp_path, toy_sft_dir):  # noqa: F811
    """bf16, one epoch of one minibatch: the update's first (and only) pass sees the policy the rollout's head pass
    ran, so with the old log-probs taken from that pass the ratio is exactly 1 and approx_kl exactly 0 at every
    step (the sampler's own log-probs, a cached token-by-token pass, would differ in bf16)."""
    job = ppo_job(tmp_path, toy_sft_dir, output="out", steps=2, ppoEpochs=1, miniBatches=1, precision="bf16",
                  valueModel="head", checkpointEverySteps=1000)
    # Its own process: accelerate's mixed precision is fixed for a process once an fp32 stage ran in it.
    result = run_cli("ppo", write_job(tmp_path / "ppo.yaml", **job))
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = [e["metrics"] for e in progress_events(tmp_path / "out") if e.get("metrics") and "ratio_mean" in e["metrics"]]
    assert len(metrics) == 2
    for m in metrics:
        assert m["ratio_mean"] == 1.0 and m["approx_kl"] == 0.0, m
        assert m["value_loss"] > 0
