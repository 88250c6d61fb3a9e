"""One decoding path: the same image file gives the same tensor through every entry point (the training
loader's validation split, tokenizing, the tokenizer's FID evaluation and sample.py's edits)."""
import argparse

import numpy as np
import pytest
import torch
from PIL import Image

from movq.cli import sample as sample_tool
from movq.config import DataConfig
from movq.data.decode import crop_square, images_from_uint8, load_image
from movq.data.stream import build_dataloader
from movq.data.tokenize import iter_chunk, plan_inputs
from movq.evaluation.fid_sources import open_source

S = 16


def _odd_files(folder):
    """Images that need converting, of a size that needs cropping and resizing."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (21, 27, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (21, 27, 1), dtype=np.uint8)
    Image.fromarray(np.concatenate([rgb, alpha], axis=2), "RGBA").save(folder / "rgba.png")
    Image.fromarray(rgb[..., 0].astype(np.uint16) * 257 + 100).save(folder / "deep.png")  # I;16
    Image.fromarray(rgb).convert("P").save(folder / "palette.png")
    Image.fromarray(rgb).save(folder / "photo.jpg", quality=90)
    return sorted(p.name for p in folder.iterdir())


class _Encoder:
    """Stands in for the tokenizer in sample.py's edit: records what it is given."""

    downsample_factor = 4

    def encode(self, x):
        self.x = x
        return argparse.Namespace(indices=torch.zeros(1, 1, S // 4, S // 4, dtype=torch.long))


@pytest.mark.parametrize("name", ["rgba.png", "deep.png", "palette.png", "photo.jpg"])
def test_one_file_gives_one_tensor_everywhere(tmp_path, name):
    (tmp_path / "img").mkdir()
    _odd_files(tmp_path / "img")
    path = tmp_path / "img" / name
    expected = images_from_uint8(torch.from_numpy(load_image(path.read_bytes(), S)[0].copy())[None])

    # 1. training: the validation split of a folder (centre crop, no augmentation)
    cfg = DataConfig(source="folder", train=str(tmp_path / "img"), val=str(tmp_path / "img"), image_size=S,
                     batch_size=1, num_workers=0)
    by_key = {b["key"][0]: b["image"] for b in build_dataloader(cfg, "val")}
    assert torch.equal(by_key[name], expected)

    # 2. tokenizing: the chunk's bytes through the same crop
    plan = plan_inputs("folder", str(tmp_path / "img"), image_size=S)
    data = {key: raw for key, raw, _, _, _ in iter_chunk(plan, plan.chunks[0])}
    tokenized = images_from_uint8(torch.from_numpy(load_image(data[name.rpartition(".")[0]], S)[0].copy())[None])
    assert torch.equal(tokenized, expected)

    # 3. FID's tokenizer mode: the image source, then the validation crop
    source = open_source(tmp_path / "img")
    report = source.new_report()
    index = [p.name for p in source.paths].index(name)
    arr = list(source.iterate(report))[index]
    square, _ = crop_square(Image.fromarray(arr), S)
    assert torch.equal(images_from_uint8(torch.from_numpy(np.array(square))[None]), expected)

    # 4. sample.py --edit: the image it encodes
    encoder = _Encoder()
    args = argparse.Namespace(edit=str(path), box=(0.0, 0.0, 5.0, 5.0), outpaint=False)
    sample_tool._edit_source(args, encoder, (S // 4, S // 4), "cpu")
    assert torch.equal(encoder.x, expected)
