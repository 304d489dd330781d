"""Builds checkpoints in the official StableSR layout for tests and benchmarks (never committed).

The full-size key lists come from ``shared/reference/official-keys/*.tsv`` (every key and shape of the official
``state_dict``s); the values are random.
"""

import json
from pathlib import Path

import torch
from conftest import REPO_ROOT

OFFICIAL_KEYS_DIR = REPO_ROOT.parent / "shared" / "reference" / "official-keys"


def read_key_table(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """key -> (shape, dtype name) from an official-keys TSV."""
    table = {}
    lines = Path(path).read_text().splitlines()
    for line in lines[1:]:
        key, shape, dtype, _numel, _kind = line.split("\t")
        table[key] = (tuple(json.loads(shape)), dtype)
    return table


def random_state_dict(table, dtype=torch.float16, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, (shape, _) in table.items():
        # Small random values (fp16 keeps a 1.4B-parameter file at 2.8 GB, as a released fp16 file would be).
        out[key] = (torch.randn(shape, generator=gen) * 0.02).to(dtype)
    return out
