"""bridge_ops.layout: the helpers that build cu_group_lens."""

import pkgutil
import types

import numpy as np
import pytest
import torch

import bridge_ops
from bridge_ops.layout import GroupLayout, group_ids


def test_from_width():
    cu = bridge_ops.cu_group_lens_from_width(12, 4)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 4, 8, 12]
    assert bridge_ops.cu_group_lens_from_width(3, 1).tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="not a positive multiple of width 4"):
        bridge_ops.cu_group_lens_from_width(10, 4)
    with pytest.raises(ValueError, match="width must be >= 1"):
        bridge_ops.cu_group_lens_from_width(4, 0)


def test_from_sizes():
    cu = bridge_ops.cu_group_lens_from_sizes([4, 1, 33])
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 4, 5, 38]
    assert bridge_ops.group_sizes(cu).tolist() == [4, 1, 33]
    with pytest.raises(ValueError, match="at least one row"):
        bridge_ops.cu_group_lens_from_sizes([2, 0, 1])
    with pytest.raises(ValueError, match="non-empty"):
        bridge_ops.cu_group_lens_from_sizes([])


def test_from_ids():
    ids = torch.tensor([7, 7, 2, 5, 5, 5, 9])
    cu = bridge_ops.cu_group_lens_from_ids(ids)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 2, 3, 6, 7]
    assert group_ids(cu).tolist() == [0, 0, 1, 2, 2, 2, 3]
    with pytest.raises(ValueError, match=r"id 7 appears at rows \[0, 1, 4\]"):
        bridge_ops.cu_group_lens_from_ids(torch.tensor([7, 7, 2, 2, 7]))
    with pytest.raises(ValueError, match="integers"):
        bridge_ops.cu_group_lens_from_ids(torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="non-empty 1-D"):
        bridge_ops.cu_group_lens_from_ids(torch.zeros(2, 2, dtype=torch.long))


def test_layout_is_the_module_and_groups_the_function():
    """One name per concept: `bridge_ops.layout` is the group-layout module, `bridge_ops.groups` only the function."""
    assert isinstance(bridge_ops.layout, types.ModuleType) and bridge_ops.layout.__name__ == "bridge_ops.layout"
    assert bridge_ops.layout.GroupLayout is GroupLayout and bridge_ops.layout.group_ids is group_ids
    assert isinstance(bridge_ops.groups, types.FunctionType) and bridge_ops.groups is bridge_ops.hf.runtime.groups
    # the package's own modules (read from its directory: an editable install of another checkout can map names too)
    modules = {m.name for m in pkgutil.iter_modules(bridge_ops.__path__)}
    assert "layout" in modules and "groups" not in modules


@pytest.mark.guarantee
def test_cu_group_lens_from_sizes_refuses_fractions_and_int32_overflow():
    with pytest.raises(ValueError, match="group sizes must be integers"):
        bridge_ops.cu_group_lens_from_sizes([2.5, 1.5])
    with pytest.raises(ValueError, match="add up to 2147483649 rows"):
        bridge_ops.cu_group_lens_from_sizes([2**31, 1])
    assert bridge_ops.cu_group_lens_from_sizes(np.array([2, 3])).tolist() == [0, 2, 5]
