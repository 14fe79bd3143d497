"""The machinery PPO, GRPO and RLOO share: prompt rows with extra fields, held-out split, seeds."""

from __future__ import annotations

import pytest

from trainer.data import DatasetError
from trainer.rollout import PromptRow, load_prompts, split_prompts

from .stage_runs import write_jsonl


def test_prompt_rows_keep_their_extra_fields_for_verifiable_rewards(tmp_path):
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "2+2?", "answer": "4", "level": 1}, {"prompt": "hi"}])
    assert load_prompts(path) == [PromptRow("2+2?", {"answer": "4", "level": 1}), PromptRow("hi", {})]


def test_a_bad_prompt_row_names_the_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "ok"}, {"answer": "4"}])
    with pytest.raises(DatasetError, match=r"prompts.jsonl:2: missing field 'prompt'"):
        load_prompts(path)


def test_the_held_out_split_names_the_stage_setting():
    with pytest.raises(Exception, match="grpo.samplePrompts=2"):
        split_prompts(["a", "b"], held_out=2, source="p.jsonl", setting="grpo.samplePrompts")


@pytest.fixture(scope="module")
def tiny_policy(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def _query():
    from trainer.rollout import left_pad

    return left_pad([[5, 6, 7], [8, 9, 10, 11, 12, 13], [20, 21]], pad_id=0, device="cpu")  # (3, 6)


@pytest.mark.parametrize("top_k", [None, 5])
@pytest.mark.parametrize("with_stop", [False, True])
def test_the_sampler_draws_exactly_what_generate_draws_with_the_same_seed(tiny_policy, top_k, with_stop):
    """Same distribution (temperature, top-k, pad after the stop token, early end) as model.generate:
    with the same seed it draws the same tokens."""
    import torch

    from trainer.rollout import sample

    query, mask = _query()
    stop = None
    if with_stop:  # a token the unstopped sampler draws early in row 0, so stopping really happens
        torch.manual_seed(1)
        stop = int(sample(tiny_policy, query, mask, max_new_tokens=4, temperature=0.7, top_k=top_k,
                          stop_token_id=None, pad_token_id=0).tokens[0, 2])
    torch.manual_seed(1)
    expected = tiny_policy.generate(input_ids=query, attention_mask=mask, do_sample=True, temperature=0.7,
                                    top_k=top_k or 0, top_p=1.0, max_new_tokens=24, eos_token_id=stop,
                                    pad_token_id=0)[:, query.shape[1]:]
    torch.manual_seed(1)
    drawn = sample(tiny_policy, query, mask, max_new_tokens=24, temperature=0.7, top_k=top_k, stop_token_id=stop,
                   pad_token_id=0)
    assert torch.equal(drawn.tokens, expected)
    if with_stop:
        assert (drawn.tokens[0, 3:] == 0).all()  # pad after row 0's stop token


def test_the_samplers_log_probs_and_entropy_agree_with_a_whole_sequence_forward_pass(tiny_policy):
    """What lets fp32 PPO and GRPO skip the old-log-prob forward pass (trainer.rollout.old_logprobs)."""
    import torch

    from trainer import ppo_math
    from trainer.rollout import response_logits, sample

    query, mask = _query()
    torch.manual_seed(2)
    drawn = sample(tiny_policy, query, mask, max_new_tokens=16, temperature=0.7, top_k=None, stop_token_id=None,
                   pad_token_id=0)
    with torch.no_grad():
        logits = response_logits(tiny_policy, torch.cat([query, drawn.tokens], 1),
                                 torch.cat([mask, torch.ones_like(drawn.tokens)], 1), response_length=16,
                                 temperature=0.7)
    assert torch.allclose(drawn.logprobs, ppo_math.logprobs_from_logits(logits, drawn.tokens), atol=1e-5)
    assert torch.allclose(drawn.entropy, ppo_math.entropy_from_logits(logits), atol=1e-5)


class CountingTokenizer:
    """Splits on spaces into ids; counts how often text is tokenised."""

    pad_token_id, bos_token_id, chat_template = 0, None, None

    def __init__(self):
        self.calls = 0

    def __call__(self, text, add_special_tokens=True):
        self.calls += 1
        return {"input_ids": [len(word) for word in text.split()]}


def test_the_prompt_encoder_tokenises_each_prompt_once_per_stage():
    from trainer.rollout import PromptEncoder

    tokenizer = CountingTokenizer()
    encoder = PromptEncoder(tokenizer, max_prompt_tokens=2)
    batches = [["a bb ccc", "dddd"], ["dddd", "a bb ccc"], ["a bb ccc", "ee"]]
    outputs = [encoder([encoder.text(p) for p in batch], "cpu") for batch in batches]
    assert tokenizer.calls == 3  # three distinct prompts over three steps
    ids, mask = outputs[1]
    assert ids.tolist() == [[0, 4], [2, 3]] and mask.tolist() == [[0, 1], [1, 1]]  # left-padded, last 2 tokens
