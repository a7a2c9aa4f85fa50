"""MedMNIST metadata, file validation, loading and download, on small synthetic files.

Downloads go to a real HTTP server on 127.0.0.1; the only seam is ``url_and_md5``,
pointed at that server, since ``fetch`` otherwise takes the Zenodo URL from the table.
"""

from __future__ import annotations

import http.server
import io
import re
import socket
import struct
import threading
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from medbloom.data import medmnist
from medbloom.data.registry import dataset_names, load_dataset, spec_of
from medbloom.data.types import TASKS, Splits
from medbloom.errors import DataError
from synthetic import (
    LAYOUTS,
    make_arrays,
    md5_of,
    npz_path,
    write_arrays,
    write_npz,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
REAL_PNEUMONIA = SHARED / "medmnist" / "pneumoniamnist.npz"
ZENODO = "https://zenodo.org/records/10519652/files/"

# flag -> (task, channels, classes); from the MedMNIST v2 paper, written out here.
EXPECTED = {
    "pathmnist": ("multi-class", 3, 9),
    "chestmnist": ("multi-label, binary-class", 1, 14),
    "dermamnist": ("multi-class", 3, 7),
    "octmnist": ("multi-class", 1, 4),
    "pneumoniamnist": ("binary-class", 1, 2),
    "retinamnist": ("ordinal-regression", 3, 5),
    "breastmnist": ("binary-class", 1, 2),
    "bloodmnist": ("multi-class", 3, 8),
    "tissuemnist": ("multi-class", 1, 8),
    "organamnist": ("multi-class", 1, 11),
    "organcmnist": ("multi-class", 1, 11),
    "organsmnist": ("multi-class", 1, 11),
    "organmnist3d": ("multi-class", 1, 11),
    "nodulemnist3d": ("binary-class", 1, 2),
    "adrenalmnist3d": ("binary-class", 1, 2),
    "fracturemnist3d": ("multi-class", 1, 3),
    "vesselmnist3d": ("binary-class", 1, 2),
    "synapsemnist3d": ("binary-class", 1, 2),
}
FLAGS_3D = [f for f in EXPECTED if f.endswith("3d")]
FLAGS_2D = [f for f in EXPECTED if not f.endswith("3d")]


# ------------------------------------------------------------------ metadata


def test_flags_are_the_eighteen_official_sets() -> None:
    assert medmnist.flags() == list(EXPECTED)
    assert list(medmnist.info()) == list(EXPECTED)
    assert dataset_names() == [*EXPECTED, "brain-tumor-mri"]
    assert set(LAYOUTS) == set(EXPECTED)  # the synthetic helper agrees too


@pytest.mark.parametrize("flag", list(EXPECTED))
def test_spec_for_every_flag_and_size(flag: str) -> None:
    task, channels, classes = EXPECTED[flag]
    sizes = (28, 64) if flag in FLAGS_3D else (28, 64, 128, 224)
    assert medmnist.sizes(flag) == sizes
    assert medmnist.is_3d(flag) == (flag in FLAGS_3D)
    for size in sizes:
        spec = medmnist.spec_for(flag, size)
        assert spec.name == flag
        assert spec.task == task
        assert spec.task in TASKS
        assert spec.in_channels == channels
        assert spec.num_classes == classes
        assert len(spec.class_names) == classes
        assert all(isinstance(n, str) and n for n in spec.class_names)
        assert spec.spatial_dims == (3 if flag in FLAGS_3D else 2)
        assert spec.image_size == size
        assert spec.benchmark, f"no published benchmark for {flag}"
        n_samples = spec.extra["n_samples"]
        assert set(n_samples) == {"train", "val", "test"}
        assert all(v > 0 for v in n_samples.values())
        assert spec_of(flag, size) == spec


def test_spec_details_of_pneumonia_and_chest() -> None:
    spec = medmnist.spec_for("pneumoniamnist", 28)
    assert spec.class_names == ("normal", "pneumonia")
    assert spec.extra["n_samples"] == {"train": 4708, "val": 524, "test": 624}
    assert spec.extra["license"] == "CC BY 4.0"
    assert spec.benchmark["resnet18-28"] == {"auc": 0.944, "acc": 0.854}
    chest = medmnist.spec_for("chestmnist", 28)
    assert chest.class_names[0] == "atelectasis"
    assert chest.class_names[13] == "hernia"


@pytest.mark.parametrize("flag", FLAGS_3D)
@pytest.mark.parametrize("size", [128, 224, 32])
def test_unpublished_3d_size(flag: str, size: int) -> None:
    with pytest.raises(DataError) as info:
        medmnist.spec_for(flag, size)
    assert str(info.value) == f"--size {size} is not published for {flag}: expected one of 28, 64"


@pytest.mark.parametrize("size", [0, 32, 96, 256])
def test_unpublished_2d_size(size: int) -> None:
    with pytest.raises(DataError, match=rf"^--size {size} is not published for pneumoniamnist"):
        medmnist.spec_for("pneumoniamnist", size)
    with pytest.raises(DataError, match="--size"):
        medmnist.url_and_md5("pneumoniamnist", size)


def test_unknown_flag() -> None:
    with pytest.raises(DataError) as info:
        medmnist.spec_for("pneumonia", 28)
    msg = str(info.value)
    assert msg.startswith("--dataset 'pneumonia' is unknown")
    assert "pneumoniamnist" in msg
    with pytest.raises(DataError, match="--dataset 'cifar10' is unknown"):
        spec_of("cifar10", 28)


def test_file_names() -> None:
    assert medmnist.file_name("pneumoniamnist", 28) == "pneumoniamnist.npz"
    assert medmnist.file_name("pneumoniamnist", 64) == "pneumoniamnist_64.npz"
    assert medmnist.file_name("organmnist3d", 64) == "organmnist3d_64.npz"
    assert medmnist.file_name("bloodmnist", 224) == "bloodmnist_224.npz"


def test_url_and_md5_known_values() -> None:
    assert medmnist.url_and_md5("pneumoniamnist", 28) == (
        ZENODO + "pneumoniamnist.npz?download=1",
        "28209eda62fecd6e6a2d98b1501bb15f",
    )
    assert medmnist.url_and_md5("pneumoniamnist", 64) == (
        ZENODO + "pneumoniamnist_64.npz?download=1",
        "8f4eceb4ccffa70c672198ea285246c6",
    )
    assert medmnist.url_and_md5("organmnist3d", 64)[1] == "58a2205adf14a9d0a189cb06dc78bf10"


@pytest.mark.parametrize("flag", list(EXPECTED))
def test_every_url_names_its_file(flag: str) -> None:
    md5s = set()
    for size in medmnist.sizes(flag):
        url, md5 = medmnist.url_and_md5(flag, size)
        assert url == ZENODO + medmnist.file_name(flag, size) + "?download=1"
        assert re.fullmatch(r"[0-9a-f]{32}", md5)
        md5s.add(md5)
    assert len(md5s) == len(medmnist.sizes(flag))  # one checksum per file


def test_file_path_and_data_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert medmnist.file_path("bloodmnist", 64, tmp_path) == (
        tmp_path / "medmnist" / "bloodmnist_64.npz"
    )
    monkeypatch.setenv("MEDBLOOM_DATA_DIR", str(tmp_path / "env"))
    assert medmnist.default_data_root() == tmp_path / "env"
    assert medmnist.file_path("pneumoniamnist", 28) == tmp_path / "env/medmnist/pneumoniamnist.npz"
    assert medmnist.resolve_data_root("") == tmp_path / "env"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert medmnist.resolve_data_root("~/data") == tmp_path / "home" / "data"
    monkeypatch.delenv("MEDBLOOM_DATA_DIR")
    assert medmnist.default_data_root().name == "medbloom"


# ------------------------------------------------------------------- loading


def _load(root: Path, flag: str, size: int = 28) -> Splits:
    return medmnist.load(flag, size, root, download=False, progress=False)


def test_load_binary_gray(tmp_path: Path) -> None:
    arrays = make_arrays("pneumoniamnist", counts={"train": 30, "val": 6, "test": 8}, seed=1)
    write_npz(tmp_path, "pneumoniamnist", arrays=arrays)
    splits = _load(tmp_path, "pneumoniamnist")
    assert splits.spec == medmnist.spec_for("pneumoniamnist", 28)
    for split, n in (("train", 30), ("val", 6), ("test", 8)):
        part = getattr(splits, split)
        assert len(part) == n
        assert part.images.shape == (n, 1, 28, 28)
        assert part.images.dtype == np.uint8
        assert part.images.flags["C_CONTIGUOUS"]
        np.testing.assert_array_equal(part.images[:, 0], arrays[f"{split}_images"])
        assert part.labels.shape == (n,)
        assert part.labels.dtype == np.int64
        np.testing.assert_array_equal(part.labels, arrays[f"{split}_labels"][:, 0])
        assert part.task == "binary-class"
        assert part.class_names == ("normal", "pneumonia")
        assert not part.multi_label
        assert part.num_classes == 2


def test_load_rgb_multiclass(tmp_path: Path) -> None:
    arrays = make_arrays("bloodmnist", seed=2)
    write_npz(tmp_path, "bloodmnist", arrays=arrays)
    splits = _load(tmp_path, "bloodmnist")
    train = splits.train
    assert train.images.shape == (24, 3, 28, 28)
    assert train.images.flags["C_CONTIGUOUS"]
    for c in range(3):
        np.testing.assert_array_equal(train.images[:, c], arrays["train_images"][..., c])
    assert sorted(set(train.labels.tolist())) == list(range(8))
    assert train.num_classes == 8
    assert train.task == "multi-class"


def test_load_3d(tmp_path: Path) -> None:
    arrays = make_arrays("organmnist3d", counts={"train": 11, "val": 3, "test": 4}, seed=3)
    write_npz(tmp_path, "organmnist3d", arrays=arrays)
    splits = _load(tmp_path, "organmnist3d")
    assert splits.train.images.shape == (11, 1, 28, 28, 28)
    assert splits.test.images.shape == (4, 1, 28, 28, 28)
    np.testing.assert_array_equal(splits.train.images[:, 0], arrays["train_images"])
    assert sorted(splits.train.labels.tolist()) == list(range(11))
    assert splits.spec.spatial_dims == 3


def test_load_multilabel(tmp_path: Path) -> None:
    arrays = make_arrays("chestmnist", seed=4)
    write_npz(tmp_path, "chestmnist", arrays=arrays)
    splits = _load(tmp_path, "chestmnist")
    labels = splits.train.labels
    assert labels.shape == (24, 14)
    assert labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, arrays["train_labels"])
    assert splits.train.images.shape == (24, 1, 28, 28)
    assert splits.train.multi_label
    assert splits.train.num_classes == 14


def test_load_ordinal_rgb(tmp_path: Path) -> None:
    arrays = make_arrays("retinamnist", seed=5)
    write_npz(tmp_path, "retinamnist", arrays=arrays)
    splits = _load(tmp_path, "retinamnist")
    assert splits.spec.task == "ordinal-regression"
    assert splits.val.images.shape == (8, 3, 28, 28)
    assert sorted(set(splits.train.labels.tolist())) == [0, 1, 2, 3, 4]


def test_load_size_64(tmp_path: Path) -> None:
    path = write_npz(tmp_path, "pneumoniamnist", 64, counts={"train": 5, "val": 2, "test": 3})
    assert path == tmp_path / "medmnist" / "pneumoniamnist_64.npz"
    splits = _load(tmp_path, "pneumoniamnist", 64)
    assert splits.train.images.shape == (5, 1, 64, 64)
    assert splits.spec.image_size == 64


def test_load_3d_size_64(tmp_path: Path) -> None:
    write_npz(tmp_path, "nodulemnist3d", 64, counts={"train": 2, "val": 2, "test": 2})
    splits = _load(tmp_path, "nodulemnist3d", 64)
    assert splits.train.images.shape == (2, 1, 64, 64, 64)


def test_load_uncompressed_file(tmp_path: Path) -> None:
    write_arrays(npz_path(tmp_path, "breastmnist"), make_arrays("breastmnist"), compressed=False)
    assert len(_load(tmp_path, "breastmnist").train) == 24


def test_load_dataset_by_name(tmp_path: Path) -> None:
    write_npz(tmp_path, "pneumoniamnist")
    splits = load_dataset("pneumoniamnist", 28, tmp_path, download=False, progress=False)
    assert len(splits.train) == 24
    assert splits.train.images.shape == (24, 1, 28, 28)


def test_subset_keeps_rows_together(tmp_path: Path) -> None:
    arrays = make_arrays("bloodmnist", seed=6)
    write_npz(tmp_path, "bloodmnist", arrays=arrays)
    train = _load(tmp_path, "bloodmnist").train
    sub = train.subset(np.array([5, 0, 7]))
    assert len(sub) == 3
    np.testing.assert_array_equal(sub.labels, arrays["train_labels"][[5, 0, 7], 0])
    np.testing.assert_array_equal(sub.images[1, 2], arrays["train_images"][0, ..., 2])


def test_absent_file_offline_names_path_and_url(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        _load(tmp_path, "pneumoniamnist")
    path = tmp_path / "medmnist" / "pneumoniamnist.npz"
    assert str(info.value) == (
        f"{path} not found; fetch it from {ZENODO}pneumoniamnist.npz?download=1"
    )
    assert not (tmp_path / "medmnist").exists()  # nothing created offline


def test_size_28_file_does_not_stand_in_for_64(tmp_path: Path) -> None:
    write_npz(tmp_path, "pneumoniamnist", 28)
    with pytest.raises(DataError) as info:
        _load(tmp_path, "pneumoniamnist", 64)
    msg = str(info.value)
    assert str(tmp_path / "medmnist" / "pneumoniamnist_64.npz") in msg
    assert ZENODO + "pneumoniamnist_64.npz" in msg


# ------------------------------------------------------------- bad files

Mutation = Callable[[dict[str, np.ndarray]], None]


def _drop(*keys: str) -> Mutation:
    def mutate(arrays: dict[str, np.ndarray]) -> None:
        for key in keys:
            del arrays[key]

    return mutate


def _set(key: str, make: Callable[[np.ndarray], np.ndarray]) -> Mutation:
    def mutate(arrays: dict[str, np.ndarray]) -> None:
        arrays[key] = make(arrays[key])

    return mutate


def _label_value(key: str, row: int, value: int, dtype: type = np.uint8) -> Mutation:
    def mutate(arrays: dict[str, np.ndarray]) -> None:
        labels = arrays[key].astype(dtype)
        labels[row] = value
        arrays[key] = labels

    return mutate


def _empty(split: str) -> Mutation:
    def mutate(arrays: dict[str, np.ndarray]) -> None:
        arrays[f"{split}_images"] = arrays[f"{split}_images"][:0]
        arrays[f"{split}_labels"] = arrays[f"{split}_labels"][:0]

    return mutate


BAD_FILES: list[tuple[str, str, Mutation, str]] = [
    # (id, flag, mutation, expected text after "<path>: ")
    (
        "missing-key",
        "pneumoniamnist",
        _drop("val_labels"),
        "missing arrays val_labels; a MedMNIST file holds train_images, train_labels, "
        "val_images, val_labels, test_images, test_labels",
    ),
    (
        "missing-two-keys",
        "pneumoniamnist",
        _drop("train_images", "test_labels"),
        "missing arrays train_images, test_labels",
    ),
    (
        "float-images",
        "pneumoniamnist",
        _set("train_images", lambda x: x.astype(np.float32) / 255),
        "train_images has dtype float32, expected uint8",
    ),
    (
        "int64-images",
        "bloodmnist",
        _set("val_images", lambda x: x.astype(np.int64)),
        "val_images has dtype int64, expected uint8",
    ),
    (
        "image-size",
        "pneumoniamnist",
        _set("train_images", lambda x: np.zeros((24, 32, 32), np.uint8)),
        "train_images has shape (24, 32, 32), expected (N, 28, 28)",
    ),
    (
        "rgb-without-channels",
        "bloodmnist",
        _set("test_images", lambda x: x[..., 0]),
        "test_images has shape (10, 28, 28), expected (N, 28, 28, 3)",
    ),
    (
        "gray-with-channel-axis",
        "pneumoniamnist",
        _set("train_images", lambda x: x[..., None]),
        "train_images has shape (24, 28, 28, 1), expected (N, 28, 28)",
    ),
    (
        "2d-images-in-3d-set",
        "organmnist3d",
        _set("train_images", lambda x: x[:, 0]),
        "train_images has shape (24, 28, 28), expected (N, 28, 28, 28)",
    ),
    (
        "flat-labels",
        "pneumoniamnist",
        _set("train_labels", lambda y: y[:, 0]),
        "train_labels has shape (24,), expected (24, 1)",
    ),
    (
        "too-few-labels",
        "pneumoniamnist",
        _set("val_labels", lambda y: y[:-1]),
        "val_labels has shape (7, 1), expected (8, 1)",
    ),
    (
        "one-hot-labels",
        "bloodmnist",
        _set("train_labels", lambda y: np.eye(8, dtype=np.uint8)[y[:, 0]]),
        "train_labels has shape (24, 8), expected (24, 1)",
    ),
    (
        "multilabel-width",
        "chestmnist",
        _set("train_labels", lambda y: y[:, :13]),
        "train_labels has shape (24, 13), expected (24, 14)",
    ),
    (
        "float-labels",
        "pneumoniamnist",
        _set("test_labels", lambda y: y.astype(np.float64)),
        "test_labels has dtype float64, expected integers",
    ),
    (
        "binary-label-2",
        "pneumoniamnist",
        _label_value("train_labels", 3, 2),
        "train_labels range from 0 to 2, expected 0 to 1 (2 classes of pneumoniamnist)",
    ),
    (
        "negative-label",
        "bloodmnist",
        _label_value("val_labels", 0, -1, np.int16),
        "val_labels range from -1 to 7, expected 0 to 7 (8 classes of bloodmnist)",
    ),
    (
        "multiclass-label-8",
        "bloodmnist",
        _label_value("test_labels", 1, 8),
        "test_labels range from 0 to 8, expected 0 to 7 (8 classes of bloodmnist)",
    ),
    (
        "multilabel-value-2",
        "chestmnist",
        _label_value("train_labels", 5, 2),
        "train_labels range from 0 to 2, expected 0 to 1 (14 classes of chestmnist)",
    ),
    ("empty-test", "pneumoniamnist", _empty("test"), "test split is empty"),
    ("empty-train", "organmnist3d", _empty("train"), "train split is empty"),
]


@pytest.mark.parametrize(
    ("flag", "mutate", "problem"), [b[1:] for b in BAD_FILES], ids=[b[0] for b in BAD_FILES]
)
def test_bad_file_is_a_data_error(
    tmp_path: Path, flag: str, mutate: Mutation, problem: str
) -> None:
    arrays = make_arrays(flag)
    mutate(arrays)
    path = write_npz(tmp_path, flag, arrays=arrays)
    with pytest.raises(DataError) as info:
        _load(tmp_path, flag)
    prefix = f"{path}: "
    msg = str(info.value)
    assert msg.startswith(prefix), msg
    assert msg[len(prefix) :] == problem or msg[len(prefix) :].startswith(problem), msg


def _assert_unreadable(exc: pytest.ExceptionInfo[DataError], path: Path) -> None:
    msg = str(exc.value)
    assert msg.startswith(f"{path}: not a readable npz file (truncated or corrupt?)"), msg
    assert msg.endswith("delete it to download it again")


def test_truncated_file(tmp_path: Path) -> None:
    path = write_npz(tmp_path, "pneumoniamnist")
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError) as info:
        _load(tmp_path, "pneumoniamnist")
    _assert_unreadable(info, path)


def test_not_a_zip(tmp_path: Path) -> None:
    path = npz_path(tmp_path, "pneumoniamnist")
    path.parent.mkdir(parents=True)
    path.write_text("<html>404 Not Found</html>\n" * 20)
    with pytest.raises(DataError) as info:
        _load(tmp_path, "pneumoniamnist")
    _assert_unreadable(info, path)


def test_empty_file(tmp_path: Path) -> None:
    path = npz_path(tmp_path, "pneumoniamnist")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"")
    with pytest.raises(DataError) as info:
        _load(tmp_path, "pneumoniamnist")
    _assert_unreadable(info, path)


def test_crc_mismatch_in_stored_member(tmp_path: Path) -> None:
    path = write_arrays(
        npz_path(tmp_path, "pneumoniamnist"), make_arrays("pneumoniamnist"), compressed=False
    )
    raw = bytearray(path.read_bytes())
    start = _member_data_offset(bytes(raw), 0)
    raw[start + 200 : start + 216] = bytes(16)  # inside the pixel data of train_images
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError) as info:
        _load(tmp_path, "pneumoniamnist")
    _assert_unreadable(info, path)


def test_object_array_is_refused(tmp_path: Path) -> None:
    arrays: dict[str, np.ndarray] = make_arrays("pneumoniamnist")
    arrays["train_labels"] = np.array([[1]] * 24, dtype=object)
    path = write_npz(tmp_path, "pneumoniamnist", arrays=arrays)
    with pytest.raises(DataError) as info:
        _load(tmp_path, "pneumoniamnist")
    _assert_unreadable(info, path)  # never unpickled


def _member_data_offset(raw: bytes, index: int) -> int:
    """Where the (compressed) data of the ``index``-th zip member starts."""
    member = zipfile.ZipFile(io.BytesIO(raw)).infolist()[index]
    start = member.header_offset
    name_len, extra_len = struct.unpack("<HH", raw[start + 26 : start + 30])
    return start + 30 + name_len + extra_len


def test_corrupt_compressed_member(tmp_path: Path) -> None:
    path = write_npz(tmp_path, "pneumoniamnist")
    raw = bytearray(path.read_bytes())
    raw[_member_data_offset(bytes(raw), 0)] = 0xFF  # deflate block type 3: invalid
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError) as info:
        _load(tmp_path, "pneumoniamnist")
    _assert_unreadable(info, path)


def test_npy_file_under_npz_name(tmp_path: Path) -> None:
    path = npz_path(tmp_path, "pneumoniamnist")
    path.parent.mkdir(parents=True)
    with path.open("wb") as fh:
        np.save(fh, np.zeros((24, 28, 28), np.uint8))
    with pytest.raises(DataError) as info:
        _load(tmp_path, "pneumoniamnist")
    assert str(path) in str(info.value)


# ------------------------------------------------------------------ download


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        self.server.requests.append(self.path)
        body = self.server.files.get(self.path)
        if body is None:
            self.send_error(404, "Not Found")
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.path in self.server.cut_short:
            self.wfile.write(body[: len(body) // 2])  # then hang up: an interrupted transfer
            self.close_connection = True
        else:
            self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, bytes] = {}
        self.cut_short: set[str] = set()
        self.requests: list[str] = []

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture
def server() -> Iterator[_Server]:
    srv = _Server()
    thread = threading.Thread(target=srv.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=5)


@pytest.fixture
def payload(tmp_path: Path) -> bytes:
    """The bytes of a valid synthetic pneumoniamnist.npz."""
    arrays = make_arrays("pneumoniamnist", seed=9)
    return write_arrays(tmp_path / "src" / "p.npz", arrays).read_bytes()


def _point_at(monkeypatch: pytest.MonkeyPatch, url: str, md5: str) -> None:
    def fake(flag: str, size: int) -> tuple[str, str]:
        medmnist._check_size(flag, size)
        return url, md5

    monkeypatch.setattr(medmnist, "url_and_md5", fake)


def _listing(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "medmnist").iterdir())


def test_download_writes_stream(server: _Server, payload: bytes) -> None:
    server.files["/f.npz"] = payload
    out = io.BytesIO()
    medmnist._download(server.base + "/f.npz", out, progress=False, timeout=5, label="f")
    assert out.getvalue() == payload


def test_fetch_good_download(
    server: _Server, payload: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hashlib

    server.files["/pneumoniamnist.npz"] = payload
    _point_at(monkeypatch, server.base + "/pneumoniamnist.npz", hashlib.md5(payload).hexdigest())
    root = tmp_path / "data"
    target = medmnist.fetch("pneumoniamnist", 28, root, progress=False, timeout=5)
    assert target == root / "medmnist" / "pneumoniamnist.npz"
    assert target.read_bytes() == payload
    assert _listing(root) == ["pneumoniamnist.npz"]  # no .part leftovers
    assert len(_load(root, "pneumoniamnist").train) == 24
    # A file already in place is used as is, without another request.
    assert medmnist.fetch("pneumoniamnist", 28, root, progress=False) == target
    assert server.requests == ["/pneumoniamnist.npz"]


def test_load_downloads_when_absent(
    server: _Server, payload: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server.files["/x"] = payload
    _point_at(monkeypatch, server.base + "/x", md5_of(tmp_path / "src" / "p.npz"))
    splits = load_dataset("pneumoniamnist", 28, tmp_path / "d", download=True, progress=False)
    assert splits.train.images.shape == (24, 1, 28, 28)
    assert (tmp_path / "d" / "medmnist" / "pneumoniamnist.npz").is_file()


def test_fetch_wrong_md5_leaves_nothing(
    server: _Server, payload: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server.files["/p.npz"] = payload
    url = server.base + "/p.npz"
    _point_at(monkeypatch, url, "0" * 32)
    with pytest.raises(DataError) as info:
        medmnist.fetch("pneumoniamnist", 28, tmp_path, progress=False, timeout=5)
    msg = str(info.value)
    assert msg == (
        f"download of pneumoniamnist.npz from {url} is corrupt: "
        f"MD5 {md5_of(tmp_path / 'src' / 'p.npz')}, expected {'0' * 32}"
    )
    assert _listing(tmp_path) == []
    # and load(), which fetches, reports the same and leaves nothing either
    with pytest.raises(DataError, match="MD5"):
        _load_with_download(tmp_path)
    assert _listing(tmp_path) == []


def _load_with_download(root: Path) -> Splits:
    return medmnist.load("pneumoniamnist", 28, root, download=True, progress=False)


def test_fetch_interrupted_download_leaves_nothing(
    server: _Server, payload: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server.files["/p.npz"] = payload
    server.cut_short.add("/p.npz")
    _point_at(monkeypatch, server.base + "/p.npz", md5_of(tmp_path / "src" / "p.npz"))
    with pytest.raises(DataError, match="is corrupt: MD5"):
        medmnist.fetch("pneumoniamnist", 28, tmp_path, progress=False, timeout=5)
    assert _listing(tmp_path) == []


def test_fetch_http_404(server: _Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = server.base + "/missing.npz"
    _point_at(monkeypatch, url, "0" * 32)
    with pytest.raises(DataError) as info:
        medmnist.fetch("pneumoniamnist", 28, tmp_path, progress=False, timeout=5)
    target = tmp_path / "medmnist" / "pneumoniamnist.npz"
    assert str(info.value) == (
        f"pneumoniamnist.npz is not in {target.parent} and could not be downloaded "
        f"(Not Found); fetch it from {url} and save it as {target}"
    )
    assert _listing(tmp_path) == []


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_fetch_unreachable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"http://127.0.0.1:{_closed_port()}/pneumoniamnist_64.npz"
    _point_at(monkeypatch, url, "0" * 32)
    root = tmp_path / "new" / "root"
    with pytest.raises(DataError) as info:
        medmnist.fetch("pneumoniamnist", 64, root, progress=False, timeout=5)
    msg = str(info.value)
    target = root / "medmnist" / "pneumoniamnist_64.npz"
    assert msg.startswith(f"pneumoniamnist_64.npz is not in {target.parent} and could not")
    assert "refused" in msg.lower()
    assert msg.endswith(f"fetch it from {url} and save it as {target}")
    assert _listing(root) == []


def test_fetch_cannot_create_directory(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(DataError) as info:
        medmnist.fetch("pneumoniamnist", 28, blocker, progress=False)
    assert str(info.value).startswith(f"cannot create data directory {blocker / 'medmnist'}")


# ---------------------------------------------------------------- real data


@pytest.mark.realdata
@pytest.mark.skipif(
    not REAL_PNEUMONIA.is_file(),
    reason=f"real MedMNIST file absent: {REAL_PNEUMONIA} (shared data sets not mounted)",
)
def test_real_pneumoniamnist() -> None:
    assert medmnist.md5sum(REAL_PNEUMONIA) == "28209eda62fecd6e6a2d98b1501bb15f"
    assert medmnist.md5sum(REAL_PNEUMONIA, chunk=4096) == md5_of(REAL_PNEUMONIA)
    splits = medmnist.load("pneumoniamnist", 28, SHARED, download=False, progress=False)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (4708, 524, 624)
    assert np.bincount(splits.train.labels).tolist() == [1214, 3494]
    assert np.bincount(splits.val.labels).tolist() == [135, 389]
    assert np.bincount(splits.test.labels).tolist() == [234, 390]
    assert splits.train.images.shape == (4708, 1, 28, 28)
    assert splits.train.images.dtype == np.uint8
    assert splits.spec.extra["n_samples"] == {"train": 4708, "val": 524, "test": 624}
    # fetch() finds it and does not download
    assert medmnist.fetch("pneumoniamnist", 28, SHARED, progress=False) == REAL_PNEUMONIA
