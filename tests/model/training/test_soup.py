"""Model soup: runs from the same initial weights (same seed, other data_seed), averaged into one artifact."""

import json

import pytest
import torch
from safetensors.torch import load_file

from model.cli import main as model_cli
from model.training.soup import average_weights

RECIPE = (
    'dataset = "meld"\nepochs = 1\nbatch_dialogues = 1\nsi_chunk = 4\n'
    "[model]\nhidden = 32\nattn_heads = 2\nwindow = 4\ntiny_encoder = { hidden = 32, layers = 2, heads = 2, intermediate = 64 }\n"
)


def _train(data_dir, tmp_path, name, seed, data_seed=None):
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(RECIPE)
    out = tmp_path / name
    args = ["train", "--dataset", "meld", "--data-dir", str(data_dir), "--out", str(out), "--config", str(recipe), "--seed", str(seed)]
    if data_seed is not None:
        args += ["--set", f"data_seed={data_seed}"]
    assert model_cli(args) == 0
    return out


def _initial_state(data_dir, seed, data_seed):
    from model.config import TrainConfig
    from model.training.trainer import Trainer

    cfg = TrainConfig(dataset="meld", seed=seed, data_seed=data_seed, model_overrides={
        "hidden": 32, "attn_heads": 2, "window": 4, "tiny_encoder": {"hidden": 32, "layers": 2, "heads": 2, "intermediate": 64}})
    trainer = Trainer(cfg, data_dir, None, quiet=True).setup()
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}, torch.rand(3)


def test_data_seed_keeps_the_initial_weights_and_changes_what_follows(data_dir):
    (w1, r1), (w2, r2), (w3, _) = (_initial_state(data_dir, 7, 1), _initial_state(data_dir, 7, 2), _initial_state(data_dir, 8, 1))
    assert all(torch.equal(w1[k], w2[k]) for k in w1)  # same seed: same start
    assert not torch.equal(r1, r2)  # the random stream after the build follows data_seed
    assert any(not torch.equal(w1[k], w3[k]) for k in w1 if w1[k].is_floating_point())


def test_soup_is_the_mean_of_the_runs_and_scores_like_an_artifact(data_dir, tmp_path, capsys):
    a = _train(data_dir, tmp_path, "a", 7, data_seed=1)
    b = _train(data_dir, tmp_path, "b", 7, data_seed=2)
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert any(not torch.equal(wa[k], wb[k]) for k in wa)  # the data seed made the runs differ
    capsys.readouterr()
    out = tmp_path / "soup"
    assert model_cli(["soup", str(a), str(b), "--out", str(out), "--data-dir", str(data_dir), "--compare", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(report) == {"soup", "runs", "ensemble", "runs_mean"} and set(report["runs"]) == {"a", "b"}
    ws = load_file(str(out / "model.safetensors"))
    for k in wa:
        if wa[k].is_floating_point():
            torch.testing.assert_close(ws[k].float(), (wa[k].float() + wb[k].float()) / 2, atol=2e-3, rtol=2e-3)
    config = json.loads((out / "config.json").read_text())
    assert [r["data_seed"] for r in config["meta"]["soup_of"]] == [1, 2]
    metrics = json.loads((out / "dev_metrics.json").read_text())
    assert metrics["weighted_f1_final"] == report["soup"]["final"]
    assert (out / "confusion_dev_final.png").exists()


def test_soup_refuses_runs_from_other_initial_weights(data_dir, tmp_path):
    a = _train(data_dir, tmp_path, "a", 7, data_seed=1)
    c = _train(data_dir, tmp_path, "c", 8, data_seed=1)
    with pytest.raises(ValueError, match="seed"):
        average_weights([a, c])
    with pytest.raises(ValueError, match="at least two"):
        average_weights([a])
