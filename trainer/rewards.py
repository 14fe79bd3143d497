"""The reward of the online stages (PPO, GRPO, RLOO): weighted functions plus an optional trained reward model.

``build_reward_function`` turns one ``RewardFunction`` (trainer.config) into a batch callable
f(prompts, responses, rows) -> list[float], where ``rows`` are the prompt rows' extra fields
(``{"answer": "42"}``) that verifiable rewards check against; ``build_heuristic`` is the
per-response form of the functions that need no extra field. ``CompositeReward`` sums them
with their weights and adds ``reward_model_weight`` times the reward model's normalised score.

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

from trainer.config import DEFAULT_ANSWER_FIELD, DEFAULT_NUMERIC_TOLERANCE, RewardFunction

HeuristicFn = Callable[[str, str], float]
BatchRewardFn = Callable[[Sequence[str], Sequence[str], Sequence[dict]], list]
"""f(prompts, responses, rows) -> one float (or None: not applicable, counted as 0) per response."""

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


# --------------------------------------------------------------------------- verifiable answers

_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+")


def _last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...}, braces balanced; None when there is none (or it is unclosed)."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j]
    return None


def final_answer(response: str) -> str | None:
    """The marked final answer: the last \\boxed{...}, else the text after the last "####"; None when unmarked."""
    boxed = _last_boxed(response)
    if boxed is not None:
        return boxed
    if "####" in response:
        return response.rsplit("####", 1)[1]
    return None


def _normalise_answer(text: str) -> str:
    return " ".join(text.split()).strip("$ ").rstrip(".").strip()


def parse_number(text: str) -> float | None:
    """The last number in ``text`` ("1,000" -> 1000.0, "-2.5" -> -2.5), or None when there is none."""
    found = _NUMBER.findall(text)
    return float(found[-1].replace(",", "")) if found else None


def exact_answer_matches(response: str, expected: str) -> bool:
    """Whether the final answer (marked, else the whole response) equals ``expected`` after normalising both."""
    answer = final_answer(response)
    return _normalise_answer(response if answer is None else answer) == _normalise_answer(expected)


def numeric_answer_matches(response: str, expected: float, *, tolerance: float) -> bool:
    """Whether the last number of the final answer (marked, else the whole response) is within ``tolerance``."""
    answer = final_answer(response)
    value = parse_number(response if answer is None else answer)
    return value is not None and abs(value - expected) <= tolerance


def _expected(row: dict, field: str, *, name: str) -> object:
    if field not in row or row[field] is None:
        raise RewardError(f"reward function {name}: the prompt row has no field {field!r} "
                          f"(fields: {sorted(row) or 'none'}); add it to every row of data.prompts or set answerField")
    return row[field]


def _exact_answer_reward(field: str) -> BatchRewardFn:
    def exact(prompts, responses, rows):
        return [float(exact_answer_matches(r, str(_expected(row, field, name="exactAnswer"))))
                for r, row in zip(responses, rows)]
    return exact


def _numeric_answer_reward(field: str, tolerance: float) -> BatchRewardFn:
    def numeric(prompts, responses, rows):
        scores = []
        for response, row in zip(responses, rows):
            raw = _expected(row, field, name="numericAnswer")
            expected = float(raw) if isinstance(raw, (int, float)) and not isinstance(raw, bool) \
                else parse_number(str(raw))
            if expected is None:
                raise RewardError(f"reward function numericAnswer: field {field!r} of the prompt row is {raw!r}, "
                                  "not a number; use exactAnswer for non-numeric answers")
            scores.append(float(numeric_answer_matches(response, expected, tolerance=tolerance)))
        return scores
    return numeric


def _trl_batch_reward(fn: Callable) -> BatchRewardFn:
    """Call ``fn`` as TRL calls reward functions: prompts=, completions=, and one list per extra row field."""
    def batch(prompts, responses, rows):
        names = sorted({key for row in rows for key in row})
        fields = {name: [row.get(name) for row in rows] for name in names}
        return fn(prompts=list(prompts), completions=list(responses), **fields)
    return batch


def _per_response(fn: HeuristicFn) -> BatchRewardFn:
    return lambda prompts, responses, rows: [fn(p, r) for p, r in zip(prompts, responses)]


def build_heuristic(config: RewardFunction, *, tokenizer=None) -> HeuristicFn:
    """The unweighted function f(prompt, response) -> float for one RewardFunction config that needs no row field."""
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
    raise RewardError(f"reward function type {config.type!r} needs the prompt row: use build_reward_function")


def build_reward_function(config: RewardFunction, *, tokenizer=None) -> BatchRewardFn:
    """The unweighted batch function f(prompts, responses, rows) for one RewardFunction config."""
    field = config.answer_field or DEFAULT_ANSWER_FIELD
    if config.type == "exactAnswer":
        return _exact_answer_reward(field)
    if config.type == "numericAnswer":
        tolerance = DEFAULT_NUMERIC_TOLERANCE if config.tolerance is None else config.tolerance
        return _numeric_answer_reward(field, tolerance)
    if config.type == "pythonBatch":
        return _trl_batch_reward(_python_reward(config.function))
    return _per_response(build_heuristic(config, tokenizer=tokenizer))


def _describe(config: RewardFunction) -> str:
    return f"{config.type}:{config.function}" if config.type in ("python", "pythonBatch") else config.type


def _checked_batch(values: object, *, name: str, responses: Sequence[str], none_allowed: bool) -> list[float]:
    """One finite float per response; None (TRL's "not applicable") counts as 0 where ``none_allowed``."""
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    if not isinstance(values, (list, tuple)) or len(values) != len(responses):
        got = f"{len(values)} values" if isinstance(values, (list, tuple)) else type(values).__name__
        raise RewardError(f"reward function {name} returned {got} for {len(responses)} responses; "
                          "it must return a list with one float per response")
    return [0.0 if v is None and none_allowed else _checked(v, name=name, response=r)
            for v, r in zip(values, responses)]


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
        self._functions = [(f.weight, _describe(f), f.type == "pythonBatch", build_reward_function(f, tokenizer=tokenizer))
                           for f in functions]
        self.reward_model = reward_model
        self.mean, self.std = normalization
        self.reward_model_weight = reward_model_weight
        if not self._functions and reward_model is None:
            raise RewardError("nothing to optimise: set reward.functions and/or train a reward model")

    def heuristic_scores(self, prompts: Sequence[str], responses: Sequence[str],
                         rows: Sequence[dict] | None = None) -> torch.Tensor:
        """(b,) float32 weighted sum of the functions; ``rows`` are the prompt rows' extra fields (default none)."""
        rows = [{} for _ in prompts] if rows is None else rows
        totals = torch.zeros(len(responses), dtype=torch.float64)
        for weight, name, none_allowed, fn in self._functions:
            values = _checked_batch(fn(prompts, responses, rows), name=name, responses=responses,
                                    none_allowed=none_allowed)
            totals += weight * torch.tensor(values, dtype=torch.float64)
        return totals.float()

    @torch.no_grad()
    def model_scores(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        """(b,) normalised reward-model score of prompt + response, read at the last real token.

        Encoded exactly as the reward stage trained (``trainer.data.encode_for_reward``:
        text concatenated, no EOS appended, cut from the left), right-padded.
        """
        from trainer.data import encode_for_reward, pad_right
        from trainer.lean_decoder import classifier_logits

        ids = [encode_for_reward(self.tokenizer, prompt=p, response=r, max_length=self.max_length)
               for p, r in zip(prompts, responses)]
        lengths = torch.tensor([len(x) for x in ids])
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor(pad_right(ids, pad_value=pad), device=self.device)  # (b, s)
        attention_mask = (torch.arange(input_ids.shape[1])[None, :] < lengths[:, None]).long().to(self.device)
        # The same logits as the model's forward, without transformers' per-call Python (trainer.lean_decoder).
        logits = classifier_logits(self.reward_model, input_ids, attention_mask).float()  # (b, 1)
        return ((logits[:, 0] - self.mean) / self.std).cpu()

    def score(self, prompts: Sequence[str], responses: Sequence[str],
              rows: Sequence[dict] | None = None) -> torch.Tensor:
        """(b,) float32 total score on the CPU; ``rows``: the prompt rows' extra fields, for verifiable rewards."""
        scores = self.heuristic_scores(prompts, responses, rows)
        if self.reward_model is not None:
            scores = scores + self.reward_model_weight * self.model_scores(prompts, responses)
        return scores
