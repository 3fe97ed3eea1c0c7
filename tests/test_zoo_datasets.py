"""The offline world's datasets and OOD pool: deterministic, well-formed, clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from scanner.errors import DatasetError
from scanner.zoo.datasets import MAX_SHOTS, get_spec, list_datasets, load_split, zoo_datasets
from scanner.zoo.ood import default_ood_pool, load_ood_folder, pool_sha256


def test_at_least_ten_datasets_two_fine_grained_one_real() -> None:
    names = zoo_datasets()
    assert len(names) >= 10 and set(names) < set(list_datasets())
    assert sum(get_spec(n).fine_grained for n in names) >= 2
    assert any(get_spec(n).real for n in names)
    assert any(get_spec(n).n_classes >= 100 for n in names)


@pytest.mark.parametrize("name", ["shapes", "digits", "arrows"])
def test_splits_are_deterministic_and_well_formed(name: str) -> None:
    spec = get_spec(name)
    x, y = load_split(name, "train", seed=3)
    x2, y2 = load_split(name, "train", seed=3)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert x.shape == (spec.n_classes * MAX_SHOTS, 3, 64, 64)
    assert float(x.min()) >= 0 and float(x.max()) <= 1
    assert torch.equal(torch.bincount(y, minlength=spec.n_classes), torch.full((spec.n_classes,), MAX_SHOTS))
    xt, _ = load_split(name, "test", seed=3)
    # no test image is a copy of a training image
    flat_tr = {hash(t.numpy().tobytes()) for t in x}
    assert not any(hash(t.numpy().tobytes()) in flat_tr for t in xt)


def _sharpness(x: torch.Tensor) -> float:
    """Mean absolute difference of horizontally adjacent pixels of images (N, 3, S, S)."""
    return float((x[..., 1:] - x[..., :-1]).abs().mean())


def test_shifted_datasets_are_their_base_scenes_out_of_focus() -> None:
    shifted = [n for n in list_datasets() if get_spec(n).shift is not None]
    assert len(shifted) >= 4 and not set(shifted) & set(zoo_datasets())
    for name in shifted:
        spec, base = get_spec(name), get_spec(name.removeprefix("blurry_"))
        assert spec.shift == "blur" and spec.classnames == base.classnames and "blurry" in spec.template
    x, y = load_split("blurry_shapes", "test", seed=0)
    xb, yb = load_split("shapes", "test", seed=0)
    assert torch.equal(y, yb) and x.shape == xb.shape
    assert torch.equal(x, load_split("blurry_shapes", "test", seed=0)[0])  # seeded like every split
    # out of focus: adjacent pixels differ far less than in the sharp scenes
    assert _sharpness(x) < 0.5 * _sharpness(xb)


def test_shots_take_the_first_k_per_class_and_seeds_differ() -> None:
    x16, y16 = load_split("colours", "train", seed=0)
    x4, y4 = load_split("colours", "train", shots=4, seed=0)
    assert x4.shape[0] == 4 * get_spec("colours").n_classes
    k0 = torch.nonzero(y16 == 0).flatten()[:4]
    assert torch.equal(x4[y4 == 0], x16[k0])
    other, _ = load_split("colours", "train", shots=4, seed=1)
    assert not torch.equal(other, x4)


def test_bad_dataset_requests_say_what_was_expected() -> None:
    with pytest.raises(DatasetError, match=r"unknown dataset 'nope'.*shapes"):
        load_split("nope")
    with pytest.raises(DatasetError, match=r"17 shots requested.*1\.\.16"):
        load_split("shapes", shots=17)


def test_default_ood_pool_is_real_photo_crops_and_deterministic() -> None:
    a = default_ood_pool(40, 64, seed=1)
    b = default_ood_pool(40, 64, seed=1)
    assert a.shape == (40, 3, 64, 64) and torch.equal(a, b)
    assert pool_sha256(a) == pool_sha256(b) != pool_sha256(default_ood_pool(40, 64, seed=2))
    # photographs, not flat synthetic renders: plenty of distinct colours per image
    assert min(len(np.unique(img.reshape(3, -1).T.numpy(), axis=0)) for img in a[:5]) > 50


def test_ood_folder_loads_images_and_rejects_empty_ones(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no images"):
        load_ood_folder(tmp_path, 64)
    with pytest.raises(DatasetError, match="does not exist"):
        load_ood_folder(tmp_path / "missing", 64)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="could be read"):
        load_ood_folder(tmp_path, 64)
    Image.fromarray(np.full((30, 50, 3), 200, np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((80, 40, 3), np.uint8)).save(tmp_path / "sub.jpg")
    pool = load_ood_folder(tmp_path, 64)
    assert pool.shape == (2, 3, 64, 64)
