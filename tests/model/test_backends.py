import pytest
import torch

from model.backends import (
    BackendUnavailable,
    build_encoder,
    choose_backend,
    export_encoder,
    load_exported,
    onnxruntime_available,
    tensorrt_available,
)
from model.encoding import tokenize
from model.modeling import EmotionSIModel
from tests.conftest import tiny_config

CPU = torch.device("cpu")


def test_backend_selection_on_cpu():
    assert choose_backend("auto", CPU) == ("onnx" if onnxruntime_available() else "eager")
    assert choose_backend("eager", CPU) == "eager"
    assert choose_backend("compile", CPU) == "compile"
    with pytest.raises(ValueError, match="unknown backend"):
        choose_backend("openvino", CPU)


@pytest.mark.skipif(tensorrt_available(), reason="torch-tensorrt is installed here")
def test_tensorrt_asked_for_without_it_says_what_to_do():
    with pytest.raises(BackendUnavailable, match=r"pip install 'emotion-monitor\[tensorrt\]'"):
        choose_backend("tensorrt", CPU)


def test_exported_program_equals_eager_with_dynamic_shapes(tmp_path, tokenizer):
    """torch.export program vs eager, at shapes other than the example's: max abs difference < 1e-5."""
    torch.manual_seed(0)
    enc = EmotionSIModel(tiny_config()).eval().encoder
    ids, mask = tokenize(tokenizer, ["hello there", "a somewhat longer example sentence"], 64)
    path = export_encoder(enc, tmp_path / "enc.pt2", (ids, mask))
    program = load_exported(path)
    texts = ["short", "a different and rather longer utterance with more tokens in it", "okay", "what?!"]
    ids2, mask2 = tokenize(tokenizer, texts, 64)
    with torch.inference_mode():
        assert (program(ids2, mask2) - enc(ids2, mask2)).abs().max() < 1e-5


def test_compile_backend_equals_eager_on_cpu(tokenizer):
    torch.manual_seed(0)
    enc = EmotionSIModel(tiny_config()).eval().encoder
    used, fn = build_encoder(enc, "compile", CPU)
    ids, mask = tokenize(tokenizer, ["hello there", "a somewhat longer example sentence", "hm"], 64)
    with torch.inference_mode():
        assert used == "compile" and (fn(ids, mask) - enc(ids, mask)).abs().max() < 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_backends_agree_with_eager_fp32(tokenizer):  # pragma: no cover - GPU only
    torch.manual_seed(0)
    cuda = torch.device("cuda")
    enc = EmotionSIModel(tiny_config()).eval().encoder.to(cuda)
    ids, mask = tokenize(tokenizer, ["hello there", "a somewhat longer example sentence"], 64, cuda)
    with torch.inference_mode():
        ref = enc(ids, mask)
        for backend in ("eager", "compile") + (("tensorrt",) if tensorrt_available() else ()):
            _, fn = build_encoder(enc, backend, cuda)
            assert (fn(ids, mask) - ref).abs().max() < 2e-2, backend  # float16 on CUDA


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_streaming_step_on_cuda_equals_cpu():  # pragma: no cover - GPU only
    """The streaming step on a GPU (vectors given as CUDA tensors, windows built on the host and
    copied once) scores like the CPU path: probabilities within 1e-4 over 6 steps of 3 conversations."""
    import numpy as np

    from model.streaming import DialogueState, step

    torch.manual_seed(0)
    cpu_model = EmotionSIModel(tiny_config()).eval()
    cuda_model = EmotionSIModel(tiny_config()).eval().to("cuda")
    cuda_model.load_state_dict(cpu_model.state_dict())
    rng = np.random.default_rng(0)
    s_cpu = s_gpu = [DialogueState()] * 3
    for t in range(6):
        vecs = rng.standard_normal((3, cpu_model.encoder.dim)).astype(np.float32)
        speakers = [f"s{(t + i) % 2}" for i in range(3)]
        s_cpu, out_cpu = step(cpu_model, s_cpu, vecs, speakers)
        s_gpu, out_gpu = step(cuda_model, s_gpu, torch.from_numpy(vecs).cuda(), speakers)
        for a, b in zip(out_cpu, out_gpu):
            assert [x.position for x in a] == [x.position for x in b]
            assert max(float(abs(x.probs - y.probs).max()) for x, y in zip(a, b)) < 1e-4


def test_scorer_with_the_compile_backend_encodes_like_eager_on_cpu(tmp_path):
    """The worker's path (Scorer.encode) with EMOTION_MONITOR_BACKEND=compile: a compiled module
    has no truth value, which once made `encode_fn or model.encode` raise."""
    from model.artifact import save_artifact
    from model.scorer import Scorer

    torch.manual_seed(0)
    path = save_artifact(EmotionSIModel(tiny_config()).eval(), tmp_path / "art", name="tiny", version="1")
    texts = ["hello there", "a somewhat longer example sentence", "hm"]
    eager = Scorer(path, "cpu", backend="eager").encode(texts)
    compiled = Scorer(path, "cpu", backend="compile")
    assert compiled.backend == "compile"
    assert abs(compiled.encode(texts) - eager).max() < 1e-4


@pytest.mark.skipif(not onnxruntime_available(), reason="ONNX Runtime is not installed (the onnx extra)")
def test_onnx_backend_equals_eager_on_cpu_at_other_shapes(tokenizer):
    """Exported with a (2, 8) example, served at other batch sizes and lengths: within 1e-5."""
    torch.manual_seed(0)
    enc = EmotionSIModel(tiny_config()).eval().encoder
    used, fn = build_encoder(enc, "onnx", CPU)
    assert used == "onnx"
    for texts in (["one"], ["short", "a different and rather longer utterance with more tokens in it", "okay", "what?!"]):
        ids, mask = tokenize(tokenizer, texts, 64)
        with torch.inference_mode():
            assert (fn(ids, mask) - enc(ids, mask)).abs().max() < 1e-5
    with pytest.raises(BackendUnavailable, match="runs on the CPU"):
        choose_backend("onnx", torch.device("cuda"))


def test_onnx_asked_for_without_it_says_what_to_do(monkeypatch):
    import model.backends as backends

    monkeypatch.setattr(backends, "onnxruntime_available", lambda: False)
    with pytest.raises(BackendUnavailable, match=r"pip install 'emotion-monitor\[onnx\]'"):
        backends.choose_backend("onnx", CPU)
    assert backends.choose_backend("auto", CPU) == "eager"
