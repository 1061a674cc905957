import pytest
import torch

from model.artifact import save_artifact
from model.modeling import EmotionSIModel
from tests.conftest import tiny_config


@pytest.fixture(scope="session")
def stack():
    """One real Tansu broker + one real redis-server for the whole test session."""
    from stream.tools.localstack import local_stack

    with local_stack({}) as st:
        yield st


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory):
    """A tiny randomly initialised model saved as a real artifact (the worker loads it)."""
    torch.manual_seed(11)
    model = EmotionSIModel(tiny_config(lookahead=2, window=4)).eval()
    return save_artifact(model, tmp_path_factory.mktemp("tiny-artifact"), name="tiny", version="0.0.1")
