"""Integrations with training libraries; each module imports its library, so import the one you need
(`bridge_ops.integrations.trl` needs `pip install "bridge_ops[trl]"`)."""
