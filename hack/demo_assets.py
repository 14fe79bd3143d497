"""Build the demo's model and datasets: a tiny Llama-style model, its tokenizer and toy JSON Lines data.

Nothing is downloaded. The tokenizer is a byte-level BPE trained here on the toy
texts, the model is built from a config (random weights, 2 layers, ~0.1M
parameters) so every stage runs in seconds on a CPU.

The toy world is small enough that PPO can visibly learn in ~30 steps:

* SFT teaches the model to answer any question with two of twenty WORDS (then EOS),
  each word about equally likely, so the SFT model mentions PREFERRED_WORD in
  about one answer in ten;
* the preference pairs say that answers mentioning PREFERRED_WORD are better
  (``chosen`` contains it, ``rejected`` does not), which the reward stage learns;
* PPO then raises how often the policy says it (examples/tiny-cpu.yaml adds a
  keywords reward on the same word, so the signal is clear even if the tiny
  reward model is imperfect).

This recipe is the one tests/trainer/test_ppo.py proves learns (held-out reward
0.0 -> ~0.9 in 30 steps).

    python hack/demo_assets.py --run examples/tiny-cpu.yaml --pvc-root DIR
        writes every pvc://<claim>/<path> the run's spec.model and spec.data name
        under DIR/<claim>/<path> (DIR = the local cluster's PVC directory of the
        run's namespace); what is already there and up to date is kept, so a
        second demo reuses it.
    python hack/demo_assets.py --out DIR
        writes model/, sft.jsonl, preferences.jsonl, prompts.jsonl into DIR.

tests/conftest.py builds the same kind of model for the unit tests; this module
serves the demo and the chart's end-to-end test (tests/chart/test_helm_install.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
from pathlib import Path

import yaml

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% if m['role'] != 'user' %}</s>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
TOPICS = "cats dogs weather music books coffee tea rain snow trains birds games".split()
PROMPT_FORMS = ["Tell me about {t}.", "What do you think of {t}?", "Do you like {t}?", "Please describe {t}.",
                "Any news on {t}?", "Say something about {t}.", "Why {t}?", "Thoughts on {t}?"]
# Answers are two of these words; twenty keeps each one rare (~1/20 a slot) but not too rare for PPO to find.
WORDS = ("cats dogs tea coffee rain snow music books trains birds "
         "sure yes maybe nice fine good okay great hello thanks").split()
PREFERRED_WORD = "cats"
SFT_ROWS = 1280         # 80 steps of 16 in examples/tiny-cpu.yaml: one pass, no row seen twice
PREFERENCE_ROWS = 640
SEED = 0
MODEL_FILES = ("config.json", "tokenizer.json")
# Written next to the model: which version of these assets built it, so a stale model is rebuilt.
FINGERPRINT_FILE = "demo_assets.json"


def prompts() -> list[str]:
    """Every topic in every form, in a fixed shuffled order (PPO holds out the first few)."""
    rows = [form.format(t=topic) for topic in TOPICS for form in PROMPT_FORMS]
    random.Random(SEED).shuffle(rows)
    return rows


def answer(rng: random.Random, *, with_preferred: bool | None = None) -> str:
    """Two words; with_preferred True/False forces PREFERRED_WORD in/out, None draws freely."""
    if with_preferred is None:
        return f"{rng.choice(WORDS)} {rng.choice(WORDS)}"
    others = [w for w in WORDS if w != PREFERRED_WORD]
    if not with_preferred:
        return f"{rng.choice(others)} {rng.choice(others)}"
    pair = [PREFERRED_WORD, rng.choice(others)]
    rng.shuffle(pair)
    return " ".join(pair)


def sft_rows() -> list[dict]:
    rng, pool = random.Random(SEED + 1), prompts()
    return [{"prompt": pool[i % len(pool)], "completion": answer(rng)} for i in range(SFT_ROWS)]


def preference_rows() -> list[dict]:
    rng, pool = random.Random(SEED + 2), prompts()
    return [{"prompt": pool[i % len(pool)], "chosen": answer(rng, with_preferred=True),
             "rejected": answer(rng, with_preferred=False)} for i in range(PREFERENCE_ROWS)]


def prompt_rows() -> list[dict]:
    return [{"prompt": prompt} for prompt in prompts()]


def corpus() -> list[str]:
    """Every text the tokenizer must cover, each a few times."""
    texts = prompts() + [" ".join(WORDS)] * 10 + [r["completion"] for r in sft_rows()]
    return texts * 3


def fingerprint() -> str:
    """Changes whenever the tokenizer's training texts or the model's shape would."""
    text = json.dumps({"corpus": corpus(), "template": CHAT_TEMPLATE, "model": MODEL_SHAPE}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def build_tokenizer(directory: Path, *, vocab_size: int = 512):
    """Train a byte-level BPE tokenizer and save it as a transformers fast tokenizer with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(directory)
    return fast


MODEL_SHAPE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                   intermediate_size=128, max_position_embeddings=512)


def build_tiny_model(directory: Path, *, vocab_size: int, seed: int = 0) -> None:
    """A 2-layer Llama-style causal LM (hidden 64) saved with save_pretrained."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                         tie_word_embeddings=False, **MODEL_SHAPE)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)


def write_model(directory: Path) -> bool:
    """Build the tokenizer and model into ``directory``; False (nothing done) if this version is already there."""
    marker = directory / FINGERPRINT_FILE
    if all((directory / name).exists() for name in MODEL_FILES) and marker.exists() \
            and json.loads(marker.read_text()).get("fingerprint") == fingerprint():
        readable_by_the_trainer(directory)  # made by an older version of this script
        return False
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(directory)
    build_tiny_model(directory, vocab_size=len(tokenizer))
    marker.write_text(json.dumps({"fingerprint": fingerprint(), "built_by": "hack/demo_assets.py"}) + "\n")
    readable_by_the_trainer(directory)
    return True


def readable_by_the_trainer(directory: Path) -> None:
    """transformers writes model.safetensors with mode 0600; the trainer runs as uid 65532, not as us."""
    for path in directory.iterdir():
        path.chmod(0o644)


DATASETS = {"sft": sft_rows, "preferences": preference_rows, "prompts": prompt_rows}


def write_jsonl(path: Path, rows: list[dict]) -> bool:
    """Write rows unless the file already holds exactly them; True when written."""
    text = "".join(json.dumps(row) + "\n" for row in rows)
    if path.exists() and path.read_text() == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return True


def pvc_path(uri: str, pvc_root: Path) -> Path:
    """pvc://claim/a/b -> pvc_root/claim/a/b; ValueError naming the URI for anything else."""
    if not uri.startswith("pvc://"):
        raise ValueError(f"{uri}: the demo can only provide pvc:// inputs (hf:// needs network)")
    return pvc_root / uri.removeprefix("pvc://").strip("/")


def write_for_run(spec: dict, *, pvc_root: Path, log=print) -> None:
    """Create every input the FineTuneRun spec names (model and datasets) under pvc_root."""
    model_dir = pvc_path(spec["model"]["source"], pvc_root)
    log(f"model + tokenizer: {model_dir} ({'built' if write_model(model_dir) else 'reused'})")
    write_datasets_for_run(spec, pvc_root=pvc_root, datasets=DATASETS, log=log)


def write_datasets_for_run(spec: dict, *, pvc_root: Path, datasets: dict, log=print) -> None:
    """Write each dataset the spec names (by role, from ``datasets``) and create the artifacts claim's folder."""
    for role, uri in (spec.get("data") or {}).items():
        if role not in datasets:
            raise ValueError(f"spec.data.{role}: unknown dataset role; expected one of {sorted(datasets)}")
        path = pvc_path(uri, pvc_root)
        log(f"{role} data: {path} ({'written' if write_jsonl(path, datasets[role]()) else 'reused'})")
    (pvc_root / spec["artifacts"]["pvc"]).mkdir(parents=True, exist_ok=True)


def cli(argv: list[str] | None, *, description: str, write_for_run, write_model, datasets: dict) -> int:
    """The command line both asset writers share: --run FILE --pvc-root DIR, or --out DIR."""
    parser = argparse.ArgumentParser(description=description)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--run", type=Path, help="FineTuneRun YAML whose pvc:// inputs to create")
    target.add_argument("--out", type=Path, help="write model/ and the three datasets into this directory")
    parser.add_argument("--pvc-root", type=Path, help="with --run: directory holding one folder per claim")
    args = parser.parse_args(argv)
    if args.run:
        if not args.pvc_root:
            parser.error("--run needs --pvc-root")
        (run,) = [d for d in yaml.safe_load_all(args.run.read_text()) if d and d.get("kind") == "FineTuneRun"]
        write_for_run(run["spec"], pvc_root=args.pvc_root)
        return 0
    write_model(args.out / "model")
    for role, rows in datasets.items():
        write_jsonl(args.out / f"{role}.jsonl", rows())
    print(f"wrote {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli(argv, description=__doc__.splitlines()[0], write_for_run=write_for_run, write_model=write_model,
               datasets=DATASETS)


if __name__ == "__main__":
    sys.exit(main())
