"""Outlier and OOD test sources (fedtrust.data.outliers): shapes, determinism, disjointness, real files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedtrust.data import outliers
from fedtrust.data.outliers import check_disjoint, display_name, fit_to_shape, load_outliers, source_names
from fedtrust.errors import ConfigError, DataError

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
OOD_FILES = ["openclipart_28", "openclipart_32", "animal_mnist", "notmnist_fonts", "textures_gimp_32", "emoji_google_32"]
BUNDLED = ["photos", "textures", "noise"]


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32), (1, 28, 28)], ids=str)
@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_sources_shape_and_dtype(name: str, shape: tuple[int, int, int]) -> None:
    a = load_outliers(name, shape, n=24, seed=3)
    assert a.shape == (24, *shape) and a.dtype == torch.uint8 and a.is_contiguous()
    assert a.float().std() > 10  # not blank
    if shape[0] == 3 and name != "noise":  # grey textures become RGB by repetition, photos stay colour
        assert torch.equal(a[:, 0], a[:, 1]) == (name == "textures")


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_sources_are_deterministic_per_seed(name: str) -> None:
    a = load_outliers(name, (1, 8, 8), n=16, seed=3)
    assert torch.equal(a, load_outliers(name, (1, 8, 8), n=16, seed=3))
    assert not torch.equal(a, load_outliers(name, (1, 8, 8), n=16, seed=4))


def test_photos_and_textures_are_disjoint_and_bundled() -> None:
    assert not set(outliers.PHOTOS) & set(outliers.TEXTURES)
    assert outliers.get_source("photos").family != outliers.get_source("textures").family
    assert outliers.get_source("photos").load((1, 8, 8), n=2, root=None).shape == (2, 1, 8, 8)  # no data root
    assert load_outliers("noise", (1, 8, 8)).shape[0] == outliers.GENERATED_DEFAULT_N


def test_noise_has_uniform_and_blurred_halves() -> None:
    x = load_outliers("noise", (1, 32, 32), n=10, seed=0).float()
    roughness = (x[:, :, 1:] - x[:, :, :-1]).abs().mean(dim=(1, 2, 3))
    assert (roughness[:5] > 2 * roughness[5:]).all()


def test_check_disjoint() -> None:
    check_disjoint(["photos"], ["textures", "noise"])
    check_disjoint(["openclipart"], ["animal_mnist", "notmnist_fonts", "mnist"], id_dataset="fashion_mnist")
    with pytest.raises(ConfigError, match="'photos'.*same source") as err:
        check_disjoint(["photos"], ["noise", "photos"])
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="same source"):
        check_disjoint(["openclipart_28"], ["openclipart_32"])
    with pytest.raises(ConfigError, match="is the ID data set"):
        check_disjoint(["photos"], ["mnist"], id_dataset="mnist")


def test_display_names_and_roles() -> None:
    assert display_name("textures_gimp_32") == "Textures-GIMP"
    assert display_name("photos") == "skimage photos"
    assert display_name("emoji_google_32") == "Emoji-Google"
    assert display_name("notmnist_fonts") == "notMNIST-fonts"
    assert "photos" in source_names("train") and "textures" not in source_names("train")
    assert {"animal_mnist", "textures", "noise", "mnist"} <= set(source_names("test"))


def test_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=str(tmp_path / "ood" / "animal_mnist.npz")) as err:
        load_outliers("animal_mnist", (1, 28, 28), n=5, root=tmp_path)
    assert "\n" not in str(err.value)
    with pytest.raises(DataError, match="no data root"):
        load_outliers("textures_gimp_32", (3, 32, 32), n=5)
    with pytest.raises(ConfigError, match="unknown outliers 'photo'"):
        load_outliers("photo", (1, 8, 8), n=5)
    with pytest.raises(ConfigError, match="shape"):
        load_outliers("noise", (2, 8, 8), n=5)
    with pytest.raises(ConfigError, match="n must be"):
        load_outliers("noise", (1, 8, 8), n=-1)


def test_own_npz_file_colour_to_grey_and_sampling(tmp_path: Path) -> None:
    red = np.zeros((6, 10, 10, 3), np.uint8)
    red[..., 0] = 255
    np.savez(tmp_path / "red.npz", x=red)  # unlabelled, channels-last
    x = load_outliers(f"npz:{tmp_path / 'red.npz'}", (1, 4, 4), n=3, seed=0)
    assert x.shape == (3, 1, 4, 4) and (x == round(0.299 * 255)).all()
    assert load_outliers(f"npz:{tmp_path / 'red.npz'}", (3, 4, 4)).shape == (6, 3, 4, 4)  # n=None: all
    with pytest.raises(DataError, match="asked for 7 images, it holds 6"):
        load_outliers(f"npz:{tmp_path / 'red.npz'}", (1, 4, 4), n=7)


def test_fit_to_shape_grey_to_rgb_and_resize() -> None:
    grey = torch.arange(64, dtype=torch.uint8).view(1, 1, 8, 8)
    rgb = fit_to_shape(grey, (3, 4, 4))
    assert rgb.shape == (1, 3, 4, 4) and torch.equal(rgb[:, 0], rgb[:, 2])
    assert torch.equal(fit_to_shape(grey, (1, 8, 8)), grey)


@pytest.fixture(scope="module")
def ood_root() -> Path:
    if not (SHARED_DATA / "ood").is_dir():
        pytest.skip(f"../shared/data/ood absent (looked in {SHARED_DATA / 'ood'}): real OOD-file checks need it")
    return SHARED_DATA


@pytest.mark.parametrize("stem", OOD_FILES)
def test_real_ood_files(stem: str, ood_root: Path) -> None:
    if not (ood_root / "ood" / f"{stem}.npz").is_file():
        pytest.skip(f"{ood_root / 'ood' / stem}.npz absent")
    for shape in [(1, 28, 28), (3, 32, 32), (1, 8, 8)]:
        x = load_outliers(stem, shape, n=40, seed=0, root=ood_root)
        assert x.shape == (40, *shape) and x.dtype == torch.uint8
        assert torch.equal(x, load_outliers(stem, shape, n=40, seed=0, root=ood_root))
        assert x.float().std() > 5


def test_openclipart_picks_the_file_by_channels(ood_root: Path) -> None:
    grey = load_outliers("openclipart", (1, 28, 28), n=10, seed=1, root=ood_root)
    assert torch.equal(grey, load_outliers("openclipart_28", (1, 28, 28), n=10, seed=1, root=ood_root))
    rgb = load_outliers("openclipart", (3, 32, 32), n=10, seed=1, root=ood_root)
    assert torch.equal(rgb, load_outliers("openclipart_32", (3, 32, 32), n=10, seed=1, root=ood_root))


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_cross_dataset_sources(name: str, ood_root: Path) -> None:
    if not (ood_root / name / "test.npz").is_file():
        pytest.skip(f"{ood_root / name / 'test.npz'} absent")
    x = load_outliers(name, (1, 8, 8), n=30, seed=0, root=ood_root)
    assert x.shape == (30, 1, 8, 8) and x.dtype == torch.uint8
