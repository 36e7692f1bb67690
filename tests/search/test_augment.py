import torch

from search.augment import augment, dihedral, hed_jitter


def test_dihedral_yields_all_8_symmetries():
    x = torch.arange(16.0).view(1, 1, 4, 4).repeat(400, 1, 1, 1)
    out = dihedral(x, torch.Generator().manual_seed(0))
    distinct = {tuple(o.flatten().tolist()) for o in out}
    # the 8 elements of the dihedral group of the square, and nothing else
    assert len(distinct) == 8
    assert all(sorted(d) == list(range(16)) for d in distinct)


def test_hed_jitter_keeps_shape_and_range():
    x = torch.rand(8, 3, 32, 32)
    out = hed_jitter(x, 1.0, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    assert not torch.allclose(out, x)


def test_hed_jitter_zero_strength_is_identity():
    x = torch.rand(2, 3, 8, 8)
    assert torch.equal(hed_jitter(x, 0.0), x)
    assert torch.equal(augment(x, 0.0), x)
