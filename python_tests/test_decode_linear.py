"""decode_linear, the linear layer of a decode step: the CPU kernel against F.linear in float64 over rows, feature
sizes and strides (both CPU builds), its row independence, its fall-backs, errors, opcheck, and generation with it:
the same tokens as with the model's own linear layers."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import bridge_ops
from bridge_ops import ops

pytestmark = pytest.mark.skipif(bridge_ops._loader._C is None, reason="needs the compiled extension")

ROWS = (1, 2, 3, 7, 8, 9, 16, 17, 32)
FEATURES = ((1, 1), (5, 3), (8, 16), (13, 40), (64, 7), (576, 192))


def exact(x, weight, bias):
    """F.linear in float64: the value float32 rounding is measured against."""
    return F.linear(x.double(), weight.double(), None if bias is None else bias.double())


def inputs(rows, in_features, out_features, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, in_features, generator=g)
    weight = torch.randn(out_features, in_features, generator=g) / in_features**0.5
    return x, weight, torch.randn(out_features, generator=g) if bias else None


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("features", FEATURES, ids=str)
@pytest.mark.parametrize("bias", [True, False])
def test_kernel_equals_linear_in_float64(rows, features, bias):
    x, weight, b = inputs(rows, *features, bias=bias, seed=rows)
    got = torch.ops.bridge_ops.decode_linear(x, weight, b)
    assert got.dtype == torch.float32 and got.shape == (rows, features[1])
    want = exact(x, weight, b)
    # float32 sums of `in` products: error grows like sqrt(in) ulp of the magnitudes summed
    assert (got.double() - want).abs().max() < 1e-5 * features[0] ** 0.5 * (1 + want.abs().max())


def test_rows_do_not_depend_on_their_batch():
    """Each row's result is bitwise the same alone, in any block of rows and at any thread count: the kernel's sum
    order is fixed per row."""
    x, weight, b = inputs(17, 96, 50)
    together = torch.ops.bridge_ops.decode_linear(x, weight, b)
    for r in range(17):
        assert torch.equal(torch.ops.bridge_ops.decode_linear(x[r : r + 1], weight, b)[0], together[r])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(torch.ops.bridge_ops.decode_linear(x, weight, b), together)
    finally:
        torch.set_num_threads(threads)


def test_leading_dims_and_strided_inputs():
    x, weight, b = inputs(6, 40, 24)
    x3 = x.reshape(2, 3, 40)
    assert torch.equal(
        torch.ops.bridge_ops.decode_linear(x3, weight, b),
        torch.ops.bridge_ops.decode_linear(x, weight, b).reshape(2, 3, 24),
    )
    strided = torch.randn(6, 80)[:, ::2]
    strided_weight = torch.randn(48, 40)[::2]
    assert not strided.is_contiguous() and not strided_weight.is_contiguous()
    got = torch.ops.bridge_ops.decode_linear(strided, strided_weight, b)
    assert torch.equal(got, torch.ops.bridge_ops.decode_linear(strided.contiguous(), strided_weight.contiguous(), b))


@pytest.mark.parametrize(
    "case",
    ["33 rows", "float64", "bfloat16", "empty rows"],
)
def test_other_cases_are_f_linear(case):
    """More than 32 rows, other dtypes and empty inputs are exactly F.linear."""
    x, weight, b = inputs(33 if case == "33 rows" else 4, 24, 10)
    if case == "float64":
        x, weight, b = x.double(), weight.double(), b.double()
    if case == "bfloat16":
        x, weight, b = x.bfloat16(), weight.bfloat16(), b.bfloat16()
    if case == "empty rows":
        x = x[:0]
    assert torch.equal(torch.ops.bridge_ops.decode_linear(x, weight, b), F.linear(x, weight, b))


def test_wrapper_under_autograd_is_f_linear():
    """The op has no backward: with inputs that require grad the wrapper is F.linear, and gradients flow."""
    x, weight, b = inputs(4, 12, 6)
    weight.requires_grad_(True)
    ops.decode_linear(x, weight, b).sum().backward()
    assert weight.grad is not None and torch.equal(weight.grad, x.sum(0).expand(6, 12))


@pytest.mark.parametrize(
    "args, message",
    [
        ((torch.zeros(2, 5), torch.zeros(3, 4), None), "in_features"),
        ((torch.zeros(2, 4), torch.zeros(3, 4, 1), None), "weight must be"),
        ((torch.zeros(2, 4), torch.zeros(3, 4), torch.zeros(2)), "bias must be"),
    ],
)
def test_bad_shapes_name_the_argument(args, message):
    with pytest.raises(ValueError, match=message):
        torch.ops.bridge_ops.decode_linear(*args)


def test_opcheck():
    x, weight, b = inputs(5, 24, 10)
    torch.library.opcheck(torch.ops.bridge_ops.decode_linear.default, (x, weight, b))
    torch.library.opcheck(torch.ops.bridge_ops.decode_linear.default, (x, weight, None))


def test_baseline_cpu_build_equals_linear():
    """The baseline (non-AVX2) build, forced through BRIDGE_OPS_CPU_ISA, in a subprocess."""
    script = textwrap.dedent(
        """
        import torch
        import bridge_ops
        from test_decode_linear import exact, inputs

        assert bridge_ops._loader.build_info()["cpu_isa"] == "default"
        for rows in (1, 5, 8, 13):
            x, weight, b = inputs(rows, 77, 33, seed=rows)
            got = torch.ops.bridge_ops.decode_linear(x, weight, b).double()
            assert (got - exact(x, weight, b)).abs().max() < 1e-4, rows
        """
    )
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, BRIDGE_OPS_CPU_ISA="default")
    result = subprocess.run([sys.executable, "-c", script], cwd=here, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_decode_linears_patches_plain_linear_layers_only_and_restores_them():
    from bridge_ops.generation import decode_linears

    class Quantized(torch.nn.Linear):  # a subclass keeps its own forward
        pass

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), Quantized(4, 4), torch.nn.Linear(4, 2))
    own = torch.nn.Linear(2, 2)
    own.forward = lambda x: x  # already replaced on the instance: left alone
    model.append(own)
    with decode_linears(model):
        assert "forward" in model[0].__dict__ and "forward" in model[2].__dict__
        assert "forward" not in model[1].__dict__
        x = torch.randn(3, 4)
        with torch.no_grad():
            assert torch.allclose(model(x), torch.nn.Sequential(*model[:3])(x), atol=1e-6)
    assert "forward" not in model[0].__dict__ and "forward" not in model[2].__dict__
    assert own.forward(torch.ones(1)) == 1


@pytest.mark.parametrize("do_sample", [False, True])
def test_generation_draws_the_same_tokens_as_with_the_models_linear(do_sample):
    """generate() decodes through decode_linear; with the layers' own F.linear instead, the same prompts, widths and
    generators give the same tokens, and the logits agree to float32 rounding."""
    from hf_models import bridged_model

    import bridge_ops.generation as generation

    model = bridged_model("llama").eval()
    prompts = [[1, 5, 9, 3], [1, 7], [1, 2, 3, 4, 5, 6]]

    def run():
        generators = [torch.Generator().manual_seed(i) for i in range(3)]
        return bridge_ops.generate(
            model,
            prompts,
            [3, 1, 8],
            12,
            do_sample=do_sample,
            generators=generators,
            eos_token_id=[],
            return_logits=True,
        )

    fast = run()
    original = generation.decode_linears
    try:
        generation.decode_linears = lambda model: __import__("contextlib").nullcontext()
        plain = run()
    finally:
        generation.decode_linears = original
    assert fast.sequences == plain.sequences
    for a, b in zip(fast.logits, plain.logits):
        for x, y in zip(a, b):
            assert torch.allclose(x, y, atol=1e-4, rtol=1e-4)
