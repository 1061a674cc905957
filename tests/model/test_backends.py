import pytest
import torch

from model.backends import BackendUnavailable, build_encoder, choose_backend, export_encoder, load_exported, tensorrt_available
from model.inference import tokenize
from model.modeling import EmotionSIModel
from tests.conftest import tiny_config

CPU = torch.device("cpu")


def test_backend_selection_on_cpu():
    assert choose_backend("auto", CPU) == "eager"
    assert choose_backend("eager", CPU) == "eager"
    assert choose_backend("compile", CPU) == "compile"
    with pytest.raises(ValueError, match="unknown backend"):
        choose_backend("onnx", CPU)


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
