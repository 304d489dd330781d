"""Training data: crops/flips, paired alignment, scale errors, bad-file skipping, tar shards and their splitting."""

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from stablesr.data import (
    HQImageDataset,
    MixedDataset,
    MixedIterableDataset,
    PairedImageDataset,
    TarShardDataset,
    build_dataset,
    collate_samples,
    expand_shard_urls,
)

REPO = Path(__file__).resolve().parents[1]
NAMES = ("astronaut", "chelsea", "coffee", "rocket")


def _photo(name: str, short_side: int = 96) -> Image.Image:
    import skimage.data

    img = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
    w, h = img.size
    s = short_side / min(w, h)
    # Sizes multiple of 4 so that the x4 LQ is exact.
    return img.resize((round(w * s) // 4 * 4, round(h * s) // 4 * 4), Image.BICUBIC)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """hq/ (4 photos), pair/{gt,lq} (LQ = 4x4 box average of the GT, so LQ pixels align with GT blocks)."""
    root = tmp_path_factory.mktemp("data")
    for sub in ("hq", "pair/gt", "pair/lq"):
        (root / sub).mkdir(parents=True)
    for name in NAMES:
        img = _photo(name)
        img.save(root / "hq" / f"{name}.png")
        img.save(root / "pair" / "gt" / f"{name}.png")
        img.reduce(4).save(root / "pair" / "lq" / f"{name}.png")
    return root


def test_hq_crops_flips_and_epoch_determinism(folders):
    ds = HQImageDataset(folders / "hq", gt_size=64, seed=3)
    assert len(ds) == 4
    item = ds[0]
    assert set(item) == {"gt"}
    assert item["gt"].shape == (3, 64, 64) and item["gt"].dtype == torch.float32
    assert 0.0 <= item["gt"].min() and item["gt"].max() <= 1.0
    # Same (seed, epoch, index) -> same crop; another epoch -> (almost surely) another crop.
    assert torch.equal(ds[1]["gt"], ds[1]["gt"])
    first = [ds[i]["gt"] for i in range(4)]
    ds.set_epoch(1)
    assert any(not torch.equal(a, ds[i]["gt"]) for i, a in enumerate(first))
    # Every crop is a (possibly flipped) window of the source image.
    src = torch.from_numpy(np.array(Image.open(ds.paths[0]))).permute(2, 0, 1).float() / 255
    for epoch in range(4):
        ds.set_epoch(epoch)
        crop = ds[0]["gt"]
        found = False
        for candidate in (crop, crop.flip(-1)):
            windows = src.unfold(1, 64, 1).unfold(2, 64, 1)  # (3, nh, nw, 64, 64)
            diff = (windows - candidate[:, None, None]).abs().amax(dim=(0, 3, 4))
            found |= bool((diff < 1e-6).any())
        assert found


def test_hq_small_images_pad_or_skip(folders, tmp_path):
    _photo("coffee", short_side=40).save(tmp_path / "small.png")
    padded = HQImageDataset(tmp_path, gt_size=64)
    assert padded[0]["gt"].shape == (3, 64, 64)
    _photo("coffee", short_side=96).save(tmp_path / "big.png")
    skipping = HQImageDataset(tmp_path, gt_size=64, small_images="skip")
    for i in range(len(skipping)):
        assert skipping[i]["gt"].shape == (3, 64, 64)
    assert skipping.num_bad_files == 1
    assert HQImageDataset(tmp_path, gt_size=64, min_pixels=96 * 96).num_bad_files == 0  # lazily validated


def test_face_mix_counts(folders, tmp_path):
    faces = tmp_path / "faces"
    faces.mkdir()
    for i in range(5):
        _photo("astronaut", 64).save(faces / f"{i:03d}.png")
    ds = HQImageDataset(folders / "hq", gt_size=64, face_roots=faces, num_face=3)
    assert len(ds) == 4 + 3
    assert [p.name for p in ds.paths[4:]] == ["000.png", "001.png", "002.png"]


def test_paired_crops_are_aligned(folders):
    ds = PairedImageDataset(folders / "pair" / "lq", folders / "pair" / "gt", gt_size=64, scale=4, seed=1)
    assert len(ds) == 4
    for epoch in range(3):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            item = ds[i]
            assert item["lq"].shape == (3, 16, 16) and item["gt"].shape == (3, 64, 64)
            # The LQ crop equals the 4x4 box average of the GT crop (up to 8-bit rounding of the saved LQ).
            expected = F.avg_pool2d(item["gt"][None], 4)[0]
            assert (item["lq"] - expected).abs().max() <= 1 / 255 + 1e-6


def test_paired_scale_mismatch_names_the_file(folders, tmp_path):
    (tmp_path / "gt").mkdir()
    (tmp_path / "lq").mkdir()
    _photo("rocket").save(tmp_path / "gt" / "rocket.png")
    _photo("rocket").reduce(2).save(tmp_path / "lq" / "rocket.png")  # x2, declared x4
    ds = PairedImageDataset(tmp_path / "lq", tmp_path / "gt", gt_size=64, scale=4)
    with pytest.raises(ValueError, match=r"rocket\.png.*scale=4|scale mismatch.*rocket\.png"):
        ds[0]


def test_paired_needs_matching_stems(tmp_path):
    (tmp_path / "gt").mkdir()
    (tmp_path / "lq").mkdir()
    _photo("rocket").save(tmp_path / "gt" / "a.png")
    _photo("rocket").reduce(4).save(tmp_path / "lq" / "b.png")
    with pytest.raises(ValueError, match="no LQ/GT pairs"):
        PairedImageDataset(tmp_path / "lq", tmp_path / "gt", gt_size=64)


def test_corrupt_file_is_skipped_with_one_warning(folders, tmp_path, caplog):
    for name in NAMES[:2]:
        (tmp_path / f"{name}.png").write_bytes((folders / "hq" / f"{name}.png").read_bytes())
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
    ds = HQImageDataset(tmp_path, gt_size=64)
    bad = [i for i, p in enumerate(ds.paths) if p.name == "broken.png"][0]
    with caplog.at_level(logging.WARNING, logger="stablesr.data"):
        for epoch in range(3):
            ds.set_epoch(epoch)
            for i in range(len(ds)):
                assert ds[i]["gt"].shape == (3, 64, 64)
    warnings = [r for r in caplog.records if "broken.png" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
    assert ds.num_bad_files == 1
    assert "1 bad file(s) of 3, 3 sample(s) replaced" in ds.skip_summary()
    # The substitute is another file's crop, not garbage.
    assert ds[bad]["gt"].std() > 0


def test_mixed_dataset_allocates_by_weight(folders):
    hq = HQImageDataset(folders / "hq", gt_size=64)
    paired = PairedImageDataset(folders / "pair" / "lq", folders / "pair" / "gt", gt_size=64)
    mix = MixedDataset([hq, paired], weights=[3, 1], length=12, seed=0)
    sources = [mix.locate(i)[0] for i in range(len(mix))]
    assert sources.count(0) == 9 and sources.count(1) == 3
    # A source drawn 9 times out of 4 files cycles through all of them.
    assert sorted({mix.locate(i)[1] for i in range(9)}) == [0, 1, 2, 3]
    batch = collate_samples([mix[0], mix[11]])
    assert batch["gt"].shape == (2, 3, 64, 64) and batch["lq"].shape == (2, 3, 16, 16)
    assert batch["has_lq"].tolist() == [False, True]
    assert torch.equal(batch["lq"][0], torch.zeros(3, 16, 16))


def test_build_dataset_from_config(folders, tmp_path):
    config = {
        "gt_size": 32,
        "sources": [
            {"type": "hq", "roots": str(folders / "hq"), "weight": 2},
            {"type": "paired", "lq_root": str(folders / "pair" / "lq"), "gt_root": str(folders / "pair" / "gt")},
        ],
    }
    ds = build_dataset(config, gt_size=64)
    assert isinstance(ds, MixedDataset) and len(ds) == 8
    assert ds[0]["gt"].shape == (3, 64, 64)
    with pytest.raises(ValueError, match=r"sources\[0\] \(hq\): unknown key\(s\) \['root'\]"):
        build_dataset({"sources": [{"type": "hq", "root": "x"}]})
    with pytest.raises(ValueError, match="type"):
        build_dataset({"sources": [{"type": "video"}]})


# ----------------------------------------------------------------------------------------------------------- shards


@pytest.fixture(scope="module")
def shards(folders, tmp_path_factory):
    """Paired shards made by the CLI: 4 samples, 1 per shard."""
    out = tmp_path_factory.mktemp("shards")
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "make_shards.py"), "--hq_dir", str(folders / "pair" / "gt"),
         "--lq_dir", str(folders / "pair" / "lq"), "--output_dir", str(out), "--samples_per_shard", "1", "--seed", "-1"],
        check=True, capture_output=True,
    )
    return out


def test_shard_round_trip(folders, shards):
    from stablesr.data import iter_tar_samples

    urls = expand_shard_urls(str(shards / "shard-{000000..000003}.tar"))
    assert [Path(u).name for u in urls] == [f"shard-{i:06d}.tar" for i in range(4)]
    keys, stored = [], {}
    for url in urls:
        for key, fields in iter_tar_samples(url):
            keys.append(key)
            stored[key] = fields
    assert len(keys) == 4 and all(set(f) == {"gt.png", "lq.png"} for f in stored.values())
    # Bytes are stored unchanged (sorted order with --seed -1).
    sources = sorted((folders / "pair" / "gt").iterdir())
    assert [stored[k]["gt.png"] for k in sorted(keys)] == [p.read_bytes() for p in sources]

    ds = TarShardDataset(str(shards / "*.tar"), gt_size=64, scale=4, shuffle_buffer=0)
    items = list(ds)
    assert len(items) == 4
    for item in items:
        assert item["lq"].shape == (3, 16, 16) and item["gt"].shape == (3, 64, 64)
        assert (item["lq"] - F.avg_pool2d(item["gt"][None], 4)[0]).abs().max() <= 1 / 255 + 1e-6


def _keys(ds, rank, world, workers=1, worker=None):
    """The GT bytes digests read by one (rank, worker) slot, via the dataset's own assignment."""
    from stablesr.data import iter_tar_samples

    out = []
    for w in [worker] if worker is not None else range(workers):
        shards, stride, offset = ds.assigned(rank, world, w, workers)
        for shard in shards:
            for n, (key, _) in enumerate(iter_tar_samples(shard)):
                if n % stride == offset:
                    out.append((Path(shard).name, key))
    return out


def test_shard_split_across_ranks_and_workers(shards, tmp_path):
    ds = TarShardDataset(str(shards / "*.tar"), gt_size=64, scale=4, shuffle_buffer=0)
    # 2 ranks x 2 workers = 4 slots, 4 shards: one shard each, disjoint, covering everything.
    slots = [_keys(ds, r, 2, 2, w) for r in range(2) for w in range(2)]
    assert all(len(s) == 1 for s in slots)
    assert len({k for s in slots for k in s}) == 4
    # 2 ranks x 4 workers = 8 slots > 4 shards: every slot reads all shards and keeps every 8th sample of each.
    many = TarShardDataset(str(shards / "*.tar"), gt_size=64, scale=4, shuffle_buffer=0)
    assert many.assigned(1, 2, 3, 4)[1:] == (8, 7)

    # Through real DataLoader workers: each rank gets a disjoint half, together all 4 samples.
    def digests(rank):
        ds = TarShardDataset(str(shards / "*.tar"), gt_size=64, scale=4, shuffle_buffer=0, use_hflip=False,
                             rank=rank, world_size=2)
        loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=2, collate_fn=collate_samples)
        return [round(float(b["gt"].sum()), 3) for b in loader]

    r0, r1 = digests(0), digests(1)
    assert len(r0) == len(r1) == 2
    assert len(set(r0) | set(r1)) == 4


def test_shard_resume_skips_without_changing_the_stream(shards):
    def stream(skip_batches):
        ds = TarShardDataset(str(shards / "*.tar"), gt_size=64, scale=4, shuffle_buffer=3, infinite=True, seed=5)
        ds.set_resume(skip_batches, batch_size=1)
        it = iter(ds)
        return [next(it)["gt"] for _ in range(6)]

    full = stream(0)
    resumed = stream(3)
    for a, b in zip(full[3:], resumed[:3], strict=True):
        assert torch.equal(a, b)
    # Infinite: the stream goes on past one pass of the 4 samples.
    assert len(full) == 6


def test_corrupt_shard_member_is_replaced(folders, tmp_path, caplog):
    import tarfile

    path = tmp_path / "bad-000000.tar"
    with tarfile.open(path, "w") as tar:
        for key, data in (("a", (folders / "hq" / "rocket.png").read_bytes()), ("b", b"garbage"),
                          ("c", (folders / "hq" / "coffee.png").read_bytes())):
            info = tarfile.TarInfo(f"{key}.png")
            info.size = len(data)
            tar.addfile(info, __import__("io").BytesIO(data))
    ds = TarShardDataset(str(path), gt_size=64, shuffle_buffer=0)
    with caplog.at_level(logging.WARNING, logger="stablesr.data"):
        items = list(ds)
    assert len(items) == 3  # the bad one is replaced, so resume arithmetic stays exact
    assert sum("bad sample b" in r.getMessage() for r in caplog.records) == 1
    assert ds.num_bad == 1 and "1 bad sample(s) replaced" in ds.skip_summary()


def test_mixed_iterable_interleaves(folders, shards):
    hq = HQImageDataset(folders / "hq", gt_size=64)
    sh = TarShardDataset(str(shards / "*.tar"), gt_size=64, scale=4, infinite=True, shuffle_buffer=0)
    mix = MixedIterableDataset([hq, sh], weights=[1, 1], seed=0)
    it = iter(mix)
    items = [next(it) for _ in range(20)]
    paired = sum("lq" in x for x in items)
    assert 3 <= paired <= 17
    ds = build_dataset({"sources": [{"type": "hq", "roots": str(folders / "hq")},
                                    {"type": "shards", "urls": str(shards / "*.tar"), "scale": 4}]}, gt_size=64)
    assert isinstance(ds, MixedIterableDataset)
