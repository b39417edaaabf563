"""Importing never crashes: without the compiled extension the reference serves every call, and info says why."""

import os
import subprocess
import sys
import textwrap

import bridge_ops
from bridge_ops import info


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True)


def test_import_without_extension_falls_back_to_the_reference():
    result = run_python(
        """
        import sys, warnings
        sys.modules["bridge_ops._C"] = None  # what a missing or broken build looks like to Python
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import bridge_ops
            import bridge_ops.info
        assert sum("compiled extension could not be loaded" in str(w.message) for w in caught) == 1, caught
        import torch
        cu = bridge_ops.cu_group_lens_from_width(4, 2)
        q = torch.randn(4, 3, 1, 8, requires_grad=True)
        out = bridge_ops.bridge_attention(q, q, q, cu)
        out.sum().backward()
        assert q.grad is not None
        assert bridge_ops.dispatch.backend_for("cpu").name == "reference"
        block = bridge_ops.BridgeBlock(16, d_bridge=8)
        assert block(torch.randn(4, 3, 16), cu).abs().sum() == 0
        print(bridge_ops.info.report())
        """
    )
    assert result.returncode == 0, result.stderr
    assert "extension bridge_ops._C: NOT loaded" in result.stdout
    assert "cpu -> reference" in result.stdout
    assert "unavailable: the compiled extension bridge_ops._C is not loaded" in result.stdout


def test_info_reports_the_loaded_build():
    text = info.report()
    assert f"bridge_ops {bridge_ops.__version__}" in text
    assert "extension bridge_ops._C: loaded" in text
    assert "cpu -> cpu" in text
    assert "cuda" in text  # the CUDA backend is listed with the reason it is unavailable here


def test_info_runs_as_a_module():
    result = subprocess.run([sys.executable, "-m", "bridge_ops.info"], capture_output=True, text=True)
    assert result.returncode == 0 and "backends" in result.stdout


def test_build_info_describes_the_build():
    build = bridge_ops._loader.build_info()
    assert build["torch_version"].split("+")[0] == bridge_ops._loader.torch.__version__.split("+")[0]
    assert "cpu" in build["backends"]
    expected_isa = os.environ.get("BRIDGE_OPS_CPU_ISA") == "default" and "default"
    assert build["cpu_isa"] in (("default",) if expected_isa else ("default", "avx2+fma"))


def test_import_never_needs_trl():
    result = run_python(
        """
        import sys
        sys.modules["trl"] = None  # what a missing trl looks like to Python
        import bridge_ops, bridge_ops.hf, bridge_ops.train, bridge_ops.integrations
        try:
            import bridge_ops.integrations.trl
        except ImportError:
            print("the TRL integration needs trl")
        """
    )
    assert result.returncode == 0, result.stderr
    assert "the TRL integration needs trl" in result.stdout
