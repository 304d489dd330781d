"""Folder datasets and tar shards decode through stablesr.image_io, and pad through image_processor.pad_to.

The same file must give the same pixels whether it is read from a folder or from a shard member: 16-bit PNGs
(scaled, not clipped), CMYK JPEGs with an ICC profile (colour-managed) and EXIF-rotated JPEGs (upright).
"""

import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from stablesr.data import HQImageDataset, TarShardDataset
from stablesr.data.common import BadSampleError, decode_image, read_image
from stablesr.image_io import ImageLoadError, decode_image_bytes, load_image

SIZE = 48


def _photo() -> np.ndarray:
    import skimage.data

    return np.asarray(Image.fromarray(skimage.data.astronaut()).resize((SIZE, SIZE), Image.BICUBIC))


@pytest.fixture(scope="module")
def tricky(tmp_path_factory):
    """Square files (so a SIZE crop is the whole image) whose naive decoding differs from image_io's."""
    from test_image_io import _cmyk_icc

    folder = tmp_path_factory.mktemp("tricky")
    ramp = np.linspace(0, 65535, SIZE * SIZE).reshape(SIZE, SIZE).astype(np.uint16)
    Image.fromarray(ramp).save(folder / "gray16.png")  # I;16: a plain convert("RGB") clips it to white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(_photo()).save(folder / "rotated.jpg", quality=95, exif=exif)
    Image.fromarray(_photo()).convert("CMYK").save(folder / "cmyk_icc.jpg", quality=95, icc_profile=_cmyk_icc())
    return folder


def _shard(folder, path):
    """A shard of one HQ sample per file, in sorted order."""
    with tarfile.open(path, "w") as tar:
        for n, file in enumerate(sorted(folder.iterdir())):
            data = file.read_bytes()
            info = tarfile.TarInfo(f"{n:06d}{file.suffix}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_decode_image_bytes_matches_load_image(tricky):
    for path in sorted(tricky.iterdir()):
        from_file, from_bytes = load_image(path), decode_image_bytes(path.read_bytes(), path.name)
        assert np.array_equal(np.asarray(from_file.rgb), np.asarray(from_bytes.rgb)), path.name
        for field in ("mode", "icc_profile", "exif", "bit_depth", "format"):
            assert getattr(from_file, field) == getattr(from_bytes, field), (path.name, field)
        assert torch.equal(read_image(path), decode_image(path.read_bytes(), path.name))
    gray = np.asarray(load_image(tricky / "gray16.png").rgb)
    assert gray.min() == 0 and gray.max() == 255  # scaled, not clipped
    assert load_image(tricky / "rotated.jpg").exif is not None


def test_folder_and_shard_give_identical_items(tricky, tmp_path):
    folder = HQImageDataset(tricky, gt_size=SIZE, use_hflip=False)
    shard = TarShardDataset(str(_shard(tricky, tmp_path / "s-000000.tar")), gt_size=SIZE, use_hflip=False,
                            shuffle_buffer=0)
    from_folder = [folder[i]["gt"] for i in range(len(folder))]
    from_shard = [item["gt"] for item in shard]
    assert len(from_folder) == len(from_shard) == 3
    for path, a, b in zip(folder.paths, from_folder, from_shard, strict=True):
        assert torch.equal(a, b), path.name
        expected = torch.from_numpy(np.array(load_image(path).rgb)).permute(2, 0, 1).float() / 255
        assert torch.equal(a, expected), path.name


def test_bad_member_names_itself():
    with pytest.raises(BadSampleError, match=r"000007\.gt\.png.*not an image|000007\.gt\.png.*corrupt"):
        decode_image(b"definitely not a PNG", "000007.gt.png")
    with pytest.raises(ImageLoadError, match="empty"):
        decode_image_bytes(b"", "x.png")


@pytest.mark.parametrize("height, width", [(5, 7), (20, 9), (2, 3)])
def test_small_images_are_reflect_padded_as_before(tmp_path, height, width):
    """pad_to equals numpy's "reflect" (cv2.BORDER_REFLECT_101), including reflections repeated past the image."""
    arr = np.random.default_rng(height * width).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "small.png")
    item = HQImageDataset(tmp_path, gt_size=32, use_hflip=False)[0]["gt"]
    expected = np.pad(arr, ((0, 32 - height), (0, 32 - width), (0, 0)), mode="reflect")
    assert torch.equal(item, torch.from_numpy(expected).permute(2, 0, 1).float() / 255)
