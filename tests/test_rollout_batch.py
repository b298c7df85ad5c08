"""The typed rollout batch: model inputs from left-padded prompts, slicing that keeps rows together."""

import torch

from alignctl.rollout.batch import Rollout, stack_rollouts


def rollout():
    return Rollout(
        prompt_ids=torch.tensor([[0, 5, 6], [7, 8, 9]]),
        prompt_mask=torch.tensor([[0, 1, 1], [1, 1, 1]]),
        response_ids=torch.tensor([[10, 11, 0], [12, 0, 0]]),
        response_mask=torch.tensor([[1, 1, 0], [1, 0, 0]]),
        row_index=torch.tensor([3, 4]),
        group_ids=torch.tensor([0, 1]),
        scores=torch.tensor([1.0, 2.0]),
    )


def test_model_inputs():
    r = rollout()
    assert r.input_ids.tolist() == [[0, 5, 6, 10, 11, 0], [7, 8, 9, 12, 0, 0]]
    assert r.attention_mask.tolist() == [[0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]]
    assert r.position_ids.tolist() == [[0, 0, 1, 2, 3, 3], [0, 1, 2, 3, 3, 3]]
    assert r.labels.tolist() == [[-100, -100, -100, 10, 11, -100], [-100, -100, -100, 12, -100, -100]]
    assert r.response_lengths.tolist() == [2, 1]


def test_select_minibatches_trim_and_stack_keep_rows_together():
    r = rollout()
    picked = r.select(torch.tensor([1]))
    assert picked.row_index.tolist() == [4] and picked.scores.tolist() == [2.0] and picked.logprobs is None
    assert picked.trimmed().response_ids.tolist() == [[12]]
    seen = []
    for part in r.minibatches(1, torch.Generator().manual_seed(0)):
        seen += list(zip(part.row_index.tolist(), part.scores.tolist()))
    assert sorted(seen) == [(3, 1.0), (4, 2.0)]
    both = stack_rollouts([picked.trimmed(), r.select(torch.tensor([0]))])
    assert both.response_ids.tolist() == [[12, 0, 0], [10, 11, 0]]
    assert both.response_mask.tolist() == [[1, 0, 0], [1, 1, 0]]
    assert both.row_index.tolist() == [4, 3]
