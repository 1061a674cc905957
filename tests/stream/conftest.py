import warnings

import pytest
import torch

from model.artifact import save_artifact
from model.modeling import EmotionSIModel
from tests.conftest import tiny_config


@pytest.fixture(scope="session")
def stack():
    """One Kafka-protocol broker and one Redis for the whole test session: in containers when
    EMOTION_MONITOR_TEST_CONTAINERS=1 asks for them and a Docker engine answers (tests/stream/
    containers.py), else a real Tansu broker + a real redis-server started here."""
    from tests.stream import containers

    if containers.wanted():
        if containers.use_containers():
            with containers.container_stack() as st:
                yield st
            return
        warnings.warn(f"{containers.ENV} asks for containers but no Docker engine answers: using the local stack")
    from stream.tools.localstack import local_stack

    with local_stack({}) as st:
        yield st


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory):
    """A tiny randomly initialised model saved as a real artifact (the worker loads it)."""
    torch.manual_seed(11)
    model = EmotionSIModel(tiny_config(lookahead=2, window=4)).eval()
    return save_artifact(model, tmp_path_factory.mktemp("tiny-artifact"), name="tiny", version="0.0.1")
