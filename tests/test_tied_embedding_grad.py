"""A tied input embedding's gradient is added row by row into the LM head's, in place: the stored gradient
equals the stock dense path's; untied or frozen embeddings are left alone."""

import copy
import json
from pathlib import Path

import pytest
import torch

from alignctl.config import ArchConfig
from alignctl.models import head_logps
from alignctl.models.logps import sequence_logps, token_nll
from alignctl.models.tied_embedding_grad import defer_tied_embedding_grad
from alignctl.models.tiny import build_tiny_model, build_tiny_tokenizer


def tiny(tied: bool):
    model = build_tiny_model(ArchConfig(), build_tiny_tokenizer(512))
    if tied:
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 500, (2, 11), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100
    return ids, torch.ones_like(ids), labels


def grads(model):
    model.zero_grad(set_to_none=True)
    token_nll(sequence_logps(model, *batch(), chunk_size=7)).backward()
    return {name: p.grad for name, p in model.named_parameters()}


def test_gradient_equals_the_stock_path_and_is_added_in_place():
    stock = tiny(tied=True)
    deferred = copy.deepcopy(stock)
    deferred.lm_head.weight = deferred.model.embed_tokens.weight  # deepcopy keeps the tie; say it explicitly
    assert defer_tied_embedding_grad(deferred)
    returned = {}
    original_backward = head_logps._LinearLabelLogps.backward

    def backward(ctx, *grads_out):  # remember the head's gradient buffer
        out = original_backward(ctx, *grads_out)
        returned["weight"] = out[1].data_ptr()
        return out

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(head_logps._LinearLabelLogps, "backward", staticmethod(backward))
        want, got = grads(stock), grads(deferred)
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7, msg=name)
    assert got["model.embed_tokens.weight"].data_ptr() == returned["weight"]  # no second [V, H] buffer
    # a second backward accumulates into the stored gradient
    token_nll(sequence_logps(deferred, *batch(), chunk_size=7)).backward()
    torch.testing.assert_close(deferred.model.embed_tokens.weight.grad, 2 * want["model.embed_tokens.weight"])


def test_a_backward_reaching_only_the_embedding_still_stores_its_gradient():
    model = tiny(tied=True)
    assert defer_tied_embedding_grad(model)
    pad = model.model.embed_tokens.padding_idx
    model.model.embed_tokens(torch.tensor([[10, 11, 11, pad]])).sum().backward()
    grad = model.model.embed_tokens.weight.grad
    assert grad[11].eq(2).all() and grad[10].eq(1).all() and grad[12].eq(0).all()
    assert grad[pad].eq(0).all()  # as F.embedding: the padding row gets no gradient


@pytest.mark.parametrize("case", ["untied", "frozen"])
def test_left_alone_when_it_does_not_apply(case):
    model = tiny(tied=case != "untied")
    if case == "frozen":
        model.requires_grad_(False)
    assert not defer_tied_embedding_grad(model)
    assert "forward" not in vars(model.model.embed_tokens)


def test_a_run_of_a_tied_model_says_so(tmp_path):
    from alignctl.compose import compose_job
    from alignctl.registry import get_algorithm

    folder = tmp_path / "tied"
    tokenizer = build_tiny_tokenizer(512)
    tiny(tied=True).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    job = compose_job([
        "algo=sft", "model=tiny", "model.arch=null", f"model.name_or_path={folder}", "train.max_steps=2", "train.save_steps=0",
        "train.eval_steps=0", "run.progress=false", "run.sample_prompts=0", f"run.output_dir={tmp_path / 'out'}",
    ])
    result = get_algorithm("sft").load_driver()(job)
    rows = json.loads((Path(result.run_dir) / "summary.json").read_text())["rows"]
    assert rows["tied embedding gradient"].startswith("added row by row")
