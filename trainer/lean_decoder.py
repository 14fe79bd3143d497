"""A lean forward pass for Llama-family decoders: the same arithmetic as transformers, less Python per call.

On small models (and on the CPU) a forward pass costs mostly the Python around the tensor ops:
transformers' per-call decorators, output dataclasses, the attention-mask builder, cache
bookkeeping and ~20 module calls per layer. The online stages run many such passes: one per
sampled token, plus the reference, value and update passes. This module runs the same tensor
operations in the same order (RMSNorm in fp32, rotary embedding, SDPA with the boolean mask
transformers builds, SwiGLU MLP), reading the model's own weights and modules, so the result equals
the model's own forward (tests/trainer/test_lean_decoder.py checks it, bit for bit on the tiny
models) and gradients flow as usual.

``LeanDecoder.of(model)`` returns None for anything it does not cover, and callers then use the
model's own forward: other architectures, attention other than SDPA, dynamic RoPE variants,
sliding windows, gradient checkpointing, PEFT/LoRA-wrapped or distributed-wrapped models, and
FSDP-sharded models while their weights are shards (gathered by ``trainer.sharding.gathered`` they are
whole again and the lean pass applies).

Shapes: b = sequences, s = positions in this call, k = positions attended (cache + this call),
h = attention heads, g = key/value heads, d = head dimension.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2"})
STATIC_ROPE_TYPES = frozenset({"default", "linear", "llama3", "yarn"})
"""RoPE types whose frequencies are fixed at load time (dynamic ones change with the sequence length)."""


class LeanDecoder:
    """The backbone of a supported causal LM, sequence classifier or bare model, run without transformers'
    per-call machinery. ``hidden`` gives the final-norm hidden states; ``logits`` applies the LM head."""

    def __init__(self, model, base):
        self.model = model
        self.base = base  # the LlamaModel-like module: embed_tokens, layers, norm, rotary_emb
        config = base.config
        self.layers = list(base.layers[: config.num_hidden_layers])
        attn = self.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.groups = attn.num_key_value_groups
        self.scaling = attn.scaling
        self.lm_head = getattr(model, "lm_head", None)
        # Each layer's tensors and norms read once here, not through nn.Module's attribute lookup and call
        # machinery on every layer of every pass (about a tenth of a sampling step on a small model). Reading them
        # per LeanDecoder (one per pass) keeps them the model's current parameters.
        self._layer_weights = [_LayerWeights(layer) for layer in self.layers]
        self._final_norm = (base.norm.weight, base.norm.variance_epsilon)

    @classmethod
    def of(cls, model) -> "LeanDecoder | None":
        """A LeanDecoder for ``model`` when the lean path computes exactly what its forward computes, else None."""
        # The class's ancestry: a sharded PEFT model's class is FSDP's subclass, defined in torch.
        if any(c.__module__.startswith("peft") for c in type(model).__mro__):
            return None
        config = getattr(model, "config", None)
        if config is None or getattr(config, "model_type", None) not in SUPPORTED_MODEL_TYPES:
            return None
        base = getattr(model, "model", model)  # *ForCausalLM / *ForSequenceClassification hold it as .model
        if type(base).__name__ not in {"LlamaModel", "MistralModel", "Qwen2Model"}:
            return None
        if getattr(config, "_attn_implementation", None) != "sdpa":
            return None
        rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}  # 5.x, 4.x
        if rope.get("rope_type", rope.get("type", "default")) not in STATIC_ROPE_TYPES:
            return None
        if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
            return None
        if getattr(base, "gradient_checkpointing", False) or getattr(config, "pretraining_tp", 1) > 1:
            return None
        layer = base.layers[0]
        if _is_shard(base.embed_tokens.weight) or _is_shard(getattr(getattr(layer.self_attn, "q_proj", None),
                                                                    "weight", None)):
            return None  # FSDP shards outside trainer.sharding.gathered: only the model's forward gathers them
        if not all(hasattr(layer.self_attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")) or \
                not all(hasattr(layer.mlp, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            return None
        # The pass hands each projection's weight and bias to F.linear: only plain Linear modules compute exactly
        # that (a quantised or hooked replacement would not).
        for layer in base.layers[: config.num_hidden_layers]:
            projections = [getattr(layer.self_attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")] + \
                [getattr(layer.mlp, n) for n in ("gate_proj", "up_proj", "down_proj")]
            if any(type(p) is not torch.nn.Linear or p._forward_hooks or p._forward_pre_hooks or hasattr(p, "_hf_hook")
                   for p in projections):  # _hf_hook: accelerate's offloading wraps forward itself
                return None
        return cls(model, base)

    # ------------------------------------------------------------------ pieces

    @staticmethod
    def _rms_norm(norm: tuple[torch.Tensor, float], x: torch.Tensor) -> torch.Tensor:
        """transformers' RMSNorm; ``norm`` is (weight, epsilon)."""
        weight, epsilon = norm
        dtype = x.dtype
        x = x.to(torch.float32)
        variance = x.pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + epsilon)
        return weight * x.to(dtype)

    def rotary(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, signed sin), each (b, s, d), for ``position_ids`` (b, s): transformers' rotary embedding, with
        the first half of sin negated for ``_rotate``."""
        rotary = self.base.rotary_emb
        with torch.autocast(device_type=position_ids.device.type, enabled=False):
            freqs = position_ids[..., None].float() * rotary.inv_freq.to(device=position_ids.device, dtype=torch.float)
            emb = torch.cat((freqs, freqs), dim=-1)
            cos = emb.cos() * rotary.attention_scaling
            sin = emb.sin() * rotary.attention_scaling
        half = sin.shape[-1] // 2
        sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        return cos.to(dtype=dtype), sin.to(dtype=dtype)

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
        """transformers' ``x * cos + rotate_half(x) * sin``, rotate_half(x) = (-x2, x1): the same numbers as
        (x2, x1) * (-sin1, sin2), since negation is exact, one operation fewer per call (forward and backward)."""
        return (x * cos) + (torch.roll(x, x.shape[-1] // 2, dims=-1) * signed_sin)

    @staticmethod
    def attention_mask(attention_mask: torch.Tensor, q_length: int) -> torch.Tensor | None:
        """The boolean (b, 1, s, k) mask transformers builds for SDPA from a 2-D padding mask (b, k), the
        queries being the last s positions; None where it passes none (no padding, and one query or a
        square causal pattern that SDPA's ``is_causal`` covers)."""
        b, k = attention_mask.shape
        padding = attention_mask.bool()
        if (q_length == 1 or q_length == k) and bool(padding.all()):
            return None
        q = torch.arange(k - q_length, k, device=attention_mask.device)
        causal = torch.arange(k, device=attention_mask.device)[None, :] <= q[:, None]  # (s, k)
        return (causal[None, None] & padding[:, None, None, :]).expand(b, 1, q_length, k)

    # ------------------------------------------------------------------ forward

    def hidden(self, input_ids: torch.Tensor, *, position_ids: torch.Tensor, mask: torch.Tensor | None,
               rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
               cache: "KVCache | None" = None) -> torch.Tensor:
        """Final-norm hidden states (b, s, hidden) of ``input_ids`` (b, s).

        ``mask`` comes from ``attention_mask`` (None: causal without padding when s > 1, or no mask for
        one query). ``rotary`` may be given precomputed (``rotary(position_ids, dtype)``). With ``cache``
        (a ``KVCache``) keys and values are appended to it and the queries attend to everything cached
        before them, as with transformers' DynamicCache.
        """
        x = self.base.embed_tokens(input_ids)
        cos, sin = rotary if rotary is not None else self.rotary(position_ids, x.dtype)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        b, s = input_ids.shape
        shape = (b, s, -1, self.head_dim)
        training = self.base.training
        for index, w in enumerate(self._layer_weights):
            h = self._rms_norm(w.input_norm, x)
            q = F.linear(h, *w.q).view(shape).transpose(1, 2)
            k = F.linear(h, *w.k).view(shape).transpose(1, 2)
            v = F.linear(h, *w.v).view(shape).transpose(1, 2)
            q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
            if cache is not None:
                k, v = cache.update(index, k, v)
            out = self._attend(q, k, v, mask, dropout=w.attention_dropout if training else 0.0)
            x = x + F.linear(out.reshape(b, s, -1).contiguous(), *w.o)
            h = self._rms_norm(w.post_norm, x)
            x = x + F.linear(w.act_fn(F.linear(h, *w.gate)) * F.linear(h, *w.up), *w.down)
        if cache is not None:
            cache.filled += s
        return self._rms_norm(self._final_norm, x)

    def _attend(self, q, k, v, mask, *, dropout: float) -> torch.Tensor:
        """transformers' sdpa_attention_forward for these shapes: (b, s, h, d)."""
        s = q.shape[2]
        if self.groups > 1:
            if mask is None:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=dropout, scale=self.scaling,
                                                     is_causal=s > 1, enable_gqa=True)
                return out.transpose(1, 2)
            if s == 1:  # pack the heads that share a key/value head as queries of it
                b, h, _, d = q.shape
                out = F.scaled_dot_product_attention(q.reshape(b, h // self.groups, self.groups, d), k, v,
                                                     attn_mask=mask, dropout_p=dropout, scale=self.scaling)
                return out.reshape(b, -1, 1, d).transpose(1, 2)
            k, v = _repeat_kv(k, self.groups), _repeat_kv(v, self.groups)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=self.scaling,
                                             is_causal=mask is None and s > 1)
        return out.transpose(1, 2)

    def forward_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       position_ids: torch.Tensor) -> torch.Tensor:
        """Whole-sequence pass (no cache): what ``model.model(...).last_hidden_state`` returns."""
        return self.hidden(input_ids, position_ids=position_ids,
                           mask=self.attention_mask(attention_mask, input_ids.shape[1]))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)


def _is_shard(tensor) -> bool:
    if tensor is None or not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


class _LayerWeights:
    """One decoder layer's tensors as ``F.linear`` takes them ((weight, bias) per projection) and its norms as
    (weight, epsilon): what its modules' forwards would read."""

    __slots__ = ("input_norm", "q", "k", "v", "o", "attention_dropout", "post_norm", "gate", "up", "down", "act_fn")

    def __init__(self, layer):
        attn, mlp = layer.self_attn, layer.mlp
        self.input_norm = (layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon)
        self.q, self.k, self.v, self.o = (_linear(attn.q_proj), _linear(attn.k_proj), _linear(attn.v_proj),
                                          _linear(attn.o_proj))
        self.attention_dropout = attn.attention_dropout
        self.post_norm = (layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon)
        self.gate, self.up, self.down = _linear(mlp.gate_proj), _linear(mlp.up_proj), _linear(mlp.down_proj)
        self.act_fn = F.silu if type(mlp.act_fn) in (torch.nn.SiLU, _silu_activation()) else mlp.act_fn


def _linear(module) -> tuple[torch.Tensor, torch.Tensor | None]:
    return module.weight, module.bias


def _silu_activation() -> type:
    """transformers' own SiLU module class where it has one (its forward is F.silu), else nn.SiLU."""
    from transformers import activations

    return getattr(activations, "SiLUActivation", torch.nn.SiLU)


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    b, g, k, d = x.shape
    return x[:, :, None].expand(b, g, groups, k, d).reshape(b, g * groups, k, d)


class KVCache:
    """Every layer's keys and values in buffers allocated once for ``length`` positions; attention reads the
    filled prefix (a view), so a step writes its own key and value instead of copying the whole cache as
    ``torch.cat`` does, and never attends over unfilled positions (what made transformers' StaticCache slower)."""

    def __init__(self, layers: int, length: int):
        self.length = length
        self.filled = 0
        self.keys: list[torch.Tensor | None] = [None] * layers
        self.values: list[torch.Tensor | None] = [None] * layers

    def update(self, index: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (b, g, s, d) ``key`` and ``value`` after the filled prefix; return the keys and values so far."""
        if self.keys[index] is None:
            b, g, _, d = key.shape
            self.keys[index] = key.new_empty(b, g, self.length, d)
            self.values[index] = value.new_empty(b, g, self.length, d)
        end = self.filled + key.shape[2]
        self.keys[index][:, :, self.filled:end] = key
        self.values[index][:, :, self.filled:end] = value
        return self.keys[index][:, :, :end], self.values[index][:, :, :end]


def classifier_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``model(input_ids=..., attention_mask=...).logits`` of a sequence classifier (a reward model): the score
    head read at each row's last token that is not the pad token, through the lean pass when it covers the
    model. (b, labels)."""
    lean = LeanDecoder.of(model)
    score = getattr(model, "score", None)
    pad_id = getattr(getattr(model, "config", None), "pad_token_id", None)
    if lean is None or not isinstance(score, torch.nn.Linear) or pad_id is None:
        return model(input_ids=input_ids, attention_mask=attention_mask).logits
    s = input_ids.shape[1]
    position_ids = torch.arange(s, device=input_ids.device)[None]  # what the model uses when given none
    logits = score(lean.forward_hidden(input_ids, attention_mask, position_ids))  # (b, s, labels)
    # transformers' pooling: the rightmost token that is not pad, whatever the attention mask says
    non_pad = (input_ids != pad_id).to(logits.device, torch.int32)
    last = (torch.arange(s, device=logits.device, dtype=torch.int32) * non_pad).argmax(-1)
    return logits[torch.arange(input_ids.shape[0], device=logits.device), last]
