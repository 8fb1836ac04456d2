"""Masked-region preservation: PSNR against a direct numpy PSNR of the unmasked pixels,
SSIM against an SSIM map written here with scipy (Gaussian σ=1.5 window, mirrored
borders as torchmetrics pads), the mask conventions, the cap on identical pixels."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from pytest_diffeval.generation import ImageSet
from pytest_diffeval.metrics import compute_metric

SIZE = 24


def as_set(images: np.ndarray) -> ImageSet:
    return ImageSet(images=images, prompts=[f"p{i}" for i in range(len(images))], seeds=[0] * len(images))


@pytest.fixture
def case() -> dict[str, np.ndarray]:
    """Source images, masks (a different box per image) and edits that change the inside of
    the mask completely and the outside by noise of growing strength."""
    rng = np.random.default_rng(0)
    source = (rng.random((4, SIZE, SIZE, 3)) * 255).astype(np.uint8)
    masks = np.zeros((4, SIZE, SIZE), dtype=bool)
    for i in range(4):
        masks[i, 2 + i : 12 + i, 4 : 16 + i] = True
    noise = rng.normal(size=source.shape) * np.array([2, 5, 10, 20])[:, None, None, None]
    edited = np.clip(source + noise, 0, 255).astype(np.uint8)
    edited[masks] = rng.integers(0, 256, size=(int(masks.sum()), 3), dtype=np.uint8)
    return {"source": source, "masks": masks, "edited": edited}


def numpy_psnr(edited: np.ndarray, source: np.ndarray, mask: np.ndarray) -> float:
    keep = ~mask
    mse = np.mean((edited[keep].astype(np.float64) - source[keep].astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / mse))


def scipy_ssim_map(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """SSIM map (Wang et al. 2004) of HWC images, channel mean; Gaussian σ=1.5 truncated at
    radius 5 (torchmetrics' 11 taps), mirrored borders, data range 255."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    blur = lambda a: gaussian_filter(a, sigma=(1.5, 1.5, 0), truncate=3.5, mode="mirror")  # noqa: E731
    mu_x, mu_y = blur(x), blur(y)
    var_x = np.maximum(blur(x * x) - mu_x**2, 0)
    var_y = np.maximum(blur(y * y) - mu_y**2, 0)
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    ssim = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim.mean(axis=-1)


def test_psnr_is_the_psnr_of_the_unmasked_pixels(case: dict[str, np.ndarray]) -> None:
    result = compute_metric("preservation_psnr", as_set(case["edited"]), source_images=case["source"], masks=case["masks"])
    expected = [numpy_psnr(case["edited"][i], case["source"][i], case["masks"][i]) for i in range(4)]
    # torchmetrics takes log(data_range) in float32: agreement to ~1e-7 relative
    np.testing.assert_allclose(result.per_sample, expected, rtol=1e-6)
    assert list(np.argsort(-result.per_sample)) == [0, 1, 2, 3]  # more noise outside, lower PSNR
    assert result.value == pytest.approx(np.mean(expected)) and result.higher_is_better


def test_ssim_is_the_ssim_map_of_the_source_filled_edit_over_the_unmasked_pixels(case: dict[str, np.ndarray]) -> None:
    result = compute_metric("preservation_ssim", as_set(case["edited"]), source_images=case["source"], masks=case["masks"])
    expected = []
    for edited, source, mask in zip(case["edited"], case["source"], case["masks"]):
        filled = np.where(mask[..., None], source, edited)
        expected.append(scipy_ssim_map(filled, source)[~mask].mean())
    np.testing.assert_allclose(result.per_sample, expected, rtol=1e-6)  # the metric runs in float32
    assert list(np.argsort(-result.per_sample)) == [0, 1, 2, 3]
    assert 0 < result.per_sample.min() < result.per_sample.max() < 1


def test_only_the_outside_of_the_mask_counts_and_identical_pixels_are_capped(case: dict[str, np.ndarray]) -> None:
    rng = np.random.default_rng(1)
    other = case["edited"].copy()
    other[case["masks"]] = rng.integers(0, 256, size=(int(case["masks"].sum()), 3), dtype=np.uint8)
    for metric in ("preservation_psnr", "preservation_ssim"):
        first = compute_metric(metric, as_set(case["edited"]), source_images=case["source"], masks=case["masks"])
        second = compute_metric(metric, as_set(other), source_images=case["source"], masks=case["masks"])
        np.testing.assert_array_equal(first.per_sample, second.per_sample)
    inpainted = np.where(case["masks"][..., None], case["edited"], case["source"])  # untouched outside the mask
    psnr = compute_metric("preservation_psnr", as_set(inpainted), source_images=case["source"], masks=case["masks"])
    assert list(psnr.per_sample) == [100.0] * 4 and psnr.details["capped"] == 4
    assert compute_metric("preservation_psnr", as_set(inpainted), source_images=case["source"], masks=case["masks"],
                          max_psnr=60.0).value == 60.0
    ssim = compute_metric("preservation_ssim", as_set(inpainted), source_images=case["source"], masks=case["masks"])
    np.testing.assert_allclose(ssim.per_sample, 1.0, atol=1e-12)


def test_mask_formats_agree(case: dict[str, np.ndarray]) -> None:
    images, source, masks = as_set(case["edited"]), case["source"], case["masks"]
    reference = compute_metric("preservation_psnr", images, source_images=source, masks=masks).per_sample
    white = masks.astype(np.uint8) * 255
    formats = {
        "uint8 0/255": white,
        "uint8 0/1": masks.astype(np.uint8),
        "(N, H, W, 1)": white[..., None],
        "RGB ImageSet": as_set(np.repeat(white[..., None], 3, axis=-1)),
        "list": list(masks),
    }
    for name, value in formats.items():
        got = compute_metric("preservation_psnr", images, source_images=source, masks=value).per_sample
        np.testing.assert_array_equal(got, reference, err_msg=name)
    one_mask = compute_metric("preservation_psnr", images, source_images=source, masks=white[0]).per_sample
    expected = [numpy_psnr(case["edited"][i], source[i], masks[0]) for i in range(4)]
    np.testing.assert_allclose(one_mask, expected, rtol=1e-6)


def test_bad_masks_and_sources_are_refused(case: dict[str, np.ndarray]) -> None:
    images, source, masks = as_set(case["edited"]), case["source"], case["masks"]
    with pytest.raises(ValueError, match="needs masks="):
        compute_metric("preservation_psnr", images, source_images=source)
    with pytest.raises(ValueError, match="masks must be uint8 .* or bool, got float64"):
        compute_metric("preservation_ssim", images, source_images=source, masks=masks.astype(float))
    with pytest.raises(ValueError, match="do not match the 24x24 images"):
        compute_metric("preservation_psnr", images, source_images=source, masks=masks[:, :10])
    full = masks.copy()
    full[2] = True
    with pytest.raises(ValueError, match="the mask of sample 2 covers the whole image"):
        compute_metric("preservation_psnr", images, source_images=source, masks=full)
    with pytest.raises(ValueError, match="source_images are 12x12 but the images are 24x24"):
        compute_metric("preservation_ssim", images, source_images=source[:, :12, :12], masks=masks)
