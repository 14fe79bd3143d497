"""The toy task of the human-feedback tests: people prefer friendly words, the original preferences don't know it.

Shared by tests/trainer/test_feedback_rounds.py (the trainer's stages in-process, labels from a file) and
tests/console/test_console_cluster.py (the real cluster, labels written through the console's HTTP API).

The SFT model answers with two words. The labeller prefers answers with more of the ``FRIENDLY`` words (a
tie when both have as many). The original preference data prefers two-word answers to one-word ones with
the words drawn at random: it teaches the format and says nothing about which words people like, so only
the human labels can teach the reward model (and through it the policy) the labeller's criterion.
"""

from __future__ import annotations

import random
from typing import Iterable, Sequence

FRIENDLY = ("good", "great", "happy", "yes", "please", "hello", "cats", "love", "kind", "nice")


def friendly_count(text: str) -> int:
    """How many words of ``text`` are friendly (case and trailing punctuation ignored)."""
    return sum(word.strip(".,!?") in FRIENDLY for word in text.lower().split())


def friendly_choice(a: str, b: str) -> str:
    """The labeller's choice between responses A and B: ``a``, ``b`` or ``tie``."""
    ca, cb = friendly_count(a), friendly_count(b)
    return "a" if ca > cb else "b" if cb > ca else "tie"


def friendly_share(responses: Iterable[str], *, words_per_response: int = 2) -> float:
    """The criterion's score of a set of responses: friendly words per word slot."""
    texts = list(responses)
    return sum(friendly_count(t) for t in texts) / (words_per_response * len(texts))


def format_preferences(*, words: Sequence[str], prompts: Sequence[str] | None = None, count: int = 48,
                       seed: int = 3) -> list[dict]:
    """Two-word answers over one-word ones, the words drawn at random from ``words``: the format, not the taste.
    Prompts from ``prompts`` in turn, or three random words and a question mark."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        prompt = prompts[i % len(prompts)] if prompts else " ".join(rng.choice(words) for _ in range(3)) + "?"
        rows.append({"prompt": prompt, "chosen": f" {rng.choice(words)} {rng.choice(words)}",
                     "rejected": f" {rng.choice(words)}"})
    return rows
