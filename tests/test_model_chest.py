"""The chest_pneumonia model: committed weights, eval-file AUC, the DICOM inference path, applicability."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless, generate_uid

from helpers import datasets_dir
from teleread.errors import InvalidInput
from teleread.models.inference import chest_xray, registry
from teleread.models.training.metrics import auc

EVAL = datasets_dir() / "pneumoniamnist-test-eval.npz"
MIN_EVAL_AUC = 0.96  # measured 0.975 [0.958, 0.988] on the 425 eval images (see models/cards/chest_pneumonia.md)
PROB_TOLERANCE = 0.02  # the same pixels, so only window rounding may move it
SMOOTH_TOLERANCE = 0.15  # bilinear up then area down blurs a 28-px image: measured up to 0.11


@pytest.fixture(scope="module")
def model() -> chest_xray.ChestModel:
    return registry.get("chest_pneumonia")


@pytest.fixture(scope="module")
def eval_data() -> tuple[np.ndarray, np.ndarray]:
    with np.load(EVAL) as d:
        return d["images"], d["labels"].astype(np.int64)


def make_dx(
    img28: np.ndarray,
    *,
    size: int = 512,
    monochrome1: bool = False,
    resample: Image.Resampling = Image.Resampling.NEAREST,
    **attrs: object,
) -> Dataset:
    """A 16-bit DX dataset holding ``img28`` upsampled, with a rescale and two windows (the first fits).

    Nearest-neighbour upsampling makes the path's area resize give the 28-px image back exactly, so any
    difference comes from the DICOM handling itself.
    """
    up = np.asarray(Image.fromarray(img28.astype(np.float32), mode="F").resize((size, size), resample))
    stored = np.round(up * 100 + 500)
    centre, width = 127.5 * 50, 256 * 50  # in modality units: 0.5 * stored - 250 = 50 * pixel
    if monochrome1:
        stored = 26500 - stored  # modality values 12750 - 50 * pixel: the same window, mirrored
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.1.1")  # DX for presentation
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.BodyPartExamined = "CHEST"
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = 0.5, -250
    ds.WindowCenter = [centre, 3000]
    ds.WindowWidth = [width, 1000]
    ds.PixelData = stored.astype(np.uint16).tobytes()
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def _roundtrip(ds: Dataset) -> Dataset:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    buf.seek(0)
    return pydicom.dcmread(buf)


def test_weights_load_and_card(model: chest_xray.ChestModel) -> None:
    assert model.card.name == "chest_pneumonia"
    assert 0 < model.decision < 1 and 0 < model.urgent <= model.decision
    assert "validation" in model.card.metrics and "evaluation" in model.card.metrics


def test_eval_auc(model: chest_xray.ChestModel, eval_data: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = eval_data
    prob = model.probabilities(images)
    assert prob.shape == (425,) and np.all((prob >= 0) & (prob <= 1))
    assert auc(labels, prob) >= MIN_EVAL_AUC


def test_predict_outputs(model: chest_xray.ChestModel, eval_data: tuple[np.ndarray, np.ndarray]) -> None:
    images, _ = eval_data
    preds = model.predict_batch(list(images[:4]))
    for p, img in zip(preds, images[:4]):
        assert p.label == ("pneumonia" if p.probability >= model.decision else "normal")
        assert p.saliency.shape == (28, 28) and p.saliency.min() >= 0 and p.saliency.max() <= 1
        assert len(p.regions) == 3 and p.regions[0][1] >= p.regions[1][1] >= p.regions[2][1]
        assert all(name in sum(chest_xray.ZONE_NAMES, ()) for name, _ in p.regions)
        assert abs(p.probability - model.predict(img).probability) < 1e-5
        assert chest_xray.saliency_png(p, img).startswith(b"\x89PNG")


@pytest.mark.parametrize("variant", ["mono2", "mono1", "rle", "j2k", "mono1-rle-file"])
def test_dicom_variants_match_eval_image(
    model: chest_xray.ChestModel, eval_data: tuple[np.ndarray, np.ndarray], variant: str
) -> None:
    images, _ = eval_data
    for i in (0, 7, 100):
        ds = make_dx(images[i], monochrome1=variant.startswith("mono1"))
        if variant in ("rle", "mono1-rle-file"):
            ds.compress(RLELossless)
        elif variant == "j2k":
            ds.compress(JPEG2000Lossless)
        if variant.endswith("file"):
            ds = _roundtrip(ds)
        x = chest_xray.pixels_to_input(ds)
        assert x.shape == (28, 28) and x.dtype == np.float32
        # JPEG 2000 is decoded at a lower wavelet level (a low-pass, not the box average): a few grey levels
        assert np.abs(x - images[i]).max() <= (8.0 if variant == "j2k" else 1.0)
        pred = model.predict_dicom(ds)
        assert isinstance(pred, chest_xray.ChestPrediction)
        assert abs(pred.probability - model.predict(images[i]).probability) < PROB_TOLERANCE


def test_smooth_upsampling_stays_close(model: chest_xray.ChestModel, eval_data: tuple[np.ndarray, np.ndarray]) -> None:
    images, _ = eval_data
    for i in (0, 7, 100):
        ds = make_dx(images[i], resample=Image.Resampling.BILINEAR)
        ds.compress(JPEG2000Lossless)
        pred = model.predict_dicom(ds)
        assert isinstance(pred, chest_xray.ChestPrediction)
        assert abs(pred.probability - model.predict(images[i]).probability) < SMOOTH_TOLERANCE


def test_first_frame_and_rgb(model: chest_xray.ChestModel, eval_data: tuple[np.ndarray, np.ndarray]) -> None:
    images, _ = eval_data
    ref = model.predict(images[3]).probability
    ds = make_dx(images[3], size=256)
    frame = np.frombuffer(ds.PixelData, np.uint16)
    ds.NumberOfFrames = 2
    ds.PixelData = np.concatenate([frame, np.zeros_like(frame)]).tobytes()
    assert abs(model.predict_dicom(ds).probability - ref) < PROB_TOLERANCE
    rgb = make_dx(images[3], size=256)
    grey = np.asarray(Image.fromarray(images[3]).resize((256, 256), Image.Resampling.NEAREST))
    for key in ("RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth"):
        delattr(rgb, key)
    rgb.SamplesPerPixel, rgb.PhotometricInterpretation, rgb.PlanarConfiguration = 3, "RGB", 0
    rgb.BitsAllocated, rgb.BitsStored, rgb.HighBit = 8, 8, 7
    rgb.PixelData = np.repeat(grey[..., None], 3, axis=2).tobytes()
    assert abs(model.predict_dicom(rgb).probability - ref) < PROB_TOLERANCE


def test_applies() -> None:
    img = np.zeros((28, 28), np.uint8)
    ok, reason = chest_xray.applies(make_dx(img, size=32, Modality="CT"))
    assert not ok and reason == "no model for this exam: modality CT"
    ok, reason = chest_xray.applies(make_dx(img, size=32, BodyPartExamined="KNEE"))
    assert not ok and reason == "no model for this exam: body part KNEE"
    assert chest_xray.applies(make_dx(img, size=32)) == (True, "chest radiograph")
    ds = make_dx(img, size=32, StudyDescription="CHEST PA")
    del ds.BodyPartExamined
    assert chest_xray.applies(ds)[0]
    ds.StudyDescription = "WRIST 2 VIEWS"
    assert chest_xray.applies(ds) == (False, "no model for this exam: body part not stated")
    assert chest_xray.applies(make_dx(img, size=32, Modality="CR", BodyPartExamined="THORAX"))[0]


def test_not_applicable_returns_reason(model: chest_xray.ChestModel) -> None:
    ds = make_dx(np.zeros((28, 28), np.uint8), size=32, Modality="CT")
    assert model.predict_dicom(ds) == "no model for this exam: modality CT"


@pytest.mark.parametrize("compressed", [False, True])
def test_undecodable_pixels(model: chest_xray.ChestModel, compressed: bool) -> None:
    ds = make_dx(np.full((28, 28), 120, np.uint8), size=64, PatientName="Doe^Jane")
    if compressed:
        ds.compress(JPEG2000Lossless)
        ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]
    else:
        ds.PixelData = ds.PixelData[:1000]
    with pytest.raises(InvalidInput) as err:
        model.predict_dicom(ds)
    assert "Doe" not in str(err.value) and err.value.reason == "UNDECODABLE_PIXEL_DATA"


def test_jpeg2000_reduced_decode_matches_the_full_decode(
    model: chest_xray.ChestModel, eval_data: tuple[np.ndarray, np.ndarray]
) -> None:
    images, _ = eval_data
    ds = make_dx(images[7])
    ds.compress(JPEG2000Lossless)
    reduced = chest_xray._decode_j2k_reduced(ds)
    assert reduced is not None and reduced.shape[0] < int(ds.Rows)  # the fast path ran, at a lower level
    full = chest_xray.pixels_to_input(ds)
    ds.decompress()  # the same pixels through pydicom's full decoder
    assert np.abs(chest_xray.pixels_to_input(ds) - full).max() <= 8.0
