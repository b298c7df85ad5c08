"""Padding-free reward batches: the same rewards, losses and gradients as padded rows."""

import pytest
import torch
from test_padding_free import loss_and_grads, setup_algorithm

from alignctl.algos.reward import RewardAlgorithm
from alignctl.data.collate import unpad_batch
from alignctl.errors import ConfigError
from alignctl.models.reward_scorer import (
    RewardScorer,
    classifier_of,
    enable_scorer_padding_free,
    scorer_padding_free_support,
)
from alignctl.models.varlen import VARLEN_SDPA, attn_implementation


def setup_reward(*overrides):
    return setup_algorithm(RewardAlgorithm, ["recipe=smoke/reward", *overrides])


def assert_same_training_signal(algorithm, model, padded, free):
    loss_a, metrics_a, grads_a = loss_and_grads(algorithm, model, padded)
    loss_b, metrics_b, grads_b = loss_and_grads(algorithm, model, free)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    for key in metrics_a:
        assert metrics_b[key] == pytest.approx(metrics_a[key], rel=1e-4, abs=1e-5), key
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("peft", ["none", "lora"])
def test_decoder_reward_model_padding_free_matches_padded(peft):
    torch.manual_seed(0)
    algorithm, model, data, padded_collate = setup_reward(f"peft={peft}")
    assert ("padding-free", "on (sdpa, one kernel per sequence)") in data.notes
    assert attn_implementation(classifier_of(model)) == VARLEN_SDPA
    examples = data.train[:6]
    padded, free = padded_collate(examples), data.collate(examples)
    assert free["input_ids"].shape == (1, int(padded["seq_lengths"].sum()))
    assert free["input_ids"].shape[1] < padded["input_ids"].numel()  # padding removed
    with torch.no_grad():
        torch.testing.assert_close(model(**_inputs(free)), model(**_inputs(padded)), rtol=1e-5, atol=1e-5)
    assert_same_training_signal(algorithm, model, padded, free)


def test_padding_free_off_keeps_padded_rows():
    _, model, data, padded_collate = setup_reward("algo.padding_free=false")
    assert ("padding-free", "off (algo.padding_free=false)") in data.notes
    assert attn_implementation(classifier_of(model)) == "sdpa"
    assert data.collate is padded_collate


def _inputs(batch):
    return {k: batch.get(k) for k in ("input_ids", "attention_mask", "position_ids", "cu_seq_lens")}


def _right_padded(sequences, pad_id):
    longest = max(len(s) for s in sequences)
    return {
        "input_ids": torch.tensor([s + [pad_id] * (longest - len(s)) for s in sequences]),
        "attention_mask": torch.tensor([[1] * len(s) + [0] * (longest - len(s)) for s in sequences]),
        "labels": torch.full((len(sequences), longest), -100),
        "seq_lengths": torch.tensor([len(s) for s in sequences]),
    }


def test_last_token_rule_skips_a_final_pad_token_as_the_padded_forward_does():
    """When EOS is the pad token, the padded forward scores the token before a final EOS: so must
    the padding-free row (and a sequence of pad tokens only is scored at its first token)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=3)
    scorer = RewardScorer(LlamaForSequenceClassification(config).eval())
    enable_scorer_padding_free(scorer)
    batch = _right_padded([[5, 6, 7, 3], [8, 9], [3, 3, 3], [10, 3, 11, 12, 3]], pad_id=3)
    free = unpad_batch(batch)
    with torch.no_grad():
        torch.testing.assert_close(scorer(**_inputs(free)), scorer(**_inputs(batch)), rtol=1e-5, atol=1e-6)


def _tiny_bert(attn_implementation="sdpa"):
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=60, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=64, num_labels=1,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    config._attn_implementation = attn_implementation
    return BertForSequenceClassification(config)


def test_bert_reward_model_padding_free_matches_padded():
    torch.manual_seed(0)
    scorer = RewardScorer(_tiny_bert())
    assert enable_scorer_padding_free(scorer) == "sdpa, one kernel per sequence"
    batch = _right_padded([[2, 5, 6, 7, 1], [2, 8, 1], [2, 9, 10, 11, 12, 13, 1], [2, 14, 15, 1]], pad_id=0)
    free = unpad_batch(batch)
    padded_rewards = scorer(**_inputs(batch))
    free_rewards = scorer(**_inputs(free))
    torch.testing.assert_close(free_rewards, padded_rewards, rtol=1e-5, atol=1e-6)
    grads = []
    for rewards in (padded_rewards, free_rewards):
        scorer.zero_grad(set_to_none=True)
        (rewards * torch.tensor([1.0, -2.0, 0.5, 3.0])).sum().backward()
        grads.append({n: p.grad.clone() for n, p in scorer.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6)


def test_kernels_that_would_mix_sequences_keep_padded_rows():
    ok, reason = scorer_padding_free_support(RewardScorer(_tiny_bert("eager")))
    assert not ok and "'eager'" in reason  # a bidirectional eager mask ignores restarting positions
    with pytest.raises(ConfigError, match="algo.padding_free=true"):
        setup_reward("algo.padding_free=true", "model.attn_implementation=flex_attention")
