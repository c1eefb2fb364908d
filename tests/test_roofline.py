"""The floor `captioner benchmark` puts under the encoder's time: multiply-adds by kind of
convolution, and this CPU's matrix-product rate on onnxruntime."""

import pytest
import torch
from torch import nn

from captioner.serving.roofline import conv_macs, encoder_floors, gemm_rates


def test_multiply_adds_are_counted_by_kind_of_convolution():
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1),  # stem: 8 x 4 x 4 outputs, 3 x 3 x 3 each
        nn.Conv2d(8, 8, 3, padding=1, groups=8),  # depthwise: 8 x 4 x 4 outputs, 3 x 3 each
        nn.Conv2d(8, 16, 1),  # 1x1: 16 x 4 x 4 outputs, 8 each
        nn.ReLU(),
    )
    macs = conv_macs(net, torch.zeros(2, 3, 8, 8))
    assert macs == {"1x1": 2 * 16 * 16 * 8, "depthwise": 2 * 8 * 16 * 9, "other": 2 * 8 * 16 * 27}


def test_the_floor_is_the_1x1_work_at_the_measured_rate():
    floors = encoder_floors({"1x1": 2e9, "depthwise": 1e9, "other": 0.0}, {"fp32": 40.0, "int8": 80.0})
    assert floors == pytest.approx({"fp32": 50.0, "int8": 25.0})  # ms


def test_matrix_product_rates_are_measured_for_both_precisions():
    rates = gemm_rates(threads=1, side=128)
    assert set(rates) == {"fp32", "int8"}
    assert all(rate > 0 for rate in rates.values())
