"""The permutohedral lattice and boxloss.bilateral_filter (CPU kernels) against the
PyTorch lattice reference (exactly), Krähenbühl's original lattice (when
pydensecrf is installed) and the brute-force Gaussian (within the documented
tolerance)."""

from __future__ import annotations

import pytest
import torch

import boxloss
from boxloss.ops.lattice import LatticeTensors
from boxloss.reference.bilateral import (
    bilateral_filter_brute_force,
    lattice_filter_reference,
    original_lattice_filter,
    permutohedral_lattice_reference,
)
from dense_crf_inputs import natural_image, relative_error, value_and_grad

LATTICE = torch.ops.boxloss.permutohedral_lattice.default
FILTER = torch.ops.boxloss.lattice_filter.default


def test_compiled_ops_are_loaded():
    assert boxloss.extension_loaded(), boxloss.extension_error()


def _random_image(B, H, W, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(B, 3, H, W, generator=g, dtype=torch.float64) * 255).to(dtype)


# ----------------------------------------------------------------- the lattice itself


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "shape, sigma_xy, sigma_rgb",
    [
        ((1, 1, 1), 3.0, 15.0),
        ((2, 1, 9), 2.0, 10.0),
        ((1, 7, 1), 2.0, 10.0),
        ((3, 11, 13), 4.0, 15.0),
        ((2, 20, 24), 80.0, 15.0),
        ((1, 16, 16), 0.5, 2.0),
    ],
)
def test_lattice_equals_reference_exactly(dtype, shape, sigma_xy, sigma_rgb):
    B, H, W = shape
    image = _random_image(B, H, W, seed=H * W + B, dtype=dtype)
    ours = boxloss.permutohedral_lattice(image, sigma_xy, sigma_rgb).tensors
    ref = LatticeTensors(*permutohedral_lattice_reference(image, sigma_xy, sigma_rgb))
    assert ours.splat_weight.dtype == dtype
    # The same simplices, vertex numbers (first use in pixel order), weights and neighbours.
    assert torch.equal(ours.splat_index, ref.splat_index)
    assert torch.equal(ours.vertex_offsets, ref.vertex_offsets)
    assert torch.equal(ours.blur_neighbours, ref.blur_neighbours)
    torch.testing.assert_close(
        ours.splat_weight, ref.splat_weight, rtol=0, atol=1e-6 if dtype == torch.float32 else 1e-14
    )


def test_lattice_of_natural_image_is_sparse_and_weights_are_barycentric():
    image = natural_image(64, seed=2)
    lattice = boxloss.PermutohedralLattice(image, 30.0, 15.0)
    t = lattice.tensors
    assert lattice.num_vertices[0] < 64 * 64  # far fewer lattice points than pixels
    torch.testing.assert_close(t.splat_weight.sum(-1), torch.ones(1, 64 * 64, dtype=torch.float64))
    assert t.splat_weight.min() >= -1e-12
    assert int(t.splat_index.max()) < lattice.num_vertices[0]
    assert t.blur_neighbours.shape == (6, lattice.num_vertices[0], 2)
    assert int(t.blur_neighbours.min()) >= -1


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("C", [1, 3, 8, 21, 22, 40])
def test_filter_equals_reference(reverse, C):
    image = torch.cat([_random_image(1, 13, 17, seed=C), natural_image(17, seed=C)[..., :13, :]])
    values = torch.rand(2, C, 13, 17, dtype=torch.float64, generator=torch.Generator().manual_seed(C))
    lattice = boxloss.PermutohedralLattice(image, 4.0, 12.0)
    out = lattice.filter(values, reverse=reverse)
    ref = lattice_filter_reference(values, permutohedral_lattice_reference(image, 4.0, 12.0), reverse=reverse)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("C", [1, 3, 8, 16, 21, 40])
def test_filter_of_several_tiles_equals_reference(C, dtype):
    # 37 x 41 = 1517 pixels: whole 512-pixel tiles of the CPU kernel (planes
    # read and written in place) and a partial last one (staged), for every
    # row layout: short rows (1, 3 channels), fixed widths (8, 16, 24) and a
    # run-time width (40).  The reference filters the op's own lattice in
    # float64.
    image = natural_image(41, seed=C, dtype=dtype)[..., :37, :].contiguous()
    values = torch.rand(1, C, 37, 41, dtype=dtype, generator=torch.Generator().manual_seed(C))
    lattice = boxloss.PermutohedralLattice(image, 5.0, 12.0)
    tensors = lattice.tensors._replace(splat_weight=lattice.tensors.splat_weight.double())
    for reverse in (False, True):
        out = lattice.filter(values, reverse=reverse)
        ref = lattice_filter_reference(values.double(), tensors, reverse=reverse)
        if dtype == torch.float64:
            torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-12)
        else:
            assert relative_error(out.double(), ref) < 1e-6


def test_reverse_is_the_transpose():
    image = natural_image(20, seed=4)
    lattice = boxloss.PermutohedralLattice(image, 5.0, 15.0)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 5, 20, 20, dtype=torch.float64, generator=g)
    y = torch.rand(1, 5, 20, 20, dtype=torch.float64, generator=g)
    lhs = (lattice.filter(x) * y).sum()
    rhs = (x * lattice.filter(y, reverse=True)).sum()
    torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=0)
    # ... and the lattice is not symmetric, so the order matters.
    assert relative_error(lattice.filter(x), lattice.filter(x, reverse=True)) > 1e-4


def test_float32_filter_close_to_float64():
    image = natural_image(32, seed=5)
    values = torch.rand(1, 21, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    exact = boxloss.bilateral_filter(values, image, 6.0, 15.0)
    single = boxloss.bilateral_filter(values.float(), image.float(), 6.0, 15.0)
    assert single.dtype == torch.float32
    assert relative_error(single.double(), exact) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_values_run_in_float32(dtype):
    image = natural_image(24, seed=6, dtype=torch.float32)
    values = torch.rand(1, 4, 24, 24, generator=torch.Generator().manual_seed(2))
    out = boxloss.bilateral_filter(values.to(dtype), image, 6.0, 15.0)
    exact = boxloss.bilateral_filter(values.to(dtype).float(), image, 6.0, 15.0)
    assert out.dtype == dtype
    assert relative_error(out.float(), exact) <= 2 * torch.finfo(dtype).eps


# ----------------------------------------------------------------- against the original and the exact Gaussian


def _original_filter(values, image, sigma_xy, sigma_rgb):
    pytest.importorskip("pydensecrf")  # installed but broken fails, with the reason
    return original_lattice_filter(values, image, sigma_xy, sigma_rgb)


@pytest.mark.parametrize("sigma_xy, sigma_rgb", [(5.0, 15.0), (20.0, 30.0)])
def test_matches_kraehenbuehls_original_lattice(sigma_xy, sigma_rgb):
    image = natural_image(40, seed=7)
    values = torch.rand(3, 40, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) + 0.1
    original = _original_filter(values, image[0], sigma_xy, sigma_rgb)
    ours = boxloss.bilateral_filter(values[None].float(), image.float(), sigma_xy, sigma_rgb)[0].double()
    # The same lattice: identical up to float32 rounding (the original filters in float32 too).
    assert relative_error(ours, original) < 1e-5


def test_accuracy_against_brute_force_on_a_natural_image():
    # The documented accuracy (docs/lattice.md): the raw lattice output is a fairly
    # constant fraction (about 0.55-0.6) of the exact Gaussian sum; normalised
    # filters filter(v) / filter(1), which CRF inference uses, are within a few
    # percent.  The original lattice has exactly this accuracy (test above).
    image = natural_image(48, seed=1)
    values = torch.rand(1, 3, 48, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    ones = torch.ones(1, 1, 48, 48, dtype=torch.float64)
    x = torch.cat([values, ones], 1)
    lattice = boxloss.bilateral_filter(x, image, 10.0, 15.0)
    exact = bilateral_filter_brute_force(x, image, 10.0, 15.0)
    scale = float((lattice * exact).sum() / (exact * exact).sum())
    assert 0.5 < scale < 0.7
    assert relative_error(lattice / scale, exact) < 0.08
    normalised = lattice[:, :3] / lattice[:, 3:]
    assert relative_error(normalised, exact[:, :3] / exact[:, 3:]) < 0.02


# ----------------------------------------------------------------- autograd, opcheck, compile


def test_gradcheck_float64():
    image = natural_image(7, seed=8)[..., :6, :]
    values = torch.rand(1, 3, 6, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: boxloss.bilateral_filter(v, image, 2.0, 20.0), (values,))
    lattice = boxloss.PermutohedralLattice(torch.cat([image, image.flip(2)]), 2.0, 20.0)
    v2 = torch.rand(2, 2, 6, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: lattice.filter(v, reverse=True), (v2,))
    # The filter is linear, so its backward is differentiable too.
    assert torch.autograd.gradgradcheck(lambda v: lattice.filter(v), (v2,))


def test_image_gets_no_gradient():
    image = natural_image(8, seed=9).requires_grad_()
    values = torch.rand(1, 2, 8, 8, dtype=torch.float64, requires_grad=True)
    boxloss.bilateral_filter(values, image, 3.0, 15.0).sum().backward()
    assert image.grad is None and values.grad is not None


def _lattice_args(B=2, H=5, W=6, seed=0):
    image = _random_image(B, H, W, seed)
    return image, LATTICE(image, 3.0, 20.0)


def test_opcheck_lattice():
    image = _random_image(2, 5, 6, seed=1)
    torch.library.opcheck(LATTICE, (image, 3.0, 20.0))
    torch.library.opcheck(LATTICE, (image.float(), 1.5, 7.0))


@pytest.mark.parametrize("reverse", [False, True])
def test_opcheck_filter(reverse):
    image, lattice = _lattice_args()
    values = torch.rand(2, 3, 5, 6, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(FILTER, (values, *lattice, reverse))


def test_torch_compile_fullgraph_matches_eager():
    image = natural_image(16, seed=10, dtype=torch.float32)

    def step(v, im):
        return boxloss.bilateral_filter(v, im, 4.0, 15.0).square().mean()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    v_eager = torch.rand(1, 3, 16, 16, requires_grad=True)
    v_compiled = v_eager.detach().clone().requires_grad_()
    eager = step(v_eager, image)
    result = compiled(v_compiled, image)
    eager.backward()
    result.backward()
    torch.testing.assert_close(result, eager)
    torch.testing.assert_close(v_compiled.grad, v_eager.grad)


def test_module_matches_function_and_repr():
    image = natural_image(12, seed=11)
    values = torch.rand(1, 2, 12, 12, dtype=torch.float64)
    module = boxloss.BilateralFilter(sigma_xy=3.0, sigma_rgb=20.0)
    torch.testing.assert_close(module(values, image), boxloss.bilateral_filter(values, image, 3.0, 20.0))
    assert "sigma_xy=3.0" in repr(module)
    assert "PermutohedralLattice(shape=(1, 12, 12)" in repr(boxloss.PermutohedralLattice(image, 3.0, 20.0))


# ----------------------------------------------------------------- layouts, threads, determinism


def test_non_contiguous_inputs():
    image = natural_image(18, seed=12)
    values = torch.rand(2, 4, 18, 18, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    images = torch.cat([image, image.flip(3)])
    expected = boxloss.bilateral_filter(values, images, 5.0, 15.0)
    cl = boxloss.bilateral_filter(
        values.to(memory_format=torch.channels_last), images.to(memory_format=torch.channels_last), 5.0, 15.0
    )
    torch.testing.assert_close(cl, expected, rtol=0, atol=0)
    big = torch.zeros(2, 8, 18, 18, dtype=torch.float64)
    big[:, ::2] = values
    strided = boxloss.bilateral_filter(big[:, ::2], images.transpose(2, 3).contiguous().transpose(2, 3), 5.0, 15.0)
    torch.testing.assert_close(strided, expected, rtol=0, atol=0)


def test_deterministic_and_thread_independent():
    images = torch.cat([natural_image(40, seed=s, dtype=torch.float32) for s in (13, 14, 15)])
    values = torch.rand(3, 21, 40, 40, generator=torch.Generator().manual_seed(6))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = boxloss.bilateral_filter(values, images, 6.0, 15.0)
        single_one = boxloss.bilateral_filter(values[:1], images[:1], 6.0, 15.0)
        torch.set_num_threads(max(2, threads))
        many = boxloss.bilateral_filter(values, images, 6.0, 15.0)  # parallel over images
        one = boxloss.bilateral_filter(values[:1], images[:1], 6.0, 15.0)  # parallel within the image
    finally:
        torch.set_num_threads(threads)
    again = boxloss.bilateral_filter(values, images, 6.0, 15.0)
    assert torch.equal(single, many) and torch.equal(single, again)
    assert torch.equal(one, single_one) and torch.equal(one, single[:1])


def test_large_image_parallel_paths_agree():
    # Big enough for the blur and slice to be parallel within the image.
    image = natural_image(200, seed=16, dtype=torch.float32)
    values = torch.rand(1, 24, 200, 200, generator=torch.Generator().manual_seed(7))
    lattice = boxloss.PermutohedralLattice(image, 3.0, 5.0)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = lattice.filter(values)
        torch.set_num_threads(max(2, threads))
        parallel = lattice.filter(values)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single, parallel)


# ----------------------------------------------------------------- bad input


def _good_filter_args():
    image = _random_image(2, 5, 6, seed=2)
    values = torch.rand(2, 3, 5, 6, dtype=torch.float64)
    return dict(values=values, image=image, sigma_xy=3.0, sigma_rgb=15.0)


BAD_FILTER_INPUTS = {
    "image 1 channel": (lambda g: dict(g, image=g["image"][:, :1]), ValueError, "3 \\(RGB\\) channels"),
    "image 4 channels": (
        lambda g: dict(g, image=torch.cat([g["image"], g["image"][:, :1]], 1)),
        ValueError,
        "3 \\(RGB\\) channels",
    ),
    "image 3-D": (lambda g: dict(g, image=g["image"][0]), ValueError, "image must have shape"),
    "image int": (lambda g: dict(g, image=g["image"].long()), TypeError, "image must be float"),
    "image nan": (
        lambda g: dict(
            g, image=g["image"].index_put((torch.tensor([1]),), torch.tensor(float("nan"), dtype=torch.float64))
        ),
        ValueError,
        "image must be finite, but it contains NaN or Inf in batch element\\(s\\) \\[1\\]",
    ),
    "image inf": (
        lambda g: dict(g, image=torch.where(g["image"] > 250, float("inf"), g["image"])),
        ValueError,
        "image must be finite",
    ),
    "values nan": (
        lambda g: dict(
            g, values=g["values"].index_put((torch.tensor([0]),), torch.tensor(float("nan"), dtype=torch.float64))
        ),
        ValueError,
        "values must be finite",
    ),
    "values inf": (
        lambda g: dict(g, values=torch.where(g["values"] > 0.9, float("inf"), g["values"])),
        ValueError,
        "values must be finite",
    ),
    "values 3-D": (lambda g: dict(g, values=g["values"][0]), ValueError, "values must have shape"),
    "values int": (lambda g: dict(g, values=g["values"].long()), TypeError, "values must be float"),
    "size mismatch": (lambda g: dict(g, image=g["image"][..., :4]), ValueError, "image must match values"),
    "batch mismatch": (lambda g: dict(g, image=g["image"][:1]), ValueError, "image must match values"),
    "sigma_xy zero": (lambda g: dict(g, sigma_xy=0.0), ValueError, "sigma_xy must be a positive finite number"),
    "sigma_xy negative": (lambda g: dict(g, sigma_xy=-2.0), ValueError, "sigma_xy"),
    "sigma_rgb zero": (lambda g: dict(g, sigma_rgb=0.0), ValueError, "sigma_rgb must be a positive finite number"),
    "sigma_rgb nan": (lambda g: dict(g, sigma_rgb=float("nan")), ValueError, "sigma_rgb"),
    "sigma_rgb inf": (lambda g: dict(g, sigma_rgb=float("inf")), ValueError, "sigma_rgb"),
    "sigma string": (lambda g: dict(g, sigma_xy="3"), TypeError, "sigma_xy must be a number"),
    "sigma far too small": (lambda g: dict(g, sigma_rgb=1e-6), ValueError, "exceed the lattice's range"),
}


@pytest.mark.parametrize("case", list(BAD_FILTER_INPUTS), ids=list(BAD_FILTER_INPUTS))
def test_bad_filter_input_raises_clear_error(case):
    build, error, message = BAD_FILTER_INPUTS[case]
    kwargs = build(_good_filter_args())
    with pytest.raises(error, match=message):
        boxloss.bilateral_filter(**kwargs)


def test_lattice_filter_rejects_mismatched_values():
    image = _random_image(2, 5, 6, seed=3)
    lattice = boxloss.PermutohedralLattice(image, 3.0, 15.0)
    with pytest.raises(ValueError, match="values must have shape"):
        lattice.filter(torch.rand(2, 3, 5, 5, dtype=torch.float64))
    with pytest.raises(TypeError, match="float64 lattice"):
        lattice.filter(torch.rand(2, 3, 5, 6))


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda t: (t[0].clone().fill_(10**6), *t[1:]), "vertex numbers outside its image's range"),
        (lambda t: (t[0].clone().fill_(-1), *t[1:]), "vertex numbers outside its image's range"),
        (lambda t: (t[0], t[1], t[2].clone().fill_(-7), t[3]), "vertex numbers outside its image's range"),
        (lambda t: (t[0], t[1], t[2], t[3].flip(0)), "vertex_offsets must rise"),
        (lambda t: (t[0].long(), *t[1:]), "splat_index must be an int32"),
        (lambda t: (t[0], t[1].float(), *t[2:]), "splat_weight must be"),
        (lambda t: (t[0][:, :-1], *t[1:]), "splat_index must have shape"),
        (lambda t: (t[0], t[1], t[2][:5], t[3]), "blur_neighbours must have shape"),
        (lambda t: (t[0], t[1], t[2], t[3][:-1]), "vertex_offsets must have shape"),
    ],
)
def test_raw_filter_rejects_corrupt_lattice_without_crashing(corrupt, message):
    # torch.ops.boxloss.* skip the Python checks: the kernels must still raise,
    # never read out of bounds.
    image, lattice = _lattice_args(seed=4)
    values = torch.rand(2, 3, 5, 6, dtype=torch.float64)
    with pytest.raises((ValueError, TypeError), match=message):
        FILTER(values, *corrupt(tuple(lattice)), False)


def test_raw_lattice_rejects_bad_image():
    with pytest.raises(ValueError, match="3 \\(RGB\\) channels"):
        LATTICE(torch.rand(1, 4, 3, 3), 1.0, 1.0)
    with pytest.raises(ValueError, match="sigma_xy"):
        LATTICE(torch.rand(1, 3, 3, 3), -1.0, 1.0)
    with pytest.raises(ValueError, match="non-empty"):
        LATTICE(torch.rand(1, 3, 0, 3), 1.0, 1.0)
    with pytest.raises(TypeError, match="image must be float"):
        LATTICE(torch.ones(1, 3, 3, 3, dtype=torch.int32), 1.0, 1.0)


def test_empty_channels_and_single_pixel():
    image = _random_image(1, 1, 1, seed=5)
    assert boxloss.bilateral_filter(torch.rand(1, 0, 1, 1, dtype=torch.float64), image, 1.0, 1.0).shape == (1, 0, 1, 1)
    v = torch.rand(1, 2, 1, 1, dtype=torch.float64)
    # A lone pixel sits inside its simplex; it keeps its own contribution only.
    out = boxloss.bilateral_filter(v, image, 1.0, 1.0)
    ref = lattice_filter_reference(v, permutohedral_lattice_reference(image, 1.0, 1.0))
    torch.testing.assert_close(out, ref)
    assert torch.all(out > 0) and torch.all(out <= v)


def test_value_and_grad_helper_on_filter():
    image = natural_image(6, seed=17)
    values = torch.rand(1, 2, 6, 6, dtype=torch.float64)
    out, grad = value_and_grad(lambda v: boxloss.bilateral_filter(v, image, 2.0, 10.0), values)
    # d sum(L v) / dv = L^T 1
    lattice = boxloss.PermutohedralLattice(image, 2.0, 10.0)
    torch.testing.assert_close(grad, lattice.filter(torch.ones_like(values), reverse=True))
