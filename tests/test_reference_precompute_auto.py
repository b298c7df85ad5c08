"""algo.precompute_ref_logps=null: precompute when a reference model would be held and the run
covers the training data at least once."""

import json

import pytest

from alignctl.algos.preference import choose_reference_precompute
from alignctl.compose import compose_job
from alignctl.engine.offline import PreparedData


def decide(*overrides, examples=64):
    job = compose_job(["recipe=smoke/dpo", "train.per_device_batch_size=4", *overrides])
    data = PreparedData(train=[object()] * examples, eval=None, collate=list)
    choose_reference_precompute(job, data)
    return job.algo.precompute_ref_logps, dict(data.notes).get("reference precompute", "")


@pytest.mark.parametrize("overrides, on, said", [
    (["train.max_steps=16"], True, "covers the training data 1.0 times"),
    (["train.max_steps=-1", "train.num_epochs=2"], True, "2.0 times"),
    (["train.max_steps=8", "train.gradient_accumulation_steps=2"], True, "1.0 times"),
    (["train.max_steps=15"], False, "the run covers 94% of the training data"),
    (["train.max_steps=-1", "train.num_epochs=0.5"], False, "covers 50%"),
    (["train.max_steps=16", "peft=lora"], False, "adapter off: no model to drop"),
    (["train.max_steps=16", "algo.sync_ref_model=true"], False, "moves (algo.sync_ref_model)"),
    (["train.max_steps=16", "algo.reference_free=true"], False, "the reference is none"),
])
def test_null_is_resolved_into_the_job_with_its_reason(overrides, on, said):
    value, note = decide(*overrides)
    assert value is on
    assert note.startswith(f"{'on' if on else 'off'} (algo.precompute_ref_logps=null: ") and said in note


@pytest.mark.parametrize("value", [True, False])
def test_an_explicit_value_is_used_as_given(value):
    assert decide("train.max_steps=1" if value else "train.max_steps=100", f"algo.precompute_ref_logps={str(value).lower()}") \
        == (value, "")


def test_a_covering_run_holds_no_reference_and_says_so(tmp_path):
    from alignctl.registry import get_algorithm

    job = compose_job(["recipe=smoke/kto", "train.max_steps=-1", "train.num_epochs=1", "run.progress=false",
                       "run.sample_prompts=0", f"run.output_dir={tmp_path / 'run'}", "train.eval_steps=0"])
    get_algorithm("kto").load_driver()(job)
    summary = json.dumps(json.loads((tmp_path / "run" / "summary.json").read_text()))
    assert "precomputed log-probs" in summary and "covers the training data 1.0 times" in summary
