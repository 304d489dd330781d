"""Color fix: parity with the official `scripts/wavelet_color_fix.py` (case c6) and basic properties.

Parity tolerance: 1e-4 relative to max|reference| (+1e-5 absolute), the `assert_close_rel` default. In practice the
results are bit-identical on CPU float32.
"""

import pytest
import torch
from conftest import assert_close_rel

from stablesr.color import COLOR_FIX_METHODS, adain_color_fix, color_fix, wavelet_color_fix


@pytest.mark.parametrize("variant", ["rand", "photo"])
@pytest.mark.parametrize("method", ["wavelet", "adain"])
def test_matches_official_vectors(tiny_cases, variant, method):
    content = tiny_cases[f"c6.{variant}_content"]
    style = tiny_cases[f"c6.{variant}_style"]
    expected = tiny_cases[f"c6.{variant}_{method}"]
    rel = assert_close_rel(color_fix(content, style, method), expected, name=f"c6.{variant}_{method}")
    assert rel <= 1e-4


def test_batch_matches_per_image(tiny_cases):
    content = torch.cat([tiny_cases["c6.rand_content"], tiny_cases["c6.rand_style"]])
    style = torch.cat([tiny_cases["c6.rand_style"], tiny_cases["c6.rand_content"]])
    for fix in (wavelet_color_fix, adain_color_fix):
        batched = fix(content, style)
        for i in range(2):
            torch.testing.assert_close(batched[i : i + 1], fix(content[i : i + 1], style[i : i + 1]))


@pytest.mark.parametrize("channels", [1, 3, 4])
@pytest.mark.parametrize("method", ["wavelet", "adain"])
def test_any_channel_count(channels, method):
    g = torch.Generator().manual_seed(0)
    content = torch.rand(2, channels, 20, 24, generator=g) * 2 - 1
    reference = torch.rand(2, channels, 20, 24, generator=g) * 2 - 1
    out = color_fix(content, reference, method)
    assert out.shape == content.shape
    assert torch.isfinite(out).all()


def test_wavelet_channels_are_independent():
    # The 4-channel (RGBA) result must equal the 3-channel one on the RGB part: the blur is depthwise.
    g = torch.Generator().manual_seed(1)
    content = torch.rand(1, 4, 32, 32, generator=g) * 2 - 1
    reference = torch.rand(1, 4, 32, 32, generator=g) * 2 - 1
    torch.testing.assert_close(
        wavelet_color_fix(content, reference)[:, :3], wavelet_color_fix(content[:, :3], reference[:, :3])
    )


def test_wavelet_of_identical_images_is_identity():
    g = torch.Generator().manual_seed(2)
    image = torch.rand(1, 3, 40, 36, generator=g) * 2 - 1
    torch.testing.assert_close(wavelet_color_fix(image, image), image, rtol=0, atol=1e-5)


def test_none_is_identity():
    content = torch.rand(1, 3, 8, 8)
    assert color_fix(content, torch.rand(1, 3, 4, 4), "none") is content


def test_adain_matches_reference_statistics():
    g = torch.Generator().manual_seed(3)
    content = torch.rand(2, 3, 16, 16, generator=g) * 0.5 - 0.2
    reference = torch.rand(2, 3, 16, 16, generator=g) * 1.6 - 0.9
    out = adain_color_fix(content, reference)
    torch.testing.assert_close(out.mean(dim=(2, 3)), reference.mean(dim=(2, 3)), rtol=0, atol=1e-5)
    torch.testing.assert_close(out.std(dim=(2, 3)), reference.std(dim=(2, 3)), rtol=1e-3, atol=1e-5)


def test_reference_is_resized_bicubically():
    g = torch.Generator().manual_seed(4)
    content = torch.rand(1, 3, 32, 48, generator=g) * 2 - 1
    small = torch.rand(1, 3, 8, 12, generator=g) * 2 - 1
    upsampled = torch.nn.functional.interpolate(small, size=(32, 48), mode="bicubic", align_corners=False)
    for method in ("wavelet", "adain"):
        torch.testing.assert_close(color_fix(content, small, method), color_fix(content, upsampled, method))


def test_reference_batch_of_one_broadcasts():
    g = torch.Generator().manual_seed(5)
    content = torch.rand(3, 3, 16, 16, generator=g) * 2 - 1
    reference = torch.rand(1, 3, 16, 16, generator=g) * 2 - 1
    torch.testing.assert_close(
        wavelet_color_fix(content, reference), wavelet_color_fix(content, reference.expand(3, -1, -1, -1))
    )


@pytest.mark.parametrize("method", ["wavelet", "adain", "none"])
def test_keeps_content_dtype(method):
    content = (torch.rand(1, 3, 16, 16) * 2 - 1).to(torch.bfloat16)
    reference = torch.rand(1, 3, 16, 16) * 2 - 1
    assert color_fix(content, reference, method).dtype == torch.bfloat16


def test_invalid_arguments():
    content = torch.rand(1, 3, 8, 8)
    with pytest.raises(ValueError, match="wavelet"):
        color_fix(content, content, "histogram")
    assert set(COLOR_FIX_METHODS) == {"wavelet", "adain", "none"}
    with pytest.raises(ValueError, match="channels"):
        wavelet_color_fix(content, torch.rand(1, 4, 8, 8))
    with pytest.raises(ValueError, match="batch"):
        wavelet_color_fix(torch.rand(2, 3, 8, 8), torch.rand(3, 3, 8, 8))
    with pytest.raises(ValueError, match="4-D"):
        adain_color_fix(content[0], content[0])
    with pytest.raises(ValueError, match="2 pixels"):
        adain_color_fix(torch.rand(1, 3, 1, 1), torch.rand(1, 3, 1, 1))


@pytest.mark.parametrize("strip_rows", [1, 31, 64, 250])
def test_wavelet_strips_equal_one_pass(tiny_cases, strip_rows):
    """Row strips with the transform's 31-row reach as margin give the one-pass result bit for bit (a 30-row margin
    measurably does not: 8.9e-4 here), including the official vectors' photo case."""
    gen = torch.Generator().manual_seed(0)
    content = torch.rand(2, 3, 300, 77, generator=gen) * 2 - 1
    reference = torch.rand(1, 3, 75, 19, generator=gen) * 2 - 1  # resized bicubically, batch broadcast
    one_pass = wavelet_color_fix(content, reference, strip_rows=10**6)
    assert torch.equal(wavelet_color_fix(content, reference, strip_rows=strip_rows), one_pass)
    photo = wavelet_color_fix(tiny_cases["c6.photo_content"], tiny_cases["c6.photo_style"], strip_rows=strip_rows)
    assert torch.equal(photo, wavelet_color_fix(tiny_cases["c6.photo_content"], tiny_cases["c6.photo_style"]))
    assert_close_rel(photo, tiny_cases["c6.photo_wavelet"], name="c6.photo_wavelet (row strips)")
    with pytest.raises(ValueError, match="strip_rows"):
        wavelet_color_fix(content, reference, strip_rows=0)


def test_wavelet_strips_by_default_on_large_images(monkeypatch):
    """Above 4 MP the default switches to ~1 MP strips (here: lowered thresholds) and still equals one pass."""
    import stablesr.color as color

    monkeypatch.setattr(color, "_WAVELET_SINGLE_PASS_PIXELS", 5000)
    monkeypatch.setattr(color, "_WAVELET_STRIP_PIXELS", 64 * 100)
    gen = torch.Generator().manual_seed(1)
    content, reference = torch.rand(1, 3, 400, 100, generator=gen), torch.rand(1, 3, 400, 100, generator=gen)
    calls = []
    decomposition = color._wavelet_decomposition
    monkeypatch.setattr(color, "_wavelet_decomposition", lambda x: calls.append(x.shape[-2]) or decomposition(x))
    out = color.wavelet_color_fix(content, reference)
    assert len(calls) == 2 * 7 and max(calls) == 64 + 2 * 31  # 7 strips of 64 rows, content and reference each
    assert torch.equal(out, color.wavelet_color_fix(content, reference, strip_rows=10**6))
