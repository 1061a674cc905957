"""The `onnx-int8` backend (model/quantize.py): stored calibration, the int8 graph, its fallback."""

import logging

import numpy as np
import pytest
import torch

from model.backends import (
    BACKENDS,
    BackendUnavailable,
    build_encoder,
    export_onnx,
    onnxruntime_available,
)
from model.encoding import tokenize
from model.modeling import EmotionSIModel
from tests.conftest import tiny_config

pytestmark = pytest.mark.skipif(not onnxruntime_available(), reason="ONNX Runtime is not installed (the onnx extra)")

CPU = torch.device("cpu")
TEXTS = ["short", "a different and rather longer utterance with more tokens in it", "okay", "what?!",
         "I can't believe you did that!", "Oh no, oh no, oh no.", "hm"]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """A tiny artifact and its calibration from a miniature MELD train split."""
    from model.artifact import save_artifact
    from model.quantize import calibrate
    from model.training.data import load_dataset
    from tests.conftest import write_meld_csv

    tmp = tmp_path_factory.mktemp("int8")
    torch.manual_seed(0)
    path = save_artifact(EmotionSIModel(tiny_config()).eval(), tmp / "art", name="tiny", version="1")
    calibrate(path, load_dataset("meld", write_meld_csv(tmp / "train_sent_emo.csv")))
    return path


def _loaded(path):
    from model.artifact import load_artifact

    return load_artifact(path)[0]


@pytest.fixture(scope="module")
def exported(artifact):
    """(model, its float ONNX graph, the int8 graph): one export for the module."""
    from model.quantize import int8_encoder_graph, load_act_max

    model = _loaded(artifact)
    proto = export_onnx(model.encoder)
    root = logging.getLogger()
    before = (list(root.handlers), root.level, list(root.filters))
    graph = int8_encoder_graph(proto, model.encoder, load_act_max(artifact, model.encoder))
    assert (list(root.handlers), root.level, list(root.filters)) == before  # ORT's basicConfig undone
    return model, proto, graph


def test_the_backend_lists_agree():
    from model.cli import BACKENDS as CLI_BACKENDS

    assert CLI_BACKENDS == BACKENDS and "onnx-int8" in BACKENDS


def test_calibration_is_stored_per_linear_layer_and_input_channel(artifact):
    from model.quantize import ACT_MAX_FILE, linear_modules, load_act_max

    model = _loaded(artifact)
    stats = load_act_max(artifact, model.encoder)
    linears = linear_modules(model.encoder)
    assert set(stats) == set(linears) and len(stats) == 12  # 2 layers x q, k, v, o, FFN in, FFN out
    for name, m in linears.items():
        assert stats[name].shape == (m.in_features,) and stats[name].dtype == np.float32 and (stats[name] > 0).all()
    # q, k and v read the same input: the same maxima
    assert np.array_equal(stats["encoder.layer.0.attention.self.query"], stats["encoder.layer.0.attention.self.value"])
    assert (artifact / ACT_MAX_FILE).stat().st_size < 20_000


def test_smoothing_alone_is_exact_in_float(artifact, exported, tokenizer):
    """x / s before each smoothed group and diag(s) W in its weights: the float graph computes the same."""
    from onnx import numpy_helper

    from model.backends import ort_encoder
    from model.quantize import load_act_max, smoothed_graph

    model, proto, _ = exported
    smoothed, plan = smoothed_graph(proto, model.encoder, load_act_max(artifact, model.encoder))
    assert [p["role"] for p in plan[:6]] == ["q", "k", "v", "o", "f1", "f2"] and len(plan) == 12
    before = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    after = {i.name: numpy_helper.to_array(i) for i in smoothed.graph.initializer}
    f2 = plan[5]["node"].input[1]
    assert not np.allclose(before[f2], after[f2])  # the weights did change
    ids, mask = tokenize(tokenizer, TEXTS, 64)
    with torch.inference_mode():
        assert float((ort_encoder(smoothed)(ids, mask) - model.encoder(ids, mask)).abs().max()) < 1e-4


def test_int8_encoder_is_quantised_and_close_to_eager(exported, tokenizer):
    """SmoothQuant + int8 graph: every weight MatMul replaced by integer arithmetic (12 MatMulInteger),
    one per-row quantisation per distinct input (q, k, v share one: 4 a layer), and each utterance
    vector within cosine 0.99 of eager float32 (a wrong smoothing, e.g. W * s without x / s, or a
    missing zero-point correction, breaks this)."""
    from model.backends import ort_encoder

    model, proto, graph = exported
    ops = [nd.op_type for nd in graph.graph.node]
    assert ops.count("MatMulInteger") == 12 and ops.count("MatMul") == sum(nd.op_type == "MatMul" for nd in proto.graph.node) - 12
    assert ops.count("ReduceMin") == 8  # (qkv, o, f1, f2) x 2 layers
    assert sum(nd.name.startswith("smoothquant_mul_") for nd in graph.graph.node) == 6  # (qkv, f1, f2) x 2 layers
    assert sum(nd.op_type == "MatMul" for nd in proto.graph.node) == 16  # the float graph is left as it was
    fn = ort_encoder(graph)
    ids, mask = tokenize(tokenizer, TEXTS, 64)
    with torch.inference_mode():
        ref, got = model.encoder(ids, mask), fn(ids, mask)
    cos = torch.nn.functional.cosine_similarity(ref, got, dim=-1)
    assert cos.shape == (len(TEXTS),) and float(cos.min()) >= 0.99
    assert float((ref - got).abs().max()) > 1e-6  # not the float graph


def test_int8_vectors_do_not_depend_on_the_batch(exported, tokenizer):
    """An utterance's int8 vector is the same alone, in a batch, and beside other (longer, louder)
    utterances: what lets the live worker, which batches whatever arrives, score as `evaluate` does.
    (Dynamic quantisation, one activation scale per call, failed this: 3e-4 apart here, up to 0.12 on
    the shipped models.)"""
    from model.backends import ort_encoder

    _, _, graph = exported
    fn = ort_encoder(graph)
    ids, mask = tokenize(tokenizer, TEXTS, 64)
    with torch.inference_mode():
        together = fn(ids, mask)
        for i, text in enumerate(TEXTS):
            alone = fn(*tokenize(tokenizer, [text], 64))[0]
            beside = fn(*tokenize(tokenizer, [text, TEXTS[1] + " " + TEXTS[1].upper() + "!!!"], 64))[0]
            assert float((alone - together[i]).abs().max()) < 1e-5, text
            assert float((alone - beside).abs().max()) < 1e-5, text


def test_scorer_runs_end_to_end_with_onnx_int8(artifact):
    from model.scorer import Scorer
    from model.streaming import DialogueState

    scorer = Scorer(artifact, "cpu", backend="onnx-int8")
    assert scorer.backend == "onnx-int8" and scorer.encode_batch == 32
    eager = Scorer(artifact, "cpu", backend="eager").encode(TEXTS)
    vecs = scorer.encode(TEXTS)
    assert vecs.shape == eager.shape
    cos = (vecs * eager).sum(-1) / np.linalg.norm(vecs, axis=-1) / np.linalg.norm(eager, axis=-1)
    assert cos.min() >= 0.99
    states, scored = scorer.step([DialogueState(), DialogueState()], vecs[:2], ["Ross", "Rachel"])
    assert len(states) == 2 and all(len(s) >= 1 for s in scored)
    assert all(abs(float(x.probs.sum()) - 1) < 1e-5 for s in scored for x in s)


def test_missing_calibration_says_which_command_to_run(tmp_path):
    from model.artifact import save_artifact
    from model.quantize import CalibrationError
    from model.scorer import Scorer

    torch.manual_seed(0)
    path = save_artifact(EmotionSIModel(tiny_config()).eval(), tmp_path / "art", name="tiny", version="1")
    with pytest.raises(CalibrationError, match=r"emotion-monitor calibrate --model .*art --data-dir"):
        Scorer(path, "cpu", backend="onnx-int8")
    from model.cli import main
    from tests.conftest import write_meld_csv

    data = write_meld_csv(tmp_path / "dev.csv")
    with pytest.raises(SystemExit, match=r"evaluate: .*lacks: run `emotion-monitor calibrate --model"):
        main(["evaluate", "--model", str(path), "--dataset", "meld", "--data", str(data), "--backend", "onnx-int8"])
    with pytest.raises(BackendUnavailable, match="artifact folder"):
        build_encoder(EmotionSIModel(tiny_config()).eval().encoder, "onnx-int8", CPU)


def test_auto_serves_int8_only_for_an_artifact_shipping_its_own_calibration(artifact, tmp_path, caplog):
    """An artifact opts into int8 on the CPU by carrying a calibration of its weights; without one,
    or with one of other weights (warned), `auto` serves float onnx."""
    import shutil

    from model.artifact import save_artifact
    from model.backends import choose_backend
    from model.quantize import ACT_MAX_FILE

    assert choose_backend("auto", CPU, artifact) == "onnx-int8"
    assert choose_backend("auto", CPU) == "onnx"  # no folder to read a calibration from
    assert choose_backend("onnx", CPU, artifact) == "onnx"  # an explicit choice stands
    torch.manual_seed(1)
    other = save_artifact(EmotionSIModel(tiny_config()).eval(), tmp_path / "other", name="tiny", version="2")
    assert choose_backend("auto", CPU, other) == "onnx"
    shutil.copy(artifact / ACT_MAX_FILE, other / ACT_MAX_FILE)
    with caplog.at_level(logging.WARNING, logger="emotion_monitor.quantize"):
        assert choose_backend("auto", CPU, other) == "onnx"
    assert "backend auto serves the float encoder" in caplog.text and "other weights" in caplog.text


def test_calibration_of_other_weights_is_refused(artifact, tmp_path):
    """Retrained into the same folder: the stored maxima no longer match model.safetensors."""
    import shutil

    from model.artifact import save_artifact
    from model.quantize import ACT_MAX_FILE, CalibrationError, load_act_max

    torch.manual_seed(1)
    other = save_artifact(EmotionSIModel(tiny_config()).eval(), tmp_path / "other", name="tiny", version="2")
    shutil.copy(artifact / ACT_MAX_FILE, other / ACT_MAX_FILE)
    with pytest.raises(CalibrationError, match="other weights.*emotion-monitor calibrate"):
        load_act_max(other)


def test_unexpected_graph_falls_back_to_float_with_a_warning(artifact, exported, tokenizer, caplog, monkeypatch):
    """A graph whose weight MatMuls are not the encoder's Linear layers (here: one weight changed
    after export) is served in float32, with a warning, as backend 'onnx'."""
    from model import backends
    from model.quantize import int8_encoder_graph, load_act_max

    _, proto, _ = exported
    model = _loaded(artifact)
    stats = load_act_max(artifact, model.encoder)
    with torch.no_grad():
        model.encoder.bert.encoder.layer[1].output.dense.weight.mul_(1.5)
    with caplog.at_level(logging.WARNING, logger="emotion_monitor.quantize"):
        assert int8_encoder_graph(proto, model.encoder, stats) is None
    assert "is not encoder.layer.1.output.dense; serving the float graph" in caplog.text

    # the same through the backend: it serves the exported float graph and says it is 'onnx'
    monkeypatch.setattr(backends, "export_onnx", lambda encoder: proto)
    used, fn = build_encoder(model.encoder, "onnx-int8", CPU, artifact)
    assert used == "onnx"
    with torch.no_grad():
        model.encoder.bert.encoder.layer[1].output.dense.weight.div_(1.5)  # the weights as exported
    ids, mask = tokenize(tokenizer, TEXTS, 64)
    with torch.inference_mode():
        assert float((fn(ids, mask) - model.encoder(ids, mask)).abs().max()) < 1e-5


def test_calibrate_command_writes_the_file(tmp_path, data_dir, capsys):
    from model.artifact import save_artifact
    from model.cli import main
    from model.quantize import ACT_MAX_FILE

    torch.manual_seed(0)
    path = save_artifact(EmotionSIModel(tiny_config()).eval(), tmp_path / "art", name="tiny", version="1",
                         meta={"dataset": "meld"})
    assert main(["calibrate", "--model", str(path), "--data-dir", str(data_dir), "--n", "5"]) == 0
    assert (path / ACT_MAX_FILE).exists() and "5 utterances of train_sent_emo.csv" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="not found"):
        main(["calibrate", "--model", str(path), "--data-dir", str(tmp_path / "nowhere")])
