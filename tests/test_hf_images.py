"""HFImageSource: images of a benchmark read from a Hugging Face `datasets` dataset (no network)."""

import pickle
import time

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.hf_images import HFImageSource, HFImagesUnavailableError
from datamodules.layout import DatasetFormatError, DatasetLayoutError

IDS = ["bicycle_final/111085122871_0.JPG", "roxford5k/jpg/all_souls_000013.jpg", "test/0/1/2/0123abcd.jpg"]


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """load_dataset("parquet") writes Arrow files to the datasets cache: keep them in tmp_path."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


@pytest.fixture
def jpegs(tmp_path):
    """id -> JPEG file of a small random image (different sizes)."""
    rng = np.random.default_rng(0)
    files = {}
    for i, image_id in enumerate(IDS):
        file = tmp_path / "jpg" / f"{i}.jpg"
        file.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (12 + i, 16 + 2 * i, 3), dtype=np.uint8)).save(file, quality=90)
        files[image_id] = file
    return files


def pixels(file) -> np.ndarray:
    with Image.open(file) as image:
        return np.asarray(image.convert("RGB"))


def image_dataset(jpegs, ids=None, **columns):
    ids = list(jpegs) if ids is None else ids
    data = {"path": ids, "image": [str(jpegs[i]) for i in ids], **columns}
    return datasets.Dataset.from_dict(data).cast_column("image", datasets.Image())


def assert_all_images(source, jpegs):
    for image_id, file in jpegs.items():
        image = source.open(image_id)
        assert image.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(image), pixels(file))


def test_save_to_disk_directory_gives_exact_pixels(tmp_path, jpegs):
    # rows in another order than the lists, plus a row no list uses
    image_dataset(jpegs, ids=IDS[::-1]).save_to_disk(tmp_path / "hf")
    source = HFImageSource(str(tmp_path / "hf"))
    assert_all_images(source, jpegs)
    assert IDS[0] in source and "nope.jpg" not in source
    assert source.missing([*IDS, "nope.jpg", "other.jpg"]) == ["nope.jpg", "other.jpg"]


def test_dataset_dict_splits(tmp_path, jpegs):
    datasets.DatasetDict(
        {"train": image_dataset(jpegs, ids=IDS[:2]), "test": image_dataset(jpegs, ids=IDS[2:])}
    ).save_to_disk(tmp_path / "hf")
    source = HFImageSource(str(tmp_path / "hf"), split="test")
    np.testing.assert_array_equal(np.asarray(source.open(IDS[2])), pixels(jpegs[IDS[2]]))
    assert IDS[0] not in source
    with pytest.raises(DatasetLayoutError, match=r"no split 'val'.*'train', 'test'"):
        HFImageSource(str(tmp_path / "hf"), split="val").open(IDS[0])
    with pytest.raises(ValueError, match=r"splits \['train', 'test'\]"):
        HFImageSource(str(tmp_path / "hf")).open(IDS[0])


def test_parquet_file_directory_glob_and_data_files(tmp_path, jpegs):
    parquet = tmp_path / "parquet"
    parquet.mkdir()
    image_dataset(jpegs).to_parquet(parquet / "all.parquet")
    assert_all_images(HFImageSource(str(parquet / "all.parquet")), jpegs)

    shards = tmp_path / "shards"
    (shards / "sub").mkdir(parents=True)
    image_dataset(jpegs, ids=IDS[:1]).to_parquet(shards / "a.parquet")
    image_dataset(jpegs, ids=IDS[1:]).to_parquet(shards / "sub" / "b.parquet")
    assert_all_images(HFImageSource(str(shards), split="test"), jpegs)
    assert_all_images(HFImageSource(str(shards / "**" / "*.parquet")), jpegs)
    source = HFImageSource(str(shards), data_files=["sub/*.parquet"])
    assert source.missing(IDS) == IDS[:1]


def test_raw_bytes_image_column(tmp_path, jpegs):
    data = {"file": list(jpegs), "jpg": [file.read_bytes() for file in jpegs.values()]}
    datasets.Dataset.from_dict(data).save_to_disk(tmp_path / "hf")
    assert_all_images(HFImageSource(str(tmp_path / "hf"), id_column="file", image_column="jpg"), jpegs)


def test_image_feature_without_decoding(tmp_path, jpegs):
    image_dataset(jpegs).cast_column("image", datasets.Image(decode=False)).save_to_disk(tmp_path / "hf")
    assert_all_images(HFImageSource(str(tmp_path / "hf")), jpegs)


def test_errors_name_the_problem(tmp_path, jpegs):
    image_dataset(jpegs, label=[0, 1, 2]).save_to_disk(tmp_path / "hf")
    with pytest.raises(DatasetFormatError, match=r"id_column 'file' not found.*\['path', 'image', 'label'\]"):
        HFImageSource(str(tmp_path / "hf"), id_column="file").open(IDS[0])
    with pytest.raises(DatasetFormatError, match=r"image_column 'jpg' not found.*\['path', 'image', 'label'\]"):
        HFImageSource(str(tmp_path / "hf"), image_column="jpg").open(IDS[0])
    with pytest.raises(DatasetFormatError, match="image_column 'label' is"):
        HFImageSource(str(tmp_path / "hf"), image_column="label").open(IDS[0])
    with pytest.raises(DatasetLayoutError, match=r"hf': no image with path 'missing/x\.jpg'") as error:
        HFImageSource(str(tmp_path / "hf")).open("missing/x.jpg")
    assert str(tmp_path / "hf") in str(error.value)

    image_dataset(jpegs, ids=[IDS[0], IDS[1], IDS[0]]).save_to_disk(tmp_path / "dup")
    with pytest.raises(DatasetFormatError, match=f"duplicate path '{IDS[0]}'"):
        HFImageSource(str(tmp_path / "dup")).open(IDS[1])

    good = jpegs[IDS[0]].read_bytes()
    data = {"path": IDS, "image": [good, good[: len(good) // 2], b"not an image"]}
    datasets.Dataset.from_dict(data).save_to_disk(tmp_path / "corrupt")
    source = HFImageSource(str(tmp_path / "corrupt"))
    source.open(IDS[0])
    for image_id in IDS[1:]:
        with pytest.raises(DatasetFormatError, match=f"corrupt.*'{image_id}' cannot be decoded"):
            source.open(image_id)

    with pytest.raises(DatasetLayoutError, match="neither a directory written by save_to_disk"):
        HFImageSource(str(tmp_path / "jpg")).open(IDS[0])
    with pytest.raises(DatasetLayoutError, match="not found"):
        HFImageSource(str(tmp_path / "nowhere" / "x")).open(IDS[0])


def test_offline_hub_id_fails_at_once_with_a_way_out(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline_before = datasets.config.HF_HUB_OFFLINE
    start = time.monotonic()
    with pytest.raises(HFImagesUnavailableError) as error:
        HFImageSource("someone/not-cached", split="train").open(IDS[0])
    assert time.monotonic() - start < 10
    message = str(error.value)
    assert isinstance(error.value, RuntimeError) and "\n" not in message
    assert "someone/not-cached" in message and "offline" in message
    assert "save_to_disk" in message and "parquet" in message
    assert datasets.config.HF_HUB_OFFLINE == offline_before  # the library's mode is restored


class Wrapped(torch.utils.data.Dataset):
    def __init__(self, source, ids):
        self.source, self.ids = source, ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        return torch.from_numpy(np.asarray(self.source.open(self.ids[index])).copy())


@pytest.mark.parametrize("kind", ["save_to_disk", "parquet"])
def test_pickle_and_dataloader_workers(tmp_path, jpegs, kind):
    if kind == "save_to_disk":
        image_dataset(jpegs).save_to_disk(tmp_path / "hf")
        source = HFImageSource(str(tmp_path / "hf"))
    else:
        image_dataset(jpegs).to_parquet(tmp_path / "images.parquet")
        source = HFImageSource(str(tmp_path / "images.parquet"))
    copy = pickle.loads(pickle.dumps(source))  # before opening
    np.testing.assert_array_equal(np.asarray(copy.open(IDS[1])), pixels(jpegs[IDS[1]]))
    source.open(IDS[0])
    data = pickle.dumps(source)  # after opening: the arguments and Arrow file names, not the dataset
    assert len(data) < 2000
    np.testing.assert_array_equal(np.asarray(pickle.loads(data).open(IDS[2])), pixels(jpegs[IDS[2]]))

    loader = torch.utils.data.DataLoader(Wrapped(source, IDS * 2), batch_size=None, num_workers=2)
    images = list(loader)
    assert len(images) == 2 * len(IDS)
    for image, image_id in zip(images, IDS * 2):
        np.testing.assert_array_equal(image.numpy(), pixels(jpegs[image_id]))
