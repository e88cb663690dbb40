"""The peers that eval/_pareto_peers.py writes itself (Hadamard + RTN, HIGGS) and its SINQ bit count."""

from __future__ import annotations

import pytest
import torch

from fpxint_hf.expansion import relative_error, rtn


@pytest.fixture(scope="module")
def peers(eval_module):
    return eval_module("_pareto_peers")


@pytest.mark.parametrize("n", [64, 192, 384, 576, 1536])
def test_hadamard_of_the_smollm2_and_test_sizes_is_orthogonal(n, peers):
    h = peers.hadamard(n)
    assert set(h.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))
    r = peers.random_hadamard(n, seed=3)
    assert torch.allclose(r @ r.T, torch.eye(n), atol=1e-5)
    assert not torch.equal(r, peers.random_hadamard(n, seed=4))  # the signs depend on the seed


def test_gaussian_grid_is_lloyd_max(peers):
    # Max (1960): the MSE-optimal 4- and 8-level quantizers of N(0, 1)
    assert peers.gaussian_grid(2).tolist() == pytest.approx([-1.5104, -0.4528, 0.4528, 1.5104], abs=1e-3)
    assert peers.gaussian_grid(3)[4:].tolist() == pytest.approx([0.2451, 0.7560, 1.3439, 2.1519], abs=1e-3)


def test_rotation_spreads_an_outlier_column_and_counts_the_same_bits_as_rtn(peers):
    torch.manual_seed(0)
    w = torch.randn(96, 192) * 0.02
    w[:, 7] *= 30  # an outlier input column: RTN's groups that hold it lose their resolution
    for bits in (3, 4):
        rot, rot_bits = peers.rotated_rtn(w, bits, seed=0)
        hig, hig_bits = peers.higgs(w, bits, seed=0)
        assert rot_bits == w.numel() * (bits + 0.5) and hig_bits == w.numel() * (bits + 0.25)
        assert relative_error(rot, w) < relative_error(rtn(w, bits, 64), w)
        assert relative_error(hig, w) < relative_error(rtn(w, bits, 64), w)


def test_sinq_counts_codes_quantized_scales_zeros_and_column_scales(peers):
    pytest.importorskip("sinq.quantizer", reason="the SINQ authors' package (eval only)")
    torch.manual_seed(0)
    w = torch.randn(64, 256) * 0.02
    deq, bits = peers.sinq(w, 4)
    groups = w.numel() // 64
    # 8-bit scale and zero per group, float16 step+min per 32 scales and once for the zeros, float16 per column
    assert bits == w.numel() * 4 + 8 * groups + 32 * (groups // 32) + 8 * groups + 32 + 16 * 256
    assert relative_error(deq, w) < 1.1 * relative_error(rtn(w, 4, 64), w)
