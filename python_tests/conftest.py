import os

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
