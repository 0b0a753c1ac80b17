import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from src.callbacks.confounder_update import ConfounderUpdate
from src.models.context import CONFOUNDERS_FILE, Confounders

SIZE = (3, 4)
NAMES = ["cat", "dog", "owl"]  # "owl" is in no image: its confounder must be zeros, not NaN
# Small (h, w) maps; each image's full-size mask is a block upsampling of it, so the nearest
# resize back to SIZE is exact and the expected centers can be computed on the small maps.
SMALL = {
    "a": np.array([[0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]], np.uint8),
    "b": np.array([[2, 2, 0, 0], [2, 2, 0, 0], [0, 0, 0, 1]], np.uint8),
    "c": np.array([[0, 0, 0, 0], [0, 2, 2, 0], [0, 2, 2, 0]], np.uint8),
    "d": np.array([[1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]], np.uint8),
    "e": np.zeros(SIZE, np.uint8),  # predicted all background
}
LABELS = {"a": [1, 0, 0], "b": [1, 1, 0], "c": [0, 1, 0], "d": [1, 0, 0], "e": [0, 1, 0]}
BLOCK = {"a": 2, "b": 3, "c": 1, "d": 4, "e": 2}  # different full-image sizes


def full_mask(image_id):
    k = BLOCK[image_id]
    return np.kron(SMALL[image_id], np.ones((k, k), np.uint8))


class FakeSegmenter(L.LightningModule):
    """predict_step returns the known full-size masks, like SegmenterModule.predict_step."""

    def __init__(self, sampler: str = "none"):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.sampler = sampler

    def predict_step(self, batch, batch_idx):
        return [{"id": i, "mask": full_mask(i)} for i in batch["id"]]

    def predict_dataloader(self):
        data = [
            {"id": i, "label": torch.tensor(LABELS[i], dtype=torch.float32)} for i in sorted(SMALL)
        ]
        # Built after the process group exists: DistributedSampler pads 5 images to 6, so one
        # image is predicted twice.
        sampler = DistributedSampler(data, shuffle=False) if self.sampler == "dist" else None
        return DataLoader(data, batch_size=2, sampler=sampler)


def expected():
    ids = sorted(SMALL)
    centers = np.zeros((3, *SIZE))
    counts = np.zeros(3, int)
    for i in ids:
        for c in np.flatnonzero(LABELS[i]):
            centers[c] += SMALL[i] == c + 1
            counts[c] += 1
    centers[counts > 0] /= counts[counts > 0, None, None]
    return ids, centers, counts


def run_predict(out_dir, **trainer_kwargs):
    callback = ConfounderUpdate(
        out_dir, size=SIZE, num_classes=3, class_names=NAMES, dataset_name="fake"
    )
    kwargs = {"accelerator": "cpu", "devices": 1, **trainer_kwargs}
    trainer = L.Trainer(
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[callback],
        **kwargs,
    )
    sampler = "dist" if kwargs["devices"] > 1 else "none"
    trainer.predict(FakeSegmenter(sampler), return_predictions=False)
    return callback


def load(out_dir):
    return Confounders.load(out_dir, expected_dataset="fake", expected_num_classes=3)


def test_single_process_confounders(tmp_path):
    callback = run_predict(tmp_path)
    conf = load(tmp_path)
    ids, centers, counts = expected()
    assert conf.ids == ids and conf.class_names == NAMES and conf.size == SIZE
    np.testing.assert_allclose(conf.centers, centers, atol=1e-6)
    assert conf.counts.tolist() == counts.tolist() == [3, 3, 0]
    assert (conf.centers[2] == 0).all() and np.isfinite(conf.centers).all()
    np.testing.assert_allclose(conf.prior, [1 / 3] * 3)
    for i in ids:  # "foreground" encoding
        np.testing.assert_array_equal(conf.mask_for(i), (SMALL[i] > 0).astype(np.float32))
    assert callback.result is not None and callback.result.ids == ids


def test_class_id_encoding_and_empirical_prior(tmp_path):
    callback = ConfounderUpdate(
        tmp_path,
        size=SIZE,
        num_classes=3,
        class_names=NAMES,
        dataset_name="fake",
        encoding="class_id",
        prior="empirical",
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[callback],
    )
    trainer.predict(FakeSegmenter(), return_predictions=False)
    conf = load(tmp_path)
    np.testing.assert_allclose(conf.prior, [0.5, 0.5, 0.0])
    np.testing.assert_allclose(conf.mask_for("b"), SMALL["b"] / 3)


def test_duplicates_count_once(tmp_path):
    callback = ConfounderUpdate(tmp_path, size=SIZE, num_classes=3, class_names=NAMES)
    batch = {"id": ["a", "a"], "label": torch.tensor([LABELS["a"]] * 2, dtype=torch.float32)}
    outputs = [{"id": "a", "mask": full_mask("a")}] * 2
    callback.on_predict_batch_end(None, None, outputs, batch, 0)
    callback.on_predict_batch_end(None, None, outputs[:1], {**batch, "id": ["a"]}, 1)
    assert list(callback._preds) == ["a"]


def test_bad_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="class names"):
        ConfounderUpdate(tmp_path, num_classes=3, class_names=["bg", *NAMES])
    with pytest.raises(ValueError, match="encoding"):
        ConfounderUpdate(tmp_path, num_classes=3, encoding="onehot")
    callback = ConfounderUpdate(tmp_path, size=SIZE, num_classes=3)
    with pytest.raises(ValueError, match="4 classes"):
        callback.on_predict_batch_end(None, None, [], {"label": torch.zeros(1, 4)}, 0)
    with pytest.raises(ValueError, match="list of"):
        callback.on_predict_batch_end(None, None, None, {"label": torch.zeros(1, 3)}, 0)


@pytest.mark.slow
def test_ddp_equals_single_process(tmp_path):
    run_predict(tmp_path / "single")
    run_predict(tmp_path / "ddp", devices=2, strategy="ddp_spawn", use_distributed_sampler=False)
    single, ddp = load(tmp_path / "single"), load(tmp_path / "ddp")
    assert ddp.ids == single.ids
    np.testing.assert_array_equal(ddp.centers, single.centers)
    np.testing.assert_array_equal(ddp.counts, single.counts)
    np.testing.assert_array_equal(ddp.codes, single.codes)
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == [
        "confounders.json",
        CONFOUNDERS_FILE,
    ]
