"""The model card (``README.md``) written into every ``final/``: what the Hub shows for a model.

A pure function of the job, its fingerprint, the final metrics and the saved dtype, so
it is tested without training. The YAML front matter uses the Hub's model-card keys
(https://huggingface.co/docs/hub/model-cards): ``base_model`` only for a Hub model
(a local path means nothing to the Hub), ``library_name``, ``pipeline_tag``, ``tags``.
"""

from __future__ import annotations

from typing import Any

import yaml

from trainer.config import HUB_SCHEME, StageJob, parse_hub_source

_PURPOSE = {
    "sft": "supervised fine-tuning (loss on the completion / assistant tokens)",
    "reward": "a reward model (one score per text, Bradley-Terry on preference pairs)",
    "ppo": "PPO against a reward, with a KL penalty to the SFT model",
    "grpo": "GRPO/RLOO: group-relative advantages on sampled responses",
    "dpo": "DPO on preference pairs, against the input (SFT) model as the reference",
}
_DATA_FIELD = {"sft": "sft", "reward": "preferences", "ppo": "prompts", "grpo": "prompts", "dpo": "preferences"}


def render_model_card(*, job: StageJob, fingerprint: dict[str, Any], metrics: dict[str, float],
                      dtype: str) -> str:
    """README.md text: front matter, what produced the model, final metrics, the stage's settings."""
    settings = getattr(job, job.stage)
    front: dict[str, Any] = {}
    if job.model.startswith(HUB_SCHEME):
        front["base_model"] = parse_hub_source(job.model).repo_id
    front["library_name"] = "transformers"
    front["pipeline_tag"] = "text-classification" if job.stage == "reward" else "text-generation"
    front["tags"] = ["finetune-operator", job.stage] + (["lora"] if settings.lora else [])

    inputs = fingerprint.get("inputs", {})
    data_field = _DATA_FIELD.get(job.stage)
    data_path = getattr(job.data, data_field) if data_field else None
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "",
        f"# {job.stage} model", "",
        f"Trained by the finetune-operator trainer: {_PURPOSE.get(job.stage, job.stage)}.", "",
        f"- Base model: `{job.model}` ({inputs.get('model')})",
    ]
    if data_path:
        lines.append(f"- Data: `data.{data_field}` = `{data_path}` ({inputs.get(f'data.{data_field}')})")
    if job.reward_model and job.stage in ("ppo", "grpo"):
        lines.append(f"- Reward model: `{job.reward_model}`")
    if job.run_uid:
        lines.append(f"- FineTuneRun uid: `{job.run_uid}`")
    lines.append(f"- Weights: safetensors, {dtype}" + (", LoRA merged into the base" if settings.lora else ""))
    lines.append(f"- Training processes: {fingerprint.get('processes')}")
    lines += ["", "## Final metrics", ""]
    if metrics:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {name} | {value:.6g} |" for name, value in sorted(metrics.items())]
    else:
        lines.append("None reported.")
    lines += ["", "## Use", ""]
    if job.stage == "reward":
        lines += ["A one-output `AutoModelForSequenceClassification`. It scores the text `prompt + response` "
                  "(for chats: the chat template's rendering of the prompt messages with the generation prompt, "
                  "then the reply's content), tokenised with the tokenizer's special tokens, no EOS appended; "
                  "normalise with `reward_normalization.json`: `(score - mean) / std`."]
    else:
        lines += ["`AutoModelForCausalLM.from_pretrained` this directory. The tokenizer pads on the left, "
                  "as batch generation needs."]
    lines += ["", "## Stage settings", "", "```yaml",
              yaml.safe_dump({job.stage: settings.model_dump(mode="json", by_alias=True, exclude_none=True)},
                             sort_keys=False).rstrip(),
              "```", ""]
    return "\n".join(lines)
