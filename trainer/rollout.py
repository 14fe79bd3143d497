"""What the online stages (PPO, GRPO, RLOO) share: prompts, sampling, scoring and held-out samples.

A stage builds a ``PromptEncoder`` and a ``CompositeReward`` (``build_reward``), then each
step calls ``sample_and_score`` on its prompts (GRPO repeats each prompt G times) and adds
its own forward passes (log-probs, values, reference) to the returned ``SampledBatch``.
``sample_held_out`` records the held-out samples every stage reports.

Shapes: b = sequences on this process, p = prompt tokens (left-padded), t = response tokens
(right-padded after the stop token), v = vocabulary.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer import ppo_math
from trainer.lean_decoder import KVCache, LeanDecoder
from trainer.data import PromptRow, encode_text, load_prompt_rows, render_prompt
from trainer.modeling import HUB_SCHEME, ModelSource, load_sequence_classifier, resolve_model_source
from trainer.rewards import CompositeReward, RewardError, load_normalization
from trainer.runtime import PermanentStageFailure, StageContext, StageFailed

SAMPLES_FILE = "samples.jsonl"
SAMPLES_REPORTED = 4
"""How many of the latest held-out samples travel in a progress event."""


# ---------------------------------------------------------------------------
# prompts


def load_prompts(path: str | Path) -> list[PromptRow]:
    """Validated prompt rows (text or messages, plus extra fields) in file order; a bad row raises
    DatasetError naming the file and line (``trainer.data.load_prompt_rows``)."""
    return load_prompt_rows(path)


def split_prompts(prompts: list, *, held_out: int, source: str, setting: str = "ppo.samplePrompts") -> tuple[list, list]:
    """(held-out, training): the first ``held_out`` rows are never trained on."""
    if len(prompts) <= held_out:
        raise PermanentStageFailure(f"{source}: {len(prompts)} prompts, but {setting}={held_out} are held out "
                                    f"for samples; provide more prompts or lower {setting}")
    return prompts[:held_out], prompts[held_out:]


def step_seed(seed: int, *, rank: int, step: int) -> int:
    """Sampling seed of one step on one process: distinct per rank (Huang et al.), a pure function of the step
    so a resumed run draws exactly the samples the interrupted one would have."""
    return (seed * 1_000_003 + rank * 100_003 + step) % (2**63)


# ---------------------------------------------------------------------------
# reward


def reward_model_source(reward_model: str | None) -> ModelSource | None:
    """The ``from_pretrained`` source of job.rewardModel, or None when it holds no trained model.

    A reward-stage output trained without preference data is a directory with only
    reward_functions.json: no model, not an error. A path that does not exist is an
    error, so a typo cannot silently run without the reward model.
    """
    if not reward_model:
        return None
    path = Path(reward_model)
    if not reward_model.startswith(HUB_SCHEME) and path.is_dir() and not (path / "config.json").is_file():
        return None
    try:
        return resolve_model_source(reward_model)
    except StageFailed as exc:  # keeps the class: a missing model is permanent
        raise type(exc)(f"rewardModel: {exc}; point it at the reward stage's final/ directory") from exc


def build_reward(ctx: StageContext, tokenizer, *, reward_source: ModelSource | None, cfg) -> CompositeReward:
    """Functions from job.reward.functions, plus the reward model at ``reward_source`` if any.

    ``cfg`` is the stage's settings (its rewardModelWeight and maxSeqLengthTokens).
    """
    reward_model, normalization = None, (0.0, 1.0)
    if reward_source is not None:
        reward_model = load_sequence_classifier(reward_source, dtype=ctx.dtype, pad_token_id=tokenizer.pad_token_id)
        reward_model.to(ctx.device).eval().requires_grad_(False)
        try:
            normalization = load_normalization(reward_source)
        except RewardError as exc:
            raise StageFailed(f"rewardModel: {exc}") from exc
    try:
        return CompositeReward(ctx.job.reward.functions, tokenizer=tokenizer, reward_model=reward_model,
                               normalization=normalization, reward_model_weight=cfg.reward_model_weight,
                               max_length=cfg.max_seq_length_tokens, device=ctx.device)
    except RewardError as exc:  # a function that cannot be built fails the same way on every retry
        raise PermanentStageFailure(str(exc)) from exc


def score_responses(reward: CompositeReward, prompts: list[str], responses: list[str],
                    rows: list[dict] | None = None) -> torch.Tensor:
    """(b,) scores on the CPU; a reward function that returns garbage stops the stage with its name."""
    try:
        return reward.score(prompts, responses, rows)
    except RewardError as exc:
        raise StageFailed(str(exc)) from exc


# ---------------------------------------------------------------------------
# tokens


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding: 0 at the first real token."""
    return (attention_mask.cumsum(1) - 1).clamp(min=0)


def left_pad(token_lists: list[list[int]], *, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask), both (b, p), prompts aligned to the right so generation continues each one."""
    width = max(len(x) for x in token_lists)
    ids = torch.full((len(token_lists), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(token_lists), width), dtype=torch.long)
    for row, tokens in enumerate(token_lists):
        if tokens:
            ids[row, width - len(tokens):] = torch.tensor(tokens)
            mask[row, width - len(tokens):] = 1
    return ids.to(device), mask.to(device)


def response_logits(model, input_ids, attention_mask, *, response_length: int, temperature: float) -> torch.Tensor:
    """Logits predicting each response token, divided by the sampling temperature: (b, t, v) float32.

    The logits at position p - 1 + i predict response token i; ``logits_to_keep`` avoids
    materialising the vocabulary-sized logits of the prompt.
    """
    lean = LeanDecoder.of(model)
    if lean is not None:
        hidden = lean.forward_hidden(input_ids, attention_mask, positions(attention_mask))
        logits = lean.logits(hidden[:, -(response_length + 1):])
    else:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions(attention_mask),
                       logits_to_keep=response_length + 1).logits
    return logits[:, :-1].float() / temperature


def response_logprobs(model, batch: "SampledBatch", *, temperature: float) -> torch.Tensor:
    """log pi(response token) under ``model``: (b, t) float32."""
    logits = response_logits(model, batch.input_ids, batch.attention_mask, response_length=batch.responses.shape[1],
                             temperature=temperature)
    return ppo_math.logprobs_from_logits(logits, batch.responses)


def old_logprobs(ctx: StageContext, policy, batch: "SampledBatch", *,
                 temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs, entropy), each (b, t) float32, of the sampled responses under the policy that drew them.

    In fp32 these are the sampler's own (``Samples``): the logits each token was drawn from, which a
    second forward pass over prompt + response reproduces to about 1e-6 (a cached, one-token-at-a-time
    pass against a whole-sequence one: the same arithmetic in another order), so the pass is skipped.
    In bf16/fp16 the two orders round differently by far more, which would bias the first ratio, so
    the policy runs the whole-sequence pass the update itself will run.
    """
    if ctx.dtype == torch.float32:
        return batch.sampling_logprobs, batch.sampling_entropy
    with ctx.accelerator.autocast():
        logits = response_logits(policy, batch.input_ids, batch.attention_mask,
                                 response_length=batch.responses.shape[1], temperature=temperature)  # (b, t, v)
        return ppo_math.logprobs_from_logits(logits, batch.responses), ppo_math.entropy_from_logits(logits)


class PromptEncoder:
    """Renders prompt rows as the policy sees them and tokenises them (BOS once, the end of long prompts kept).

    With ``chat_template`` (the stages' ``chatTemplate`` setting) and a tokenizer that has one, a text
    prompt becomes one user message rendered with the assistant's opening, as an instruct model
    expects; message prompts always go through the template. The rendered text is also what the
    reward scores the response after (``trainer.data.encode_for_reward``).
    """

    def __init__(self, tokenizer, *, max_prompt_tokens: int, chat_template: bool = False):
        self.tokenizer = tokenizer
        self.max_prompt_tokens = max_prompt_tokens
        self.chat_template = chat_template
        # Each prompt is rendered and tokenised once per stage process, not on every step that
        # draws it again (epochs over a prompt file revisit every row). Prompts are short, so an
        # in-memory table is the whole cost; unlike SFT/reward/DPO data, a disk cache shared by
        # ranks and retries would save milliseconds, not minutes.
        self._texts: dict[str, str] = {}
        self._ids: dict[str, list[int]] = {}

    def text(self, prompt) -> str:
        """The text the policy continues for a row's ``prompt`` (a string or a message list)."""
        key = prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)
        if key not in self._texts:
            self._texts[key] = render_prompt(self.tokenizer, prompt, chat_template=self.chat_template)
        return self._texts[key]

    def ids(self, text: str) -> list[int]:
        """Token ids of a rendered prompt text, cut to the last ``max_prompt_tokens``."""
        if text not in self._ids:
            self._ids[text] = encode_text(self.tokenizer, text)[-self.max_prompt_tokens:]
        return self._ids[text]

    def __call__(self, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded (b, p) ids and mask of already rendered prompt texts."""
        return left_pad([self.ids(p) for p in prompts], pad_id=self.tokenizer.pad_token_id, device=device)


# ---------------------------------------------------------------------------
# sampling


def now(device: torch.device) -> float:
    """A time stamp after the device's queued work (CUDA is asynchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@dataclass
class Samples:
    """What ``sample`` drew: tokens and, for each, the policy's log-probability and entropy at that step."""

    tokens: torch.Tensor  # (b, t) sampled ids, pad after a row's stop token
    logprobs: torch.Tensor  # (b, t) float32 log softmax(logits / temperature)[token], full vocabulary (no top-k)
    entropy: torch.Tensor  # (b, t) float32 entropy of softmax(logits / temperature)


@torch.no_grad()
def sample(model, query: torch.Tensor, query_mask: torch.Tensor, *, max_new_tokens: int, temperature: float,
           top_k: int | None, stop_token_id: int | None, pad_token_id: int) -> Samples:
    """Sample up to ``max_new_tokens`` tokens after the left-padded (b, p) ``query``, one token per forward.

    The distribution is ``model.generate``'s with do_sample, this temperature and top-k and nothing else
    (no repetition penalty or other processor from a saved generation_config): softmax(logits /
    temperature), restricted to the top_k largest logits when top_k is set, one multinomial draw per
    row. A row that has drawn the stop token continues with pad tokens; sampling ends when every row
    has stopped (so t <= max_new_tokens). The loop skips generate()'s per-step bookkeeping and keeps a
    growing key/value cache (DynamicCache): a cache pre-allocated for prompt + response (StaticCache)
    measured slower at the sizes we benchmark, since every step then attends over the whole allocated
    length (benchmarks/README.md, rollout_levers.py).

    ``logprobs`` and ``entropy`` are of the full tempered distribution (what the PPO and GRPO losses use),
    computed from the logits the draw came from.
    """
    lean = LeanDecoder.of(model)
    if lean is not None:
        # Inference mode skips autograd's per-op bookkeeping (version counters, view tracking): about a tenth of
        # the loop's CPU time here. Its tensors cannot enter autograd later, so the results leave as copies.
        with torch.inference_mode():
            first_logits, step = _lean_steps(lean, query, query_mask, max_new_tokens=max_new_tokens)
            drawn = _sample_loop(first_logits, step, max_new_tokens=max_new_tokens, temperature=temperature,
                                 top_k=top_k, stop_token_id=stop_token_id, pad_token_id=pad_token_id)
        return Samples(drawn.tokens.clone(), drawn.logprobs.clone(), drawn.entropy.clone())
    with warnings.catch_warnings():  # transformers 5 renames past_key_values to cache; 4.56 knows only the old name
        warnings.filterwarnings("ignore", message=".*past_key_values.*", category=FutureWarning)
        first_logits, step = _model_steps(model, query, query_mask, max_new_tokens=max_new_tokens)
        return _sample_loop(first_logits, step, max_new_tokens=max_new_tokens, temperature=temperature,
                            top_k=top_k, stop_token_id=stop_token_id, pad_token_id=pad_token_id)


def _model_steps(model, query, query_mask, *, max_new_tokens):
    """(logits after the prompt (b, v), step(token, i) -> logits after response token i) through the model's own
    forward and a DynamicCache."""
    from transformers import DynamicCache

    b, p = query.shape
    device = query.device
    cache = DynamicCache(config=model.config)
    # Prompt mask, then ones for the response: tokens after a stop are pad but are attended like generate() does.
    mask = torch.cat([query_mask, query_mask.new_ones(b, max_new_tokens)], 1)  # (b, p + max_new_tokens)
    position = positions(query_mask)  # (b, p)
    logits = model(input_ids=query, attention_mask=query_mask, position_ids=position, past_key_values=cache,
                   use_cache=True, cache_position=torch.arange(p, device=device), logits_to_keep=1).logits[:, -1]
    next_position = position[:, -1:] + 1  # (b, 1)

    def step(token, i):
        return model(input_ids=token[:, None], attention_mask=mask[:, :p + i + 1], position_ids=next_position + i,
                     past_key_values=cache, use_cache=True,
                     cache_position=torch.tensor([p + i], device=device)).logits[:, -1]
    return logits, step


def _lean_steps(lean: LeanDecoder, query, query_mask, *, max_new_tokens):
    """``_model_steps`` on the lean forward pass (trainer.lean_decoder): the same logits, with the per-step work
    that does not depend on the drawn token (rotary table, attention mask) done once up front."""
    b, p = query.shape
    device = query.device
    dtype = lean.base.embed_tokens.weight.dtype  # transformers casts the rotary table to the embeddings' dtype
    position = positions(query_mask)  # (b, p)
    cache = KVCache(len(lean.layers), p + max_new_tokens)
    hidden = lean.hidden(query, position_ids=position, mask=lean.attention_mask(query_mask, p), cache=cache)
    logits = lean.logits(hidden[:, -1:])[:, -1]  # (b, v)
    step_positions = position[:, -1:] + 1 + torch.arange(max_new_tokens, device=device)  # (b, t)
    cos, sin = lean.rotary(step_positions, dtype)  # (b, t, d) each
    # One query per step: transformers passes no mask when nothing is padded, else the padding row.
    step_mask = None
    if not bool(query_mask.bool().all()):
        step_mask = torch.cat([query_mask.bool(), query_mask.new_ones(b, max_new_tokens, dtype=torch.bool)], 1)
        step_mask = step_mask[:, None, None, :]  # (b, 1, 1, p + t)

    def step(token, i):
        hidden = lean.hidden(token[:, None], position_ids=step_positions[:, i:i + 1],
                             mask=None if step_mask is None else step_mask[..., :p + i + 1],
                             rotary=(cos[:, i:i + 1], sin[:, i:i + 1]), cache=cache)
        return lean.logits(hidden)[:, -1]
    return logits, step


def _sample_loop(logits, step, *, max_new_tokens, temperature, top_k, stop_token_id, pad_token_id) -> Samples:
    """Draw from ``logits`` (b, v), feed the token to ``step`` for the next logits, until done."""
    b, device = logits.shape[0], logits.device
    tokens = torch.full((b, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    logprobs = torch.zeros((b, max_new_tokens), dtype=torch.float32, device=device)
    entropy = torch.zeros((b, max_new_tokens), dtype=torch.float32, device=device)
    stopped = torch.zeros(b, dtype=torch.bool, device=device)
    pad = torch.full((b,), pad_token_id, dtype=torch.long, device=device)
    length = max_new_tokens
    for i in range(max_new_tokens):
        scaled = logits.float() / temperature  # (b, v)
        logp = torch.log_softmax(scaled, dim=-1)
        kept = scaled
        if top_k is not None and top_k < scaled.shape[-1]:
            kth = torch.topk(scaled, top_k, dim=-1).values[:, -1:]  # (b, 1)
            kept = scaled.masked_fill(scaled < kth, float("-inf"))
        token = torch.multinomial(torch.softmax(kept, dim=-1), 1).squeeze(1)  # (b,)
        token = torch.where(stopped, pad, token)
        tokens[:, i] = token
        logprobs[:, i] = logp.gather(1, token[:, None]).squeeze(1)
        entropy[:, i] = torch.logsumexp(scaled, dim=-1) - (logp.exp() * scaled).sum(-1)
        if stop_token_id is not None:  # the one host sync per step, only when a stop token can end sampling early
            stopped |= token == stop_token_id
            if bool(stopped.all()):
                length = i + 1
                break
        if i + 1 == max_new_tokens:
            break
        logits = step(token, i)
    return Samples(tokens[:, :length], logprobs[:, :length], entropy[:, :length])


@dataclass
class SampledBatch:
    """Sampled, truncated and scored responses; every tensor is detached and on the stage's device."""

    prompts: list[str]
    responses_text: list[str]
    input_ids: torch.Tensor  # (b, p + t) prompt (left-padded) + response (pad after the stop token)
    attention_mask: torch.Tensor  # (b, p + t)
    prompt_length: int  # p
    responses: torch.Tensor  # (b, t)
    mask: torch.Tensor  # (b, t) float, 1 on real response tokens, stop token included
    has_stop: torch.Tensor  # (b,) bool
    scores: torch.Tensor  # (b,) reward score, missing-EOS penalty applied
    sampling_logprobs: torch.Tensor  # (b, t) log pi(token) from the logits the token was drawn from
    sampling_entropy: torch.Tensor  # (b, t)


@torch.no_grad()
def sample_and_score(ctx: StageContext, *, cfg, policy_module, encoder: PromptEncoder, reward: CompositeReward,
                     prompts: list[PromptRow], timings: dict[str, float] | None = None,
                     before_scoring=None) -> SampledBatch:
    """Generate one response per prompt row (repeat a row to get several), cut at the stop token, score.

    ``cfg`` is the stage's settings (temperature, topK, responseLengthTokens, stopToken, missingEosPenalty);
    ``policy_module`` the unwrapped policy. ``before_scoring(batch)`` runs between truncation and scoring
    (the stage's own forward passes, timed as ``timings["forward"]``; ``timings["scoring"]`` is the reward).
    """
    timings = {} if timings is None else timings
    acc, device = ctx.accelerator, ctx.device
    tokenizer = encoder.tokenizer
    stop_id = tokenizer.eos_token_id if cfg.stop_token == "eos" else None
    texts_in = [encoder.text(row.prompt) for row in prompts]

    tick = now(device)
    query, query_mask = encoder(texts_in, device)  # (b, p)
    policy_module.eval()
    with acc.autocast():
        drawn = sample(policy_module, query, query_mask, max_new_tokens=cfg.response_length_tokens,
                       temperature=cfg.temperature, top_k=cfg.top_k, stop_token_id=stop_id,
                       pad_token_id=tokenizer.pad_token_id)
    timings["generation"] = now(device) - tick

    tick = now(device)
    responses, mask, has_stop = ppo_math.truncate_at_stop_token(drawn.tokens, stop_token_id=stop_id,
                                                                pad_token_id=tokenizer.pad_token_id)
    batch = SampledBatch(prompts=texts_in, responses_text=[], input_ids=torch.cat([query, responses], 1),
                         attention_mask=torch.cat([query_mask, mask], 1), prompt_length=query.shape[1],
                         responses=responses, mask=mask.float(), has_stop=has_stop, scores=torch.empty(0),
                         sampling_logprobs=drawn.logprobs, sampling_entropy=drawn.entropy)
    if before_scoring is not None:
        before_scoring(batch)
        timings["forward"] = now(device) - tick
        tick = now(device)
    batch.responses_text = tokenizer.batch_decode(responses, skip_special_tokens=True)
    scores = score_responses(reward, texts_in, batch.responses_text, [row.fields for row in prompts]).to(device)
    if cfg.missing_eos_penalty is not None:
        scores = scores - cfg.missing_eos_penalty * (~has_stop).float()
    batch.scores = scores
    timings["scoring"] = now(device) - tick
    return batch


# ---------------------------------------------------------------------------
# held-out samples


@torch.no_grad()
def sample_held_out(ctx: StageContext, *, cfg, step: int, prompts: list[PromptRow], policy, reference,
                    reward: CompositeReward, encoder: PromptEncoder, kl_estimator: str = "k1") -> list[dict]:
    """Sample one response per held-out prompt and record prompt, response, reward and (with a reference) KL.

    Sampled (not greedy) at the training temperature, with the same seed every time, so
    the recorded reward estimates what the stage optimises and successive steps are compared on
    the same random draws. ``reference`` may be None (no KL recorded). Appends to
    <outputDir>/samples.jsonl; main process only.
    """
    acc = ctx.accelerator
    policy_module = acc.unwrap_model(policy)
    with torch.random.fork_rng(devices=[ctx.device] if ctx.device.type == "cuda" else []):
        torch.manual_seed(cfg.seed + 7919)
        batch = sample_and_score(ctx, cfg=cfg, policy_module=policy_module, encoder=encoder, reward=reward,
                                 prompts=prompts)
    kls = [None] * len(prompts)
    if reference is not None:
        with acc.autocast():
            logp = response_logprobs(policy_module, batch, temperature=cfg.temperature)
            ref_logp = response_logprobs(reference, batch, temperature=cfg.temperature)
        kls = (ppo_math.kl_per_token(logp, ref_logp, estimator=kl_estimator) * batch.mask).sum(1).tolist()  # (b,)
    samples = []
    for p, r, s, k in zip(batch.prompts, batch.responses_text, batch.scores.tolist(), kls):
        sample = {"step": step, "prompt": p, "response": r, "reward": float(s)}
        if k is not None:
            sample["kl"] = float(k)
        samples.append(sample)
    with open(ctx.output_dir / SAMPLES_FILE, "a", encoding="utf-8") as handle:
        for sample in samples:
            handle.write(json.dumps(sample) + "\n")
    return samples


def report_samples(ctx: StageContext, samples: list[dict], *, step: int, total: int) -> None:
    """A ``samples`` progress event: eval_reward_mean (and eval_kl when recorded) and the first few samples."""
    metrics = {"eval_reward_mean": sum(s["reward"] for s in samples) / len(samples)}
    if all("kl" in s for s in samples):
        metrics["eval_kl"] = sum(s["kl"] for s in samples) / len(samples)
    ctx.report("samples", step=step, total_steps=total, metrics=metrics, samples=samples[:SAMPLES_REPORTED])


# ---------------------------------------------------------------------------
# across processes


def reduce_mean(acc, values: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """Average each scalar over processes (one collective for all of them)."""
    names = sorted(values)
    stacked = torch.tensor([float(values[n]) for n in names], device=acc.device)
    if acc.num_processes > 1:
        stacked = acc.reduce(stacked, reduction="mean")
    return dict(zip(names, stacked.tolist()))


def reduce_sum(acc, value: torch.Tensor) -> float:
    value = value.detach().float().reshape(1).to(acc.device)
    if acc.num_processes > 1:
        value = acc.reduce(value, reduction="sum")
    return float(value)
