"""Compression schemes: torch simulation (k-means LUTs, int8), mixed-bit allocation from a sensitivity analysis,
per-layer Core ML application (mixed widths, W8A8 with torch-calibrated activation ranges), W8A8 chosen per chip."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from snapopt.lowering import compression as cmp


def test_palettized_weights_use_at_most_2_to_the_bits_values_and_err_less_with_more_bits():
    torch.manual_seed(0)
    w = torch.randn(64, 32, 3, 3)
    errs = []
    for b in (1, 2, 4, 6, 8):
        q = cmp.palettized(w, b)
        assert q.shape == w.shape and q.unique().numel() <= 2 ** b
        errs.append(float((q - w).pow(2).mean()))
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    grouped = cmp.palettized(w, 2, group_size=16)  # one LUT per 16 output channels
    assert all(g.unique().numel() <= 4 for g in grouped.split(16)) and grouped.unique().numel() > 4


def test_int8_weights_are_per_channel_symmetric():
    w = torch.tensor([[1.0, -0.5, 0.25], [100.0, 3.0, -7.0]])
    q = cmp.int8_weights(w)
    assert torch.allclose(q[0], w[0], atol=1 / 127) and torch.allclose(q[1], w[1], atol=100 / 127)
    assert float(q[0].abs().max()) == 1.0  # the row's max maps to 127 exactly


def _sens(table: dict[str, dict[int, float]], sizes: dict[str, int], fixed=None) -> cmp.Sensitivity:
    return cmp.Sensitivity(table, sizes, fixed or {})


def test_allocation_meets_the_average_and_spends_bits_on_sensitive_layers():
    # 'fragile' loses much more PSNR than 'robust' at every width
    table = {"fragile": {1: 5, 2: 10, 4: 20, 6: 30, 8: 40}, "robust": {1: 25, 2: 35, 4: 45, 6: 55, 8: 65}}
    sens = _sens(table, {"fragile": 1000, "robust": 1000})
    recipe, threshold = cmp.allocate(sens, 5.0)
    assert cmp.average_bits(recipe, sens.sizes) <= 5.0
    assert recipe["fragile"] > recipe["robust"], recipe
    loose, _ = cmp.allocate(sens, 8.0)
    assert cmp.average_bits(loose, sens.sizes) > cmp.average_bits(recipe, sens.sizes)
    # layers too small to analyse sit at the uniform width at or above the target and count in the average
    with_fixed = _sens(table, {"fragile": 1000, "robust": 1000}, {"small": 2000})
    rec, _ = cmp.allocate(with_fixed, 4.5)
    assert rec["small"] == 6 and cmp.average_bits(rec, {**with_fixed.sizes, **with_fixed.fixed}) <= 4.5


def _tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=2, norm_num_groups=4).eval()


def _probe(unet) -> cmp.UnetProbe:
    g = torch.Generator().manual_seed(0)
    inputs = (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([999.0, 100.0]), torch.randn(2, 77, 16, generator=g))
    with torch.no_grad():
        ref = unet(*inputs, return_dict=False)[0]
    return cmp.UnetProbe(inputs, ref)


def test_sensitivity_ranks_widths_and_the_mixed_recipe_beats_uniform_at_equal_bits():
    unet = _tiny_unet()
    probe = _probe(unet)
    before = [p.detach().clone() for p in unet.parameters()]
    sens = cmp.sensitivity(unet, probe, nbits=(2, 4, 8), min_params=512)
    assert all(torch.equal(a, b) for a, b in zip(before, unet.parameters())), "weights must be restored"
    assert len(sens.psnr) >= 4
    for d in sens.psnr.values():  # more bits never hurt much more than fewer
        assert d[8] >= d[2] - 1e-6
    recipe, _ = cmp.allocate(sens, 3.0)
    sizes = {**sens.sizes, **sens.fixed}
    avg = cmp.average_bits(recipe, sizes)
    assert avg <= 3.0
    mixed = probe.psnr(cmp.simulate(unet, {"scheme": "mixed", "recipe": recipe}))
    uniform2 = probe.psnr(cmp.simulate(unet, {"scheme": "palettize", "bits": 2}))
    assert mixed > uniform2, (mixed, uniform2)
    assert math.isfinite(probe.psnr(cmp.simulate(unet, {"scheme": "fp16"})))


class _Small(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(8, 32, 3, padding=1)
        self.lin = nn.Linear(32, 64)
        self.out = nn.Linear(64, 32)

    def forward(self, x):
        h = self.conv(x).mean((2, 3))
        return self.out(torch.relu(self.lin(h)))


def _convert(module, x):
    from snapopt.lowering.coreml import _silenced, import_coremltools

    ct = import_coremltools()
    ep = torch.export.export(module, (x,)).run_decompositions({})
    with _silenced():
        return ct.convert(ep, inputs=[ct.TensorType(name="x", shape=tuple(x.shape), dtype=np.float16)], convert_to="mlprogram",
                          minimum_deployment_target=ct.target.iOS17, compute_precision=ct.precision.FLOAT16, skip_model_load=True)


def _ops(model):
    spec = model.get_spec()
    fn = spec.mlProgram.functions["main"]
    return list(fn.block_specializations[next(iter(fn.block_specializations))].operations)


def test_mixed_widths_and_w8a8_land_in_the_core_ml_program():
    pytest.importorskip("sklearn")
    from snapopt.lowering.coreml import _silenced

    m = _Small().eval()
    x = torch.randn(2, 8, 6, 6)
    model = _convert(m, x)
    names = cmp.weight_names(model, m, min_params=256)
    assert set(names) == {"conv", "lin", "out"}
    with _silenced():
        mixed = cmp.palettize_mixed(model, m, {"conv": 2, "lin": 4, "out": 16}, min_params=256)
    luts = {tuple(op.outputs[0].shape): op.lut.val.size for op in mixed._mil_program.functions["main"].operations
            if op.op_type == "constexpr_lut_to_dense"}
    assert luts == {(32, 8, 3, 3): 4, (64, 32): 16}, luts  # conv 2-bit, lin 4-bit, 'out' stays fp16
    scales = cmp.calibrate_activations(m, [(x,)], min_params=256)
    assert scales["conv"] == pytest.approx(float(x.abs().max()) / 127, rel=1e-6)
    with _silenced():
        w8a8 = cmp.quantize_w8a8(model, m, scales, min_params=256)
    types = [op.type for op in _ops(w8a8)]
    assert types.count("quantize") == 3 and types.count("dequantize") >= 3, types
    assert any(t.startswith("constexpr_") for t in types)  # int8 weights
    # the torch simulation of the same scheme stays close to fp on the calibration data
    sim = cmp.simulate(m, {"scheme": "w8a8"}, {k: v for k, v in scales.items()})
    assert cmp.psnr(m(x).detach(), sim(x).detach()) > 25


def test_w8a8_is_chosen_only_where_the_chip_computes_int8():
    from snapopt.lowering.export import compression_plan
    from snapopt.lowering.spec import ExportSpec
    from snapopt.recipe import validate_recipe

    def targets(*ids):
        return validate_recipe({"name": "t", "model": "arch:tiny", "targets": list(ids)}).targets

    assert compression_plan(ExportSpec(compression="w8a8"), targets("iphone-15-pro"))["scheme"] == "w8a8"
    plan = compression_plan(ExportSpec(compression={"scheme": "w8a8"}), targets("iphone-15-pro", "iphone-14-pro"))
    assert plan["scheme"] == "int8" and plan["requested"] == "w8a8" and "iphone-14-pro" in plan["refused"] and "A16" in plan["refused"]
    mixed = compression_plan(ExportSpec(compression={"scheme": "mixed", "bits": 4.5, "quality": "eval"}), [])
    assert mixed["scheme"] == "mixed" and mixed["bits"] == 4.5 and mixed["quality"] == "eval"


@pytest.mark.parametrize("bad, message", [({"scheme": "mixed"}, "compression.bits"), ({"scheme": "palettize", "bits": 5}, "compression.bits"),
                                          ({"scheme": "int8", "bits": 8}, "fixed width"), ({"scheme": "lut"}, "compression")])
def test_bad_compression_specs_are_one_line_recipe_errors(bad, message):
    from snapopt.errors import RecipeError
    from snapopt.recipe import validate_recipe

    with pytest.raises(RecipeError, match=message):
        validate_recipe({"name": "t", "model": "arch:tiny", "export": {"compression": bad}})
