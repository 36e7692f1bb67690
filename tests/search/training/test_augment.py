import numpy as np
import torch

from search.training.augment import augment, dihedral, hed_jitter


def test_dihedral_yields_all_8_symmetries():
    x = torch.arange(16.0).view(1, 1, 4, 4).repeat(400, 1, 1, 1)
    out = dihedral(x, torch.Generator().manual_seed(0))
    distinct = {tuple(o.flatten().tolist()) for o in out}
    # the 8 elements of the dihedral group of the square, and nothing else (numpy's
    # rotations of the patch and of its transpose)
    a = np.arange(16.0).reshape(4, 4)
    want = {tuple(np.rot90(m, k).flatten().tolist()) for m in (a, a.T) for k in range(4)}
    assert distinct == want


def test_hed_jitter_keeps_shape_and_range():
    x = torch.rand(8, 3, 32, 32)
    out = hed_jitter(x, 1.0, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    assert not torch.allclose(out, x)


def test_hed_jitter_zero_strength_is_identity():
    x = torch.rand(2, 3, 8, 8)
    assert torch.equal(hed_jitter(x, 0.0), x)
    assert torch.equal(augment(x, 0.0), x)
