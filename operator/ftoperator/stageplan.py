"""The stage plan of a FineTuneRun: which stages run, in what order, and what each one reads.

One pure function of the spec (``plan``), consulted by the validator (what is
missing or conflicting), the reconciler (the next stage, which stages are
Skipped and why) and the builders (each pod's input model, reward model and
dataset), so that they cannot disagree about, say, whether the reward stage
has a pod.

Rules:

* Order: sft, reward, then the policy-optimisation stage -- ppo, grpo (GRPO or
  RLOO, by ``grpo.algorithm``) or dpo. The validator refuses more than one.
* A stage runs when it is listed in spec.stages and not ``enabled: false``;
  the reward stage has a pod only when spec.data.preferences gives it pairs to
  train a reward model on. Its ``functions`` need no pod: the online stage
  (ppo or grpo) computes them, whether or not the reward stage is enabled.
* Input model: sft starts from spec.model.source; every later stage from
  sft's ``final/`` when sft runs, else from spec.model.source. DPO's reference
  model is the model it starts from.
* Reward model: ppo and grpo read the reward stage's ``final/`` when that
  stage runs; dpo reads none (the validator refuses an enabled reward stage
  beside it).
* Dataset: sft reads data.sft, reward and dpo data.preferences, ppo and grpo
  data.prompts; a pod gets only its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ftoperator.api import FineTuneRunSpec

STAGE_ORDER: tuple[str, ...] = ("sft", "reward", "ppo", "grpo", "dpo")
"""Every stage name, in the order stages run."""
POLICY_STAGES: tuple[str, ...] = ("ppo", "grpo", "dpo")
"""Policy-optimisation stages: a run has at most one."""
ONLINE_STAGES: tuple[str, ...] = ("ppo", "grpo")
"""Stages that sample responses and score them with the reward model and functions."""
DATASET: dict[str, str] = {"sft": "sft", "reward": "preferences", "ppo": "prompts", "grpo": "prompts",
                           "dpo": "preferences"}
"""The spec.data field each stage trains on."""


@dataclass(frozen=True)
class Step:
    """A stage that has a pod."""

    stage: str
    model_from: str | None
    """The stage whose final/ this one starts from; None: spec.model.source."""
    reward_model_from: str | None
    """The stage whose final/ is the reward model this one scores with; None: no trained reward model."""
    dataset: str
    """The spec.data field this stage trains on."""


@dataclass(frozen=True)
class Skip:
    """A listed stage without a pod, and why (the stage status's reason and message)."""

    stage: str
    reason: str
    message: str


@dataclass(frozen=True)
class StagePlan:
    steps: tuple[Step, ...]
    """The stages with a pod, in the order they run."""
    skipped: tuple[Skip, ...]
    """Listed stages without a pod."""
    enabled: tuple[str, ...]
    """Listed and not disabled, in order (the reward stage even without preference data)."""
    reward_functions: tuple[Any, ...]
    """spec.stages.reward.functions: what the online stage adds to (or uses instead of) the reward model."""

    @property
    def stages(self) -> tuple[str, ...]:
        """Names of the stages with a pod, in order."""
        return tuple(step.stage for step in self.steps)

    @property
    def last(self) -> str | None:
        """The stage whose final/ is the run's result."""
        return self.steps[-1].stage if self.steps else None

    @property
    def policy_stages(self) -> tuple[str, ...]:
        """The enabled policy-optimisation stages; more than one is invalid."""
        return tuple(stage for stage in self.enabled if stage in POLICY_STAGES)

    @property
    def trains_reward_model(self) -> bool:
        return self.runs("reward")

    def runs(self, stage: str) -> bool:
        """Whether ``stage`` has a pod."""
        return stage in self.stages

    def step(self, stage: str) -> Step:
        """The plan of a stage that runs; KeyError naming it otherwise."""
        for step in self.steps:
            if step.stage == stage:
                return step
        raise KeyError(f"stage {stage} does not run in this plan (runs: {', '.join(self.stages) or 'none'})")

    def skip(self, stage: str) -> Skip | None:
        return next((skip for skip in self.skipped if skip.stage == stage), None)


def is_enabled(spec: FineTuneRunSpec, stage: str) -> bool:
    """Listed in spec.stages and not disabled."""
    settings = getattr(spec.stages, stage)
    return settings is not None and settings.enabled


def plan(spec: FineTuneRunSpec) -> StagePlan:
    """The stages of ``spec`` with a pod, their inputs, and the listed stages that are skipped."""
    enabled = tuple(stage for stage in STAGE_ORDER if is_enabled(spec, stage))
    functions = tuple(spec.stages.reward.functions) if spec.stages.reward is not None else ()
    runs_sft = "sft" in enabled
    trains_reward = "reward" in enabled and spec.data.preferences is not None
    consumer = next((stage for stage in enabled if stage in ONLINE_STAGES), None)

    steps: list[Step] = []
    skipped: list[Skip] = []
    for stage in STAGE_ORDER:
        if getattr(spec.stages, stage) is None:
            continue
        if stage not in enabled:
            skipped.append(Skip(stage, "Disabled", f"spec.stages.{stage}.enabled is false"))
            continue
        if stage == "reward" and not trains_reward:
            users = f"{consumer} uses" if consumer else "no enabled stage uses"
            skipped.append(Skip(stage, "NoPreferenceData", "no spec.data.preferences: no reward model is "
                                f"trained; {users} the reward functions"))
            continue
        steps.append(Step(
            stage=stage,
            model_from="sft" if runs_sft and stage != "sft" else None,
            reward_model_from="reward" if trains_reward and stage in ONLINE_STAGES else None,
            dataset=DATASET[stage],
        ))
    return StagePlan(steps=tuple(steps), skipped=tuple(skipped), enabled=enabled, reward_functions=functions)
