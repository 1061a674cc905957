import json

import numpy as np
import pytest
import torch

from model.artifact import load_artifact, save_artifact
from model.cli import main as model_cli
from model.modeling import EmotionSIModel
from model.offline import score_dialogues
from model.training.data import load_meld
from tests.conftest import tiny_config, write_meld_csv


def test_artifact_round_trip_gives_the_same_outputs(tmp_path, tokenizer):
    torch.manual_seed(4)
    model = EmotionSIModel(tiny_config()).eval()
    path = save_artifact(model, tmp_path / "art", name="tiny", version="0.0.1")
    assert {p.name for p in path.iterdir()} >= {"config.json", "labels.json", "model.safetensors"}
    loaded, config = load_artifact(path)
    assert config["name"] == "tiny" and loaded.cfg == model.cfg
    dls = load_meld(write_meld_csv(tmp_path / "m.csv"))
    a = score_dialogues(model, tokenizer, dls)
    b = score_dialogues(loaded, tokenizer, dls)
    for mode in a:  # weights are stored in float16: equal to that precision
        np.testing.assert_allclose(a[mode], b[mode], atol=2e-3)


def test_int8_weights_store_the_encoder_matrices_in_a_byte_and_load_back_close(tmp_path, tokenizer):
    """save_artifact(int8=True): the encoder's matrices as int8 rows with a float16 scale each (the
    MPNet artifact's 50 MB budget); loading dequantizes them, the rest is float16 as before."""
    from safetensors.torch import load_file

    torch.manual_seed(5)
    model = EmotionSIModel(tiny_config()).eval()
    path = save_artifact(model, tmp_path / "art8", name="tiny", version="0.0.1", int8=True)
    stored = load_file(str(path / "model.safetensors"))
    matrices = [k for k, v in stored.items() if k.startswith("encoder.") and v.dim() == 2 and not k.endswith(".int8_scale")]
    assert matrices and all(stored[k].dtype == torch.int8 and k + ".int8_scale" in stored for k in matrices)
    assert all(v.dtype != torch.int8 for k, v in stored.items() if not k.startswith("encoder."))
    loaded, _ = load_artifact(path)
    for name, t in model.state_dict().items():
        if name in matrices:  # within half a quantisation step of each row
            step = t.abs().amax(dim=1, keepdim=True) / 127
            assert bool(((loaded.state_dict()[name] - t).abs() <= step * 0.51 + 1e-3).all()), name
    dls = load_meld(write_meld_csv(tmp_path / "m.csv"))
    a, b = score_dialogues(model, tokenizer, dls), score_dialogues(loaded, tokenizer, dls)
    for mode in a:
        np.testing.assert_allclose(a[mode], b[mode], atol=2e-2)


def test_load_refuses_a_folder_without_an_artifact(tmp_path):
    with pytest.raises(FileNotFoundError, match="emotion-monitor train"):
        load_artifact(tmp_path)


@pytest.mark.parametrize("extra", ["", "ema_decay = 0.9\n"], ids=["raw-weights", "ema"])
def test_train_then_evaluate_cli_on_tiny_data(data_dir, tmp_path, capsys, extra):
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(
        'dataset = "meld"\nepochs = 2\nbatch_dialogues = 2\nsi_chunk = 4\n' + extra +
        "[model]\nhidden = 32\nattn_heads = 2\nwindow = 4\ntiny_encoder = { hidden = 32, layers = 2, heads = 2, intermediate = 64 }\n"
    )
    out = tmp_path / "art"
    assert model_cli(["train", "--dataset", "meld", "--data-dir", str(data_dir), "--out", str(out), "--config", str(recipe)]) == 0
    for name in ("config.json", "model.safetensors", "dev_metrics.json", "training_curves.png", "confusion_dev_final.png"):
        assert (out / name).exists(), name
    history = json.loads((out / "training_history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    capsys.readouterr()
    plot = tmp_path / "cm.png"
    rc = model_cli(["evaluate", "--model", str(out), "--dataset", "meld", "--data", str(data_dir / "meld" / "dev_sent_emo.csv"), "--json", "--plot", str(plot)])
    assert rc == 0 and plot.stat().st_size > 1000
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["n_utterances"] == 6
    for key in ("weighted_f1_offline", "weighted_f1_final", "weighted_f1_provisional"):
        assert 0.0 <= last[key] <= 100.0
    assert set(last["per_class"]["final"]) == {"neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear"}


def test_evaluate_rejects_labels_of_another_dataset(data_dir, tmp_path, tokenizer):
    from model.training.data import load_emorynlp
    from model.training.evaluate import evaluate

    model = EmotionSIModel(tiny_config()).eval()
    dls = load_emorynlp(data_dir / "emorynlp" / "emotion-detection-dev.json")
    with pytest.raises(ValueError, match="--dataset"):
        evaluate(model, tokenizer, dls)
