"""The PPO reward: weighted heuristic functions plus an optional trained reward model.

``build_heuristic`` turns one ``RewardFunction`` (trainer.config) into a callable
f(prompt, response) -> float; ``CompositeReward`` sums them with their weights and
adds ``reward_model_weight`` times the reward model's normalised score.

The reward model scores prompt + response at the last real token (Huang et al.
detail "reward at the last token") and its raw score is normalised with the
mean and std the reward stage measured (``reward_normalization.json``), so a
weight of 1 means "one standard deviation of the reward model = 1 point".
"""

from __future__ import annotations

import importlib
import json
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from trainer.config import RewardFunction

HeuristicFn = Callable[[str, str], float]

NORMALIZATION_FILE = "reward_normalization.json"


class RewardError(ValueError):
    """A reward function that cannot be built or returned something unusable; the message names it."""


def _length_reward(target: int, tokenizer) -> HeuristicFn:
    if tokenizer is None:
        raise RewardError("reward function of type length needs a tokenizer")

    def length(prompt: str, response: str) -> float:
        n = len(tokenizer.encode(response, add_special_tokens=False))
        return -abs(n - target) / target

    return length


def _regex_reward(pattern: str) -> HeuristicFn:
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise RewardError(f"reward function regex: pattern {pattern!r} is not a valid regular expression: {exc}") from exc
    return lambda prompt, response: 1.0 if compiled.search(response) else 0.0


def _keywords_reward(keywords: list[str]) -> HeuristicFn:
    lowered = [k.lower() for k in keywords]
    return lambda prompt, response: sum(k in response.lower() for k in lowered) / len(lowered)


def _banned_reward(phrases: list[str]) -> HeuristicFn:
    lowered = [p.lower() for p in phrases]
    return lambda prompt, response: -float(sum(p in response.lower() for p in lowered))


def _python_reward(spec: str) -> HeuristicFn:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or any error raised while importing the user's module
        raise RewardError(
            f"reward function python: field function={spec!r}: cannot import module {module_name!r}: {exc}. "
            "The module must be importable in the trainer image (on PYTHONPATH)."
        ) from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise RewardError(f"reward function python: field function={spec!r}: module {module_name!r} "
                          f"has no callable {attr!r}")
    return fn


def build_heuristic(config: RewardFunction, *, tokenizer=None) -> HeuristicFn:
    """The unweighted function f(prompt, response) -> float for one RewardFunction config."""
    if config.type == "length":
        return _length_reward(config.target_length_tokens, tokenizer)
    if config.type == "regex":
        return _regex_reward(config.pattern)
    if config.type == "keywords":
        return _keywords_reward(config.keywords)
    if config.type == "bannedPhrases":
        return _banned_reward(config.phrases)
    if config.type == "python":
        return _python_reward(config.function)
    raise RewardError(f"unknown reward function type {config.type!r}")


def _describe(config: RewardFunction) -> str:
    return f"{config.type}:{config.function}" if config.type == "python" else config.type


def _checked(value: object, *, name: str, response: str) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RewardError(f"reward function {name} returned {type(value).__name__} ({value!r:.80}); "
                          "it must return a float")
    if not math.isfinite(value):
        raise RewardError(f"reward function {name} returned {value} for response {response[:80]!r}; "
                          "it must return a finite float")
    return float(value)


def load_normalization(reward_model_dir: str | Path) -> tuple[float, float]:
    """(mean, std) from the reward stage's reward_normalization.json, or (0, 1) when absent."""
    path = Path(reward_model_dir) / NORMALIZATION_FILE
    if not path.exists():
        return 0.0, 1.0
    data = json.loads(path.read_text())
    std = float(data.get("std", 1.0))
    if not math.isfinite(std) or std <= 0:
        raise RewardError(f"{path}: std must be a positive number, got {data.get('std')!r}")
    return float(data.get("mean", 0.0)), std


class CompositeReward:
    """score = sum_i w_i * f_i(prompt, response) + w_rm * (rm(prompt + response) - mean) / std.

    ``reward_model`` is a sequence classifier with one label (or None); ``normalization``
    is its (mean, std); ``max_length`` the token budget of one scored text.
    """

    def __init__(self, functions: Sequence[RewardFunction], *, tokenizer=None, reward_model=None,
                 normalization: tuple[float, float] = (0.0, 1.0), reward_model_weight: float = 1.0,
                 max_length: int = 512, device: torch.device | str = "cpu"):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.device = device
        self._functions = [(f.weight, _describe(f), build_heuristic(f, tokenizer=tokenizer)) for f in functions]
        self.reward_model = reward_model
        self.mean, self.std = normalization
        self.reward_model_weight = reward_model_weight
        if not self._functions and reward_model is None:
            raise RewardError("PPO has nothing to optimise: set reward.functions and/or train a reward model")

    def heuristic_scores(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        """(b,) float32 weighted sum of the heuristic functions."""
        totals = []
        for prompt, response in zip(prompts, responses):
            total = 0.0
            for weight, name, fn in self._functions:
                total += weight * _checked(fn(prompt, response), name=name, response=response)
            totals.append(total)
        return torch.tensor(totals, dtype=torch.float32)

    @torch.no_grad()
    def model_scores(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        """(b,) normalised reward-model score of prompt + response, read at the last real token.

        Encoded exactly as the reward stage trained (``trainer.data.encode_for_reward``:
        text concatenated, no EOS appended, cut from the left), right-padded.
        """
        from trainer.data import encode_for_reward, pad_right

        ids = [encode_for_reward(self.tokenizer, prompt=p, response=r, max_length=self.max_length)
               for p, r in zip(prompts, responses)]
        lengths = torch.tensor([len(x) for x in ids])
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor(pad_right(ids, pad_value=pad), device=self.device)  # (b, s)
        attention_mask = (torch.arange(input_ids.shape[1])[None, :] < lengths[:, None]).long().to(self.device)
        logits = self.reward_model(input_ids=input_ids, attention_mask=attention_mask).logits.float()  # (b, 1)
        return ((logits[:, 0] - self.mean) / self.std).cpu()

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        """(b,) float32 total score on the CPU."""
        scores = self.heuristic_scores(prompts, responses)
        if self.reward_model is not None:
            scores = scores + self.reward_model_weight * self.model_scores(prompts, responses)
        return scores
