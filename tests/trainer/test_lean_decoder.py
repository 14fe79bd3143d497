"""The lean forward pass (trainer.lean_decoder) computes exactly what the model's own forward computes."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


def _config(kv_heads: int = 4, **overrides):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=kv_heads, intermediate_size=64, max_position_embeddings=128,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, **overrides)


def _llama(kv_heads: int = 4, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(_config(kv_heads, **overrides)).eval()


def _batch(padded: bool = True):
    from trainer.rollout import left_pad

    rows = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [20, 21]] if padded else [[5, 6, 7], [8, 9, 10], [20, 21, 22]]
    query, mask = left_pad(rows, pad_id=0, device="cpu")
    response = torch.tensor([[30, 31, 32, 2], [33, 34, 2, 0], [35, 36, 37, 38]])
    return torch.cat([query, response], 1), torch.cat([mask, (response != 0).long()], 1), query, mask


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("padded", [True, False], ids=["left-padded", "unpadded"])
def test_the_lean_pass_equals_the_models_forward_bit_for_bit_with_the_same_gradients(kv_heads, padded):
    from trainer.lean_decoder import LeanDecoder
    from trainer.rollout import positions

    model = _llama(kv_heads)
    lean = LeanDecoder.of(model)
    assert lean is not None
    ids, mask, _, _ = _batch(padded)
    expected = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits
    expected.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    got = lean.logits(lean.forward_hidden(ids, mask, positions(mask)))
    got.sum().backward()
    assert torch.equal(got, expected)
    for name, param in model.named_parameters():
        assert torch.allclose(param.grad, grads[name], rtol=0, atol=1e-6), name


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("top_k", [None, 5])
def test_lean_sampling_draws_what_the_model_forward_loop_draws(kv_heads, top_k, monkeypatch):
    """Same seed, same tokens, log-probs and entropies as the loop over the model's own forward (which
    test_rollout checks against model.generate), stop token and early end included."""
    from trainer import rollout
    from trainer.lean_decoder import LeanDecoder

    model = _llama(kv_heads)
    _, _, query, mask = _batch()
    settings = dict(max_new_tokens=12, temperature=0.7, top_k=top_k, pad_token_id=0)
    torch.manual_seed(3)
    stop = int(rollout.sample(model, query, mask, stop_token_id=None, **settings).tokens[0, 2])
    torch.manual_seed(4)
    lean = rollout.sample(model, query, mask, stop_token_id=stop, **settings)
    monkeypatch.setattr(LeanDecoder, "of", classmethod(lambda cls, m: None))
    torch.manual_seed(4)
    plain = rollout.sample(model, query, mask, stop_token_id=stop, **settings)
    assert torch.equal(lean.tokens, plain.tokens)
    assert torch.equal(lean.logprobs, plain.logprobs)
    assert torch.equal(lean.entropy, plain.entropy)


def test_the_value_backbone_runs_lean_with_the_same_values(tmp_path):
    from transformers import AutoModel

    from trainer.lean_decoder import LeanDecoder
    from trainer.ppo import ValueModel
    from trainer.rollout import positions

    _llama().save_pretrained(tmp_path)
    value = ValueModel.from_pretrained(str(tmp_path), dtype=torch.float32)
    torch.nn.init.normal_(value.head.weight)
    assert LeanDecoder.of(value.backbone) is not None
    ids, mask, _, _ = _batch()
    backbone = AutoModel.from_pretrained(tmp_path)
    expected = value.head(backbone(input_ids=ids, attention_mask=mask,
                                   position_ids=positions(mask)).last_hidden_state).squeeze(-1)
    assert torch.equal(value(ids, mask, positions(mask)), expected)


def test_what_the_lean_pass_does_not_cover_uses_the_models_own_forward():
    from transformers import GPT2Config, GPT2LMHeadModel

    from trainer.lean_decoder import LeanDecoder

    assert LeanDecoder.of(_llama(attn_implementation="eager")) is None
    assert LeanDecoder.of(_llama(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})) is None
    checkpointed = _llama()
    checkpointed.gradient_checkpointing_enable()
    assert LeanDecoder.of(checkpointed) is None
    assert LeanDecoder.of(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64))) is None
    assert LeanDecoder.of(torch.nn.parallel.DistributedDataParallel.__new__(
        torch.nn.parallel.DistributedDataParallel)) is None
    # The pass calls F.linear on each projection's weight: a hooked or replaced projection keeps the model's forward.
    hooked = _llama()
    hooked.model.layers[1].mlp.down_proj.register_forward_hook(lambda module, args, out: out * 2)
    assert LeanDecoder.of(hooked) is None
    replaced = _llama()
    replaced.model.layers[0].self_attn.q_proj = torch.nn.Sequential(replaced.model.layers[0].self_attn.q_proj)
    replaced.model.layers[0].self_attn.q_proj.weight = replaced.model.layers[0].self_attn.q_proj[0].weight
    assert LeanDecoder.of(replaced) is None
    assert LeanDecoder.of(_llama()) is not None


def test_a_lora_model_uses_its_own_forward():
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    from trainer.lean_decoder import LeanDecoder

    model = get_peft_model(_llama(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    assert LeanDecoder.of(model) is None


def test_a_reward_models_scores_through_the_lean_pass_equal_its_forward():
    """Right-padded rows as the reward scorer pads them, pooled at the last token that is not pad."""
    from transformers import AutoModelForSequenceClassification

    from trainer.lean_decoder import LeanDecoder, classifier_logits

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(_config(num_labels=1)).eval()
    assert LeanDecoder.of(model) is not None
    ids = torch.tensor([[5, 6, 7, 30, 2], [8, 9, 0, 0, 0], [20, 21, 22, 23, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        assert torch.equal(classifier_logits(model, ids, mask), model(input_ids=ids, attention_mask=mask).logits)


@pytest.mark.parametrize("weights", [torch.float32, torch.bfloat16], ids=["fp32-weights", "bf16-weights"])
def test_the_lean_pass_equals_the_models_forward_under_bf16_autocast(weights):
    """What bf16 runs do: fp32 master weights (or a bf16 frozen copy) under autocast."""
    from trainer.lean_decoder import LeanDecoder
    from trainer.rollout import positions

    model = _llama(2).to(weights)
    ids, mask, _, _ = _batch()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits
        lean = LeanDecoder.of(model)
        got = lean.logits(lean.forward_hidden(ids, mask, positions(mask)))
    assert torch.equal(got, expected)


def test_the_lean_pass_reads_projection_biases_qwen2_has():
    """Qwen2's q/k/v projections carry a bias; the lean pass hands each projection's weight and bias to F.linear."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from trainer.lean_decoder import LeanDecoder
    from trainer.rollout import positions

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen2Config(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False)).eval()
    with torch.no_grad():  # a bias of 0 (the initial value) would not show whether it is read
        for layer in model.model.layers:
            layer.self_attn.q_proj.bias.normal_()
            layer.self_attn.k_proj.bias.normal_()
            layer.self_attn.v_proj.bias.normal_()
    lean = LeanDecoder.of(model)
    assert lean is not None
    ids, mask, _, _ = _batch()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits
        assert torch.equal(lean.logits(lean.forward_hidden(ids, mask, positions(mask))), expected)
