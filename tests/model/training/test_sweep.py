"""The sweep's plan expansion: runs x seeds, a plan-level `set` under each run's own."""

import tomllib
from pathlib import Path

from model.training.sweep import plan_runs

CONFIGS = Path(__file__).resolve().parents[3] / "model" / "configs"


def test_plan_level_set_applies_to_every_run_and_a_run_overrides_it():
    plan = tomllib.loads('''
seeds = [1, 2]
set = { class_weighting = false, epochs = 6 }
[runs.a]
dataset = "meld"
[runs.b]
dataset = "meld"
set = { class_weighting = true }
''')
    jobs = plan_runs(plan)
    assert [(j["name"], j["seed"]) for j in jobs] == [("a", 1), ("a", 2), ("b", 1), ("b", 2)]
    assert jobs[0]["set"] == ["class_weighting=false", "epochs=6"]
    assert jobs[2]["set"] == ["class_weighting=true", "epochs=6"]


def test_shipped_plans_pin_what_the_default_recipe_changed_since():
    """The model cards' tables ran without class weighting; their plans must still say so."""
    for name in ("ablations.toml", "recipe_search.toml", "recipe_search2.toml"):
        plan = tomllib.loads((CONFIGS / name).read_text())
        for job in plan_runs(plan):
            weighting = [s for s in job["set"] if s.startswith("class_weighting=")]
            assert weighting, (name, job["name"])


def test_data_seeds_expand_into_runs_from_one_start():
    plan = tomllib.loads('''
seeds = [5]
[runs.soup]
dataset = "meld"
data_seeds = [1, 2]
[runs.single]
dataset = "meld"
''')
    from model.training.sweep import run_dir_name

    jobs = plan_runs(plan)
    assert [run_dir_name(j) for j in jobs] == ["soup-s5-d1", "soup-s5-d2", "single-s5"]
    assert jobs[1]["set"] == ["data_seed=2"] and jobs[2]["set"] == []
