"""What each lever of the shared rollout machinery is worth, measured alone on the PPO benchmark's workload.

In one process, on the tiny policy of benchmarks/tiny_workload.py (batch 8, 32 response tokens, no stop
token, temperature 0.7, fp32, one torch thread), alternating the two variants of each lever and
repeating (``--repeats``, default 9), it prints the median milliseconds per batch of:

- generation: ``model.generate`` (what the stages ran before) against ``trainer.rollout.sample``;
- the sampling loop itself: our loop over the model's own forward (a DynamicCache) against the same loop
  on the lean pass (``trainer.lean_decoder``: a KV cache allocated once, inference mode);
- the old-log-prob pass: the policy's forward pass over prompt + response that fp32 stages now skip,
  taking the sampler's log-probs instead (``trainer.rollout.old_logprobs``);
- scoring: decoding the responses and re-tokenising prompt + response for the reward model, against the
  reward model's forward pass itself, to show what scoring on token ids directly could save;
- the reward model's pass: its own forward against the lean pass (``trainer.lean_decoder.classifier_logits``).

Times are this thread's CPU time (``time.thread_time``): on a shared machine, time spent waiting for a core
would otherwise dominate the spread.

    .venv/bin/python benchmarks/rollout_levers.py [--repeats 9]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from tiny_workload import build_models, prompts  # noqa: E402

BATCH = 8
RESPONSE_TOKENS = 32
TEMPERATURE = 0.7


def timed(fn) -> float:
    start = time.thread_time()
    fn()
    return (time.thread_time() - start) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from trainer import ppo_math
    from trainer.data import encode_for_reward
    from trainer.lean_decoder import LeanDecoder, classifier_logits
    from trainer.rollout import left_pad, response_logits, sample

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        sft, rm = build_models(Path(tmp))
        tokenizer = AutoTokenizer.from_pretrained(sft)
        policy = AutoModelForCausalLM.from_pretrained(sft).eval()
        reward_model = AutoModelForSequenceClassification.from_pretrained(rm, num_labels=1).eval()
    texts = prompts(tokenizer)[:BATCH]
    query, query_mask = left_pad([tokenizer(t)["input_ids"] for t in texts], pad_id=tokenizer.pad_token_id,
                                 device="cpu")

    def generate():
        return policy.generate(input_ids=query, attention_mask=query_mask, do_sample=True, temperature=TEMPERATURE,
                               top_k=0, top_p=1.0, max_new_tokens=RESPONSE_TOKENS, eos_token_id=None,
                               pad_token_id=tokenizer.pad_token_id)

    def lean():
        return sample(policy, query, query_mask, max_new_tokens=RESPONSE_TOKENS, temperature=TEMPERATURE,
                      top_k=None, stop_token_id=None, pad_token_id=tokenizer.pad_token_id)

    def model_forward_loop():
        of = LeanDecoder.of
        LeanDecoder.of = classmethod(lambda cls, model: None)  # what sample does for a model the lean pass skips
        try:
            return lean()
        finally:
            LeanDecoder.of = of

    with torch.no_grad():
        responses = lean().tokens
        ids = torch.cat([query, responses], 1)
        mask = torch.cat([query_mask, torch.ones_like(responses)], 1)

        def old_logprob_pass():
            logits = response_logits(policy, ids, mask, response_length=RESPONSE_TOKENS, temperature=TEMPERATURE)
            ppo_math.logprobs_from_logits(logits, responses)
            ppo_math.entropy_from_logits(logits)

        def decode_and_retokenise():
            decoded = tokenizer.batch_decode(responses, skip_special_tokens=True)
            return [encode_for_reward(tokenizer, prompt=p, response=r, max_length=512) for p, r in zip(texts, decoded)]

        encoded = decode_and_retokenise()
        width = max(len(x) for x in encoded)
        rm_ids = torch.tensor([x + [tokenizer.pad_token_id] * (width - len(x)) for x in encoded])
        rm_mask = (rm_ids != tokenizer.pad_token_id).long()

        def reward_forward():
            reward_model(input_ids=rm_ids, attention_mask=rm_mask)

        def reward_lean():
            classifier_logits(reward_model, rm_ids, rm_mask)

        pairs = {"generation": (("model.generate", generate), ("trainer.rollout.sample", lean)),
                 "sampling loop": (("model's forward", model_forward_loop), ("lean pass", lean)),
                 "old-log-prob pass": (("policy forward", old_logprob_pass), ("skipped (fp32)", lambda: None)),
                 "scoring": (("decode + re-tokenise", decode_and_retokenise), ("reward-model forward", reward_forward)),
                 "reward model": (("model's forward", reward_forward), ("lean pass", reward_lean))}
        for fn in (generate, lean, model_forward_loop, old_logprob_pass, decode_and_retokenise, reward_forward,
                   reward_lean):
            fn()  # warm-up
        print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {BATCH}, "
              f"{RESPONSE_TOKENS} response tokens, {args.repeats} alternating repeats; median CPU ms per batch "
              "(min-max)", flush=True)
        for lever, ((name_a, a), (name_b, b)) in pairs.items():
            times_a, times_b = [], []
            for rep in range(args.repeats):
                for fn, into in ([(a, times_a), (b, times_b)] if rep % 2 == 0 else [(b, times_b), (a, times_a)]):
                    into.append(timed(fn))
            print(f"{lever:18s} {name_a:22s} {statistics.median(times_a):7.1f} ({min(times_a):.1f}-{max(times_a):.1f})"
                  f"   {name_b:22s} {statistics.median(times_b):7.1f} ({min(times_b):.1f}-{max(times_b):.1f})",
                  flush=True)


if __name__ == "__main__":
    main()
