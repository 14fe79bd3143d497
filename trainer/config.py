"""The trainer's configuration: the user-facing API of every stage.

These pydantic models are the single source of truth for stage settings.  The
operator embeds them in the FineTuneRun CRD schema (``crds/`` is generated from
them) and writes a ``StageJob`` file that ``python -m trainer`` reads, so a
field documented here is what ``kubectl explain`` shows.

Names are camelCase on the wire (``learningRate``) and snake_case in Python
(``learning_rate``); units are part of the name where there is one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

# --------------------------------------------------------------------------- failure policy

PERMANENT_FAILURE_EXIT_CODE = 3
"""Exit code of ``python -m trainer`` for an error that retrying cannot fix: an invalid config, a bad
dataset row, a missing model, an invalid reward function, no CUDA although GPUs were requested.
The operator fails the stage at once instead of retrying it. Any other failure exits 1."""
PERMANENT_FAILURE_PREFIX = "PermanentError: "
"""Start of the termination message of such an error. ``accelerate launch`` exits 1 whatever its
processes returned, so the operator reads this prefix as well as the exit code."""
FEEDBACK_ROUND_EXIT_CODE = 4
"""Exit code of an online stage (ppo, grpo) that stopped at a human-feedback round boundary after a
checkpoint and after writing the round's candidates: not a failure. The operator waits for labels,
retrains the reward model and starts the stage again, which resumes after the boundary."""
FEEDBACK_ROUND_PREFIX = "FeedbackRound: "
"""Start of the termination message of such an exit, followed by ``round <N> ...``: the operator reads
both the exit code and this prefix (``accelerate launch`` exits 1 whatever its processes returned)."""
FEEDBACK_ROUND_ENV = "FINETUNE_FEEDBACK_ROUND"
"""Set by the operator on a reward-stage pod that retrains the reward model after human-feedback round
<N> (the value): the pod continues from the reward stage's final/ instead of training from scratch."""
EXPECTED_GPUS_ENV = "FINETUNE_EXPECTED_GPUS"
"""Environment variable the operator sets to the pod's GPU count; the trainer fails permanently
when it is above zero and CUDA sees no device."""

# --------------------------------------------------------------------------- model sources

HUB_SCHEME = "hf://"
# Hugging Face Hub repo ids (huggingface_hub.utils.validate_repo_id): "name" or "namespace/name", each
# part of letters, digits, "-", "_", "." starting and ending with a letter, digit or "_", at most 96 long.
_HUB_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
_HUB_REVISION = r"[A-Za-z0-9_][A-Za-z0-9_./-]*"
HUB_SOURCE_PATTERN = rf"hf://(?:{_HUB_PART}/)?{_HUB_PART}(?:@{_HUB_REVISION})?"
"""hf://[<namespace>/]<name>[@<revision>]; ``parse_hub_source`` applies the rules a regex cannot."""


@dataclass(frozen=True)
class HubModel:
    """A model on the Hugging Face Hub: what ``from_pretrained(repo_id, revision=revision)`` takes."""

    repo_id: str
    revision: str | None = None
    """Branch, tag or commit; None: the default branch."""


def parse_hub_source(source: str) -> HubModel:
    """``hf://[namespace/]name[@revision]`` -> HubModel; ValueError saying what is wrong otherwise."""
    if not source.startswith(HUB_SCHEME):
        raise ValueError(f"{source!r} does not start with {HUB_SCHEME}")
    repo_id, at, revision = source[len(HUB_SCHEME):].partition("@")
    expected = "expected hf://<name> or hf://<namespace>/<name>, optionally followed by @<revision>"
    if not re.fullmatch(rf"(?:{_HUB_PART}/)?{_HUB_PART}", repo_id):
        raise ValueError(f"{source!r} is not a Hugging Face Hub model id: {expected} (letters, digits, "
                         "'-', '_', '.'; at most 96 characters per part)")
    if "--" in repo_id or ".." in repo_id or repo_id.endswith(".git"):
        raise ValueError(f"{source!r}: a Hub id cannot contain '--' or '..' nor end with '.git'")
    if at and (not re.fullmatch(_HUB_REVISION, revision) or ".." in revision or revision.endswith("/")):
        raise ValueError(f"{source!r}: revision {revision!r} is not a branch, tag or commit name")
    return HubModel(repo_id=repo_id, revision=revision if at else None)


class ApiModel(BaseModel):
    """Base for every wire model: camelCase aliases, unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_attribute_docstrings=True,
    )


class LoraConfig(ApiModel):
    """Low-rank adapters (PEFT). The stage trains only the adapters and saves merged weights."""

    rank: int = Field(16, ge=1, le=1024)
    """Rank r of the low-rank update."""
    alpha: float = Field(32.0, gt=0)
    """Scaling numerator; the update is scaled by alpha / rank."""
    dropout: float = Field(0.05, ge=0, lt=1)
    """Dropout on the adapter input."""
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
                                      min_length=1)
    """Names (or ends of names) of the linear modules that get adapters, as PEFT matches them; ["all-linear"]: every linear layer except the output head."""
    keep_adapter: bool = False
    """Also save the trained adapter unmerged, as PEFT writes it (adapter_config.json, adapter_model.safetensors), in final/adapter/ beside the merged model; load it with peft.PeftModel.from_pretrained over the stage's input model."""

    @field_validator("target_modules")
    @classmethod
    def _all_linear_stands_alone(cls, targets: list[str]) -> list[str]:
        if "all-linear" in targets and len(targets) > 1:
            raise ValueError('"all-linear" already names every linear layer: give it alone')
        return targets


class FsdpConfig(ApiModel):
    """Fully sharded data parallel training (torch FSDP2 ``fully_shard``): each process holds only its share of the weights, gradients and optimizer state; each transformer decoder layer is gathered just while it computes. Every trained stage; in PPO and GRPO/RLOO the trained models (policy, value model) are sharded and gathered whole while sampling, the frozen reference and reward model stay whole on each process. docs/multinode.md says what is built."""

    cpu_offload: bool = False
    """Keep each process's share of the weights, gradients and optimizer state in CPU memory and move a layer to the GPU only while it computes: far less GPU memory, much slower steps."""


class OptimConfig(ApiModel):
    """Settings shared by every trained stage."""

    learning_rate: float = Field(2.0e-5, gt=0, le=1)
    """Peak learning rate of AdamW."""
    batch_size: int = Field(8, ge=1, le=4096)
    """Examples per optimizer step per process, before gradient accumulation."""
    gradient_accumulation_steps: int = Field(1, ge=1, le=1024)
    """Micro-batches accumulated into one optimizer step; the effective batch is batchSize * this * processes."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warm-up steps; the learning rate then decays linearly to zero."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    max_grad_norm: float = Field(1.0, gt=0)
    """Gradients are clipped to this global L2 norm."""
    max_seq_length_tokens: int = Field(512, ge=8, le=131072)
    """Examples are truncated to this many tokens (prompt + completion)."""
    seed: int = Field(0, ge=0)
    """Seed for data order, initialisation and sampling; each process adds its rank."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Compute precision; auto is bf16 on GPUs that support it, else fp32."""
    checkpoint_every_steps: int = Field(50, ge=1)
    """A resumable checkpoint (model, optimizer, scheduler, RNG, data position) is written every this many optimizer steps."""
    keep_checkpoints: int = Field(2, ge=1)
    """Older checkpoints beyond this many are deleted."""
    log_every_steps: int = Field(1, ge=1)
    """Metrics and progress are reported every this many optimizer steps."""
    lora: LoraConfig | None = None
    """Train LoRA adapters instead of all weights when set."""
    gradient_checkpointing: bool = False
    """Recompute activations during the backward pass instead of keeping them: much less activation memory for roughly a third more compute. Applies to the trained models (policy and value model in PPO)."""
    attention_implementation: Literal["eager", "sdpa", "flash_attention_2"] | None = None
    """Attention kernel (transformers' attn_implementation) of every model the stage loads; None: transformers' default (sdpa where the model supports it). flash_attention_2 needs the flash-attn package and a supported GPU."""
    report_to: list[Literal["mlflow", "wandb"]] = Field(default_factory=list, max_length=2)
    """Also send the stage's metrics to MLflow (MLFLOW_TRACKING_URI) and/or Weights & Biases (WANDB_API_KEY, WANDB_PROJECT), configured by the pod's environment (podTemplate env). Off by default; the trainer image has neither package: use an image built FROM it with mlflow-skinny or wandb installed, else the stage fails at start saying so (trainer/tracking.py)."""
    fsdp: FsdpConfig | None = None
    """Shard the trained model across the stage's processes (full shard, one unit per transformer decoder layer) instead of replicating it (DDP) when set; {} shards with the defaults. PPO shards its policy and value model, GRPO/RLOO its policy. With lora the frozen base is sharded with its adapters, checkpoints hold the trainable weights only and final/ is merged from the gathered weights. One process: nothing to shard, trains as without it."""

    @model_validator(mode="after")
    def _fsdp_combinations(self):
        if self.fsdp is not None and self.precision == "fp16":
            raise ValueError("fsdp cannot be combined with precision fp16 (a sharded model gets no loss scaling): "
                             "use precision bf16 or fp32")
        return self

    # Not fields (no schema): which settings a resume may change. Every other setting shapes the
    # training trajectory, so a checkpoint written with another value is refused (docs/trainer.md).
    OPERATIONAL_SETTINGS: ClassVar[frozenset[str]] = frozenset(
        {"checkpoint_every_steps", "keep_checkpoints", "log_every_steps", "report_to"})
    """Settings that never change the trained weights: ignored when a stage compares its outputs' fingerprint."""
    RESUME_APPLIES: ClassVar[frozenset[str]] = frozenset({"learning_rate", "weight_decay", "max_grad_norm"})
    """Settings a resume applies from the new config (the optimizer and schedule are updated after loading
    the checkpoint); the weights then differ from an uninterrupted run's, as asked for."""


class SFTConfig(OptimConfig):
    """Supervised fine-tuning on prompt/completion pairs or chat transcripts; loss on completion tokens only."""

    epochs: int = Field(1, ge=1, le=1000)
    """Passes over the SFT dataset."""
    max_steps: int | None = Field(None, ge=1)
    """Stop after this many optimizer steps even if epochs remain."""
    assistant_turns: Literal["last", "all"] = "last"
    """Chat {"messages"} rows: train the last assistant message only (earlier turns are context), or every assistant message (each with the conversation before it as context)."""


_FUNCTION_REFERENCE = r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$"

RewardFunctionType = Literal["length", "regex", "keywords", "bannedPhrases", "exactAnswer", "numericAnswer",
                             "python", "pythonBatch"]

DEFAULT_ANSWER_FIELD = "answer"
DEFAULT_NUMERIC_TOLERANCE = 1e-6


class RewardFunction(ApiModel):
    """A reward on the response text (and the prompt row's extra fields); several are summed with their weights.

    length: -|tokens - targetLengthTokens| / targetLengthTokens (0 is best).
    regex: 1 if ``pattern`` matches the response, else 0.
    keywords: fraction of ``keywords`` present (case-insensitive).
    bannedPhrases: -1 for each of ``phrases`` present (case-insensitive).
    exactAnswer: 1 if the response's final answer equals the prompt row's ``answerField``, else 0. The final
    answer is the last \\boxed{...}, else the text after the last "####", else the whole response; both sides
    are stripped of surrounding whitespace, "$" and a trailing ".".
    numericAnswer: 1 if the last number of the final answer (as above, else of the whole response) is within
    ``tolerance`` of the row's ``answerField`` read as a number ("1,000" and "-2.5" are numbers), else 0.
    python: ``function`` ("module:function") called as f(prompt, response) -> float.
    pythonBatch: ``function`` called as TRL calls a reward function, f(prompts=[...], completions=[...],
    **fields) -> list of floats (None for "not applicable", counted as 0), where fields holds, for every extra
    field of the prompt rows (such as "answer"), the list of its values (None where a row lacks it).
    python and pythonBatch run user code inside the trainer process with all its access.
    """

    type: RewardFunctionType
    """Which function: length, regex, keywords, bannedPhrases, exactAnswer, numericAnswer, python or pythonBatch."""
    weight: float = 1.0
    """Multiplier of this function's score in the sum."""
    target_length_tokens: int | None = Field(None, ge=1)
    """For type length: the response length, in tokens, that scores best."""
    pattern: str | None = None
    """For type regex: a Python regular expression searched in the response."""
    keywords: list[str] | None = None
    """For type keywords: words rewarded when present."""
    phrases: list[str] | None = None
    """For type bannedPhrases: phrases penalised when present."""
    answer_field: str | None = Field(None, min_length=1)
    """For types exactAnswer and numericAnswer: the prompt row field holding the expected answer; unset means "answer"."""
    tolerance: float | None = Field(None, ge=0)
    """For type numericAnswer: largest absolute difference still counted as correct; unset means 1e-6."""
    function: str | None = Field(None, json_schema_extra={"pattern": _FUNCTION_REFERENCE})
    """For types python and pythonBatch: "module:function", importable in the trainer image. This runs arbitrary code inside the trainer, with the trainer's access (the run's outputs, its Secrets and environment, its network): import only code you trust, from an image you control."""

    @field_validator("pattern")
    @classmethod
    def _pattern_compiles(cls, pattern: str | None) -> str | None:
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"pattern {pattern!r} is not a valid Python regular expression: {exc}") from None
        return pattern

    @field_validator("function")
    @classmethod
    def _function_is_a_reference(cls, function: str | None) -> str | None:
        if function is not None and not re.fullmatch(_FUNCTION_REFERENCE, function):
            raise ValueError(f"function {function!r} is not of the form module:function "
                             "(e.g. mypackage.rewards:politeness)")
        return function

    @model_validator(mode="after")
    def _parameters_match_type(self) -> "RewardFunction":
        needed = {
            "length": "target_length_tokens",
            "regex": "pattern",
            "keywords": "keywords",
            "bannedPhrases": "phrases",
            "exactAnswer": None,
            "numericAnswer": None,
            "python": "function",
            "pythonBatch": "function",
        }[self.type]
        if needed is not None and getattr(self, needed) in (None, []):
            alias = to_camel(needed)
            raise ValueError(f"reward function of type {self.type} needs field {alias}")
        return self


class RewardConfig(OptimConfig):
    """Reward model trained on preference pairs (Bradley-Terry), and/or heuristic reward functions."""

    learning_rate: float = Field(1.0e-5, gt=0, le=1)
    """Peak learning rate of AdamW."""
    epochs: int = Field(1, ge=1, le=1000)
    """Passes over the preference dataset."""
    max_steps: int | None = Field(None, ge=1)
    """Stop after this many optimizer steps even if epochs remain."""
    eval_fraction: float = Field(0.1, ge=0, lt=1)
    """Share of preference pairs held out to measure accuracy."""
    margin_loss: bool = False
    """Bradley-Terry with margin: use a row's optional "margin" field."""
    center_rewards_coefficient: float = Field(0.01, ge=0)
    """Weight of the penalty on the squared mean reward, keeping scores centred."""
    functions: list[RewardFunction] = Field(default_factory=list)
    """Heuristic reward functions, used by PPO in addition to (or instead of) the trained model."""


class AdaptiveKlConfig(ApiModel):
    """Adaptive KL controller (Ziegler et al. 2019): adjusts klCoef toward a target KL."""

    target_kl: float = Field(6.0, gt=0)
    """Target KL per sequence, in nats."""
    horizon: int = Field(10000, ge=1)
    """Episodes over which the coefficient moves by at most a factor of e^0.2 per step."""


MIN_PROMPT_TOKENS = 8
"""PPO prompts are cut to maxSeqLengthTokens - responseLengthTokens tokens; fewer than this is refused."""


class SamplingConfig(OptimConfig):
    """Settings shared by the stages that sample responses to prompts and score them (PPO, GRPO, RLOO)."""

    response_length_tokens: int = Field(128, ge=1, le=32768)
    """Maximum tokens generated per response."""
    temperature: float = Field(0.7, gt=0)
    """Sampling temperature; also used for the log-probabilities the loss sees."""
    top_k: int | None = Field(None, ge=1)
    """Optional top-k sampling (None = full distribution, which keeps the KL estimate honest)."""
    stop_token: Literal["eos"] | None = "eos"
    """Responses end at this token; tokens after it are masked. None: always generate responseLengthTokens."""
    missing_eos_penalty: float | None = Field(1.0, ge=0)
    """Subtracted from the score of a response that never emits the stop token. None disables."""
    chat_template: bool = True
    """Give the policy each text prompt as a user message through the tokenizer's chat template (as an instruct model expects), when it has one; false: the prompt text as is (use false when SFT trained on prompt/completion text). Message-list prompts always use the template. The reward model scores the response after this same text."""
    reward_model_weight: float = 1.0
    """Weight of the trained reward model's (normalised) score, when there is one."""
    sample_every_steps: int = Field(10, ge=1)
    """Generate on the held-out prompts every this many steps and record prompt, response, reward, KL."""
    sample_prompts: int = Field(8, ge=1, le=256)
    """Number of held-out prompts used for samples and evaluation (taken from the prompts file, not trained on)."""
    health_checks: Literal["warn", "stop", "off"] = "warn"
    """Each step, check the batch for signs of a useless run (most responses empty, most never ending, the reward the same for every response, KL at zero for 10 steps; trainer/run_health.py): warn logs each one and counts them in the health_warnings metric; stop also fails the stage permanently with them as the reason; off skips the checks."""

    OPERATIONAL_SETTINGS: ClassVar[frozenset[str]] = OptimConfig.OPERATIONAL_SETTINGS | {"sample_every_steps",
                                                                                     "health_checks"}

    @model_validator(mode="after")
    def _prompt_fits(self) -> "SamplingConfig":
        prompt_tokens = self.max_seq_length_tokens - self.response_length_tokens
        if prompt_tokens < MIN_PROMPT_TOKENS:
            raise ValueError(
                f"responseLengthTokens ({self.response_length_tokens}) leaves {max(prompt_tokens, 0)} of "
                f"maxSeqLengthTokens ({self.max_seq_length_tokens}) for the prompt; at least "
                f"{MIN_PROMPT_TOKENS} are needed: raise maxSeqLengthTokens or lower responseLengthTokens"
            )
        return self


class PPOConfig(SamplingConfig):
    """PPO against the reward with a per-token KL penalty to the SFT (reference) model."""

    learning_rate: float = Field(3.0e-6, gt=0, le=1)
    """Peak learning rate of AdamW for policy and value model."""
    steps: int = Field(100, ge=1)
    """PPO iterations: each samples batchSize prompts, generates, scores and updates."""
    ppo_epochs: int = Field(4, ge=1, le=100)
    """Optimisation passes over each batch of rollouts."""
    mini_batches: int = Field(1, ge=1)
    """Mini-batches per PPO epoch; batchSize must be divisible by it."""
    kl_coef: float = Field(0.05, ge=0)
    """Coefficient beta of the per-token KL penalty (initial value when adaptive)."""
    kl_estimator: Literal["k1", "k3"] = "k1"
    """Per-token KL estimator: k1 = log-ratio, k3 = (r - 1) - log r (unbiased, non-negative)."""
    adaptive_kl: AdaptiveKlConfig | None = None
    """Use the adaptive KL controller when set."""
    clip_range: float = Field(0.2, gt=0)
    """PPO ratio clip epsilon."""
    clip_range_value: float = Field(0.2, gt=0)
    """Value-function clip around the old values."""
    vf_coef: float = Field(0.1, ge=0)
    """Weight of the value loss."""
    value_model: Literal["separate", "head"] = "separate"
    """Where the value estimates come from. separate: a second network, started from the reward model (else the policy), full or LoRA like the policy, trained on the value loss alone. head: a linear head on the policy's last hidden state; one pass gives logits and values, and policy loss + vfCoef x value loss train the shared backbone (a faster update and less memory, but the value loss then moves the policy too; see docs/ppo.md)."""
    gamma: float = Field(1.0, gt=0, le=1)
    """Discount factor."""
    lam: float = Field(0.95, ge=0, le=1)
    """GAE lambda."""
    whiten_rewards: bool = False
    """Whiten the per-token rewards (without shifting the mean) before GAE."""
    max_kl: float | None = Field(50.0, gt=0)
    """Guardrail: the stage stops with a clear reason when the mean sequence KL exceeds this, in nats."""

    OPERATIONAL_SETTINGS: ClassVar[frozenset[str]] = SamplingConfig.OPERATIONAL_SETTINGS | {"max_kl"}

    @model_validator(mode="after")
    def _sizes_fit(self) -> "PPOConfig":
        # The one place these rules live: the webhook (the CRD's stage specs subclass this model)
        # and the trainer (load_stage_job) both run them.
        if self.batch_size % self.mini_batches:
            raise ValueError(
                f"batchSize ({self.batch_size}) must be divisible by miniBatches ({self.mini_batches})"
            )
        minibatch = self.batch_size // self.mini_batches
        if minibatch % self.gradient_accumulation_steps:
            raise ValueError(
                f"the minibatch (batchSize / miniBatches = {minibatch}) must be divisible by "
                f"gradientAccumulationSteps ({self.gradient_accumulation_steps})"
            )
        return self


class GRPOConfig(SamplingConfig):
    """GRPO or RLOO: groupSize responses per prompt, each scored against its group's rewards; no value model.

    grpo (Shao et al. 2024): advantage = reward - group mean, divided by the group std when scaleRewards.
    rloo (Ahmadian et al. 2024): advantage = reward - mean of the group's other rewards (leave-one-out).
    Both optimise the clipped ratio loss with separate lower and upper clips, normalised as lossNormalisation
    says, plus klCoef times the k3 KL to the reference (SFT) model. docs/grpo.md explains every setting.
    """

    learning_rate: float = Field(1.0e-6, gt=0, le=1)
    """Peak learning rate of AdamW for the policy."""
    batch_size: int = Field(16, ge=2, le=4096)
    """Responses (episodes) per step per process: batchSize / groupSize prompts, each sampled groupSize times."""
    algorithm: Literal["grpo", "rloo"] = "grpo"
    """Baseline of the advantage: grpo (group mean) or rloo (leave-one-out mean of the other responses)."""
    steps: int = Field(100, ge=1)
    """Iterations: each samples batchSize responses, scores them and runs iterationsPerBatch passes of updates."""
    group_size: int = Field(4, ge=2, le=1024)
    """Responses sampled per prompt (G); must divide batchSize."""
    iterations_per_batch: int = Field(1, ge=1, le=100)
    """Optimisation passes over each batch (mu in the GRPO paper); with 1 and miniBatches 1 the ratio is 1."""
    mini_batches: int = Field(1, ge=1)
    """Optimizer steps per pass; batchSize must be divisible by it."""
    scale_rewards: bool | None = None
    """Divide advantages by the group's reward std. Unset: true for grpo, false for rloo (each paper's choice); false with grpo is Dr. GRPO."""
    loss_normalisation: Literal["sequence", "token", "constant"] = "sequence"
    """How token losses are averaged: sequence (per response, then over responses; GRPO), token (over all tokens of the minibatch; DAPO), constant (divided by responses x responseLengthTokens; Dr. GRPO)."""
    clip_range_low: float = Field(0.2, gt=0, lt=1)
    """The ratio is clipped below at 1 - clipRangeLow."""
    clip_range_high: float = Field(0.2, gt=0)
    """The ratio is clipped above at 1 + clipRangeHigh; above clipRangeLow (0.28 in DAPO) is "clip-higher"."""
    kl_coef: float = Field(0.0, ge=0)
    """Weight of the k3 KL to the reference (SFT) model in the loss; 0 loads no reference model."""
    max_kl: float | None = Field(50.0, gt=0)
    """Guardrail, with a reference model: the stage stops when the mean sequence KL exceeds this, in nats."""

    OPERATIONAL_SETTINGS: ClassVar[frozenset[str]] = SamplingConfig.OPERATIONAL_SETTINGS | {"max_kl"}

    @property
    def scales_rewards(self) -> bool:
        """scaleRewards resolved: its value, else true for grpo and false for rloo."""
        return self.algorithm == "grpo" if self.scale_rewards is None else self.scale_rewards

    @model_validator(mode="after")
    def _groups_fit(self) -> "GRPOConfig":
        if self.batch_size % self.group_size:
            raise ValueError(f"batchSize ({self.batch_size}) must be divisible by groupSize ({self.group_size}): "
                             "each prompt is sampled groupSize times")
        if self.batch_size % self.mini_batches:
            raise ValueError(f"batchSize ({self.batch_size}) must be divisible by miniBatches ({self.mini_batches})")
        minibatch = self.batch_size // self.mini_batches
        if minibatch % self.gradient_accumulation_steps:
            raise ValueError(f"the minibatch (batchSize / miniBatches = {minibatch}) must be divisible by "
                             f"gradientAccumulationSteps ({self.gradient_accumulation_steps})")
        return self


class DPOConfig(OptimConfig):
    """Direct preference optimisation (Rafailov et al. 2023) on preference pairs; no reward model, no sampling.

    The reference is the model the stage starts from (the SFT output); its log-probabilities of every pair are
    computed once, before training, not on every step. docs/dpo.md explains every setting.
    """

    learning_rate: float = Field(1.0e-6, gt=0, le=1)
    """Peak learning rate of AdamW."""
    epochs: int = Field(1, ge=1, le=1000)
    """Passes over the preference pairs (after the held-out share is set aside)."""
    max_steps: int | None = Field(None, ge=1)
    """Stop after this many optimizer steps even if epochs remain."""
    eval_fraction: float = Field(0.1, ge=0, lt=1)
    """Share of preference pairs held out to measure preference accuracy and reward margin."""
    beta: float = Field(0.1, gt=0)
    """Strength of the implicit KL constraint: the implicit reward is beta * (log pi - log pi_ref)."""
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    """sigmoid: DPO's -log sigmoid(beta * margin); ipo: (margin - 1 / (2 beta))^2 (Azar et al. 2023), on length-averaged log-probabilities."""
    label_smoothing: float = Field(0.0, ge=0, le=0.49)
    """sigmoid only: the share of pairs assumed mislabelled (conservative DPO); 0 is plain DPO."""
    chat_template: bool = True
    """Give the policy each text prompt as a user message through the tokenizer's chat template, when it has one, as PPO and GRPO do; false: the prompt text as is (use false when SFT trained on prompt/completion text). Message-list rows always use the template; implicit-prompt text rows are used as they are."""

    share_prompt: bool = True
    """Run each pair as one sequence, prompt + chosen + rejected, with an attention mask that hides the chosen reply from the rejected one, so the prompt is computed once instead of twice (same results to float rounding); false: two sequences per pair, as TRL does. Needs an attention implementation that takes such masks (sdpa or eager); with any other, pairs run as two sequences."""

    @model_validator(mode="after")
    def _smoothing_is_sigmoid(self) -> "DPOConfig":
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise ValueError(f"labelSmoothing applies to lossType sigmoid only, not {self.loss_type}")
        return self


class ReportingConfig(ApiModel):
    """Where a stage reports progress; set by the operator, defaults suit a local run."""

    metrics_port: int | None = Field(9400, ge=1, le=65535)
    """Port of the Prometheus /metrics endpoint; None disables it."""
    progress_file: str | None = None
    """JSON Lines file of progress events; default <outputDir>/progress.jsonl."""
    termination_log_path: str = "/dev/termination-log"
    """File that receives the failure reason (Kubernetes termination message)."""
    progress_config_map: str | None = None
    """Name of the ConfigMap (in the pod's namespace) that receives live progress; None: local only."""
    history_config_map: str | None = None
    """Name of the ConfigMap that receives the bounded metric history for the console; None: none."""
    report_interval_seconds: float = Field(2.0, gt=0)
    """Minimum seconds between two progress updates sent to Kubernetes."""
    feedback_config_maps: list[str] = Field(default_factory=list)
    """Names of the ConfigMaps (created by the operator) that receive the candidates of human-feedback rounds 1, 2 ...; empty: candidates only go to <outputDir>/feedback/."""


class HumanFeedbackConfig(ApiModel):
    """Human-feedback rounds during the online stage (ppo or grpo): people label pairs of the policy's responses in the console, the reward model is trained further on them, and the stage continues with it."""

    every_steps: int = Field(0, ge=0)
    """A round every this many steps of the online stage (rounds at everySteps, 2 x everySteps ... before the last step); 0: one round after the last step, whose retrained reward model is the reward stage's final model (the policy does not continue)."""
    prompts: int = Field(8, ge=1, le=256)
    """Prompts per round (K), drawn from spec.data.prompts (the training prompts, a different draw every round)."""
    responses_per_prompt: int = Field(2, ge=2, le=4)
    """Responses sampled per prompt (R); every two of them make a candidate pair, so a round has K x R(R-1)/2 pairs."""
    include_sft: bool = False
    """One of each prompt's responses comes from the model the stage started from (its reference, usually the SFT model) instead of the current policy."""
    labels_needed: int = Field(16, ge=1)
    """Labels that prefer A or B (ties and both-bad do not count) needed before the round closes and the reward model is retrained."""
    timeout_seconds: int = Field(86400, ge=1)
    """Seconds a round waits for labelsNeeded labels before onTimeout applies."""
    on_timeout: Literal["Continue", "Fail"] = "Continue"
    """Continue: retrain on the labels there are (or, with none, resume with the unchanged reward model); Fail: the run fails."""
    held_out_share: float = Field(0.25, ge=0, lt=1)
    """Share of the human labels (chosen by a digest of the pair, so a pair stays on its side in every round) kept out of training to measure the reward model's accuracy on human labels before and after each round."""
    max_rounds: ClassVar[int] = 20

    def rounds(self, total_steps: int) -> int:
        """How many rounds an online stage of ``total_steps`` steps opens."""
        if self.every_steps == 0:
            return 1
        return (total_steps - 1) // self.every_steps

    def round_at(self, step: int, *, total_steps: int) -> int | None:
        """The round that opens after ``step`` (1, 2 ...), or None."""
        if self.every_steps == 0:
            return 1 if step == total_steps else None
        if step % self.every_steps == 0 and step < total_steps:
            return step // self.every_steps
        return None


StageName = Literal["sft", "reward", "ppo", "grpo", "dpo"]


class DataPaths(ApiModel):
    """Local datasets (mounted volumes in a cluster): a file (JSON Lines, JSON, Parquet or CSV, optionally gzip-compressed) or a directory of such shards; docs/trainer.md lists the row formats."""

    sft: str | None = None
    """{"prompt", "completion"} rows (strings or message lists) or {"messages"} rows."""
    preferences: str | None = None
    """{"prompt", "chosen", "rejected"} rows (strings or message lists), or {"chosen", "rejected"} with an implicit prompt."""
    prompts: str | None = None
    """{"prompt"} rows for PPO and GRPO/RLOO; other fields of a row (e.g. "answer") go to the reward functions."""


class StageJob(ApiModel):
    """One stage to run: the file ``python -m trainer --config`` reads."""

    stage: StageName
    run_uid: str | None = None
    """uid of the FineTuneRun this stage belongs to (set by the operator). Recorded in every checkpoint and
    in final/: outputs in outputDir that carry another uid (a deleted run of the same name) are removed and
    the stage starts over. None for a run started by hand, which owns only outputs without a uid."""
    model: str
    """Input model: a local transformers directory; a GGUF model (a .gguf file, or a directory holding exactly one), dequantised once into <outputDir>/gguf-model/ and saved as a plain safetensors model; or hf://org/name[@revision] (needs network). For reward and PPO, the SFT output."""
    reward_model: str | None = None
    """PPO and GRPO/RLOO: directory of the trained reward model (the reward stage output), if any."""
    output_dir: str
    """Where checkpoints and the final model go; a restart with the same directory resumes."""
    data: DataPaths = Field(default_factory=DataPaths)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    ppo: PPOConfig = Field(default_factory=PPOConfig)
    grpo: GRPOConfig = Field(default_factory=GRPOConfig)
    dpo: DPOConfig = Field(default_factory=DPOConfig)
    reporting: ReportingConfig = Field(default_factory=ReportingConfig)
    human_feedback: HumanFeedbackConfig | None = None
    """Human-feedback rounds (the run's spec.humanFeedback): the online stage stops at each round boundary."""
    run_name: str | None = None
    """Name of the FineTuneRun (set by the operator): names the round's <run>-feedback-<round> ConfigMap and selects its PreferenceLabels."""


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file and field."""


def load_stage_job(path: str | Path) -> StageJob:
    """Read a YAML or JSON StageJob file; raise ConfigError naming the file and the bad field."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    try:
        return StageJob.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"{path}: {problems}") from exc
