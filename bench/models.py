"""Inference benchmark of the learned triage models on this machine's CPU.

Measures, after a one-time load (reported separately), with one torch thread per process as the
hub's triage worker processes run:

- ECG models: the rhythm model on a 30-s single-lead record (300 Hz), and the rhythm + 12-lead
  models on a 10-s 12-lead record at 500 Hz (field-like; PTB-XL evaluation records upsampled);
- the whole ECG triage of one exam from files (WFDB load, measurement, models, fusion), alone and
  in batches of 8, per exam;
- the chest model from a DICOM dataset (decode, VOI/windowing, resize, forward, saliency) at
  512 x 512 and 2048 x 2048, uncompressed and JPEG 2000.

Targets (issue 3): <= 50 ms per ECG and <= 100 ms per chest image, excluding the model load.

    .venv/bin/python -m bench.models [--repeats 50] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from bench._report import machine


def _timeit(fn: Callable[[], Any], repeats: int, warmup: int = 3) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1000)
    samples.sort()
    return {
        "p50_ms": statistics.median(samples),
        "p95_ms": samples[min(len(samples) - 1, int(0.95 * len(samples)))],
        "mean_ms": statistics.fmean(samples),
        "n": len(samples),
    }


def _upsample(x: np.ndarray, factor: int) -> np.ndarray:
    from scipy.signal import resample_poly

    return resample_poly(x, factor, 1, axis=0)


def _dx_dataset(image28: np.ndarray, size: int, *, jpeg2000: bool) -> Any:
    from PIL import Image
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid

    from pydicom import Dataset

    big = np.asarray(Image.fromarray(image28).resize((size, size), Image.BICUBIC), dtype=np.uint16) * 16
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.SOPInstanceUID = generate_uid()
    ds.Modality, ds.BodyPartExamined = "DX", "CHEST"
    ds.Rows, ds.Columns = size, size
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.PixelData = big.tobytes()
    if jpeg2000:
        ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
    return ds


def run(datasets: Path, repeats: int) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    from teleread.models.inference import pipeline, registry
    from teleread.models.inference.synthetic import write_wfdb_record

    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    rhythm = registry.get("ecg_rhythm")
    twelve = registry.get("ecg_12lead")
    chest = registry.get("chest_pneumonia")
    out["model_load_s"] = round(time.perf_counter() - t0, 3)

    cinc = np.load(datasets / "cinc2017-eval.npz")
    sig = cinc["signal"][cinc["offsets"][0] : cinc["offsets"][0] + 9000].astype(np.float64) / 1000.0
    out["rhythm_single_lead_30s_300Hz"] = _timeit(lambda: rhythm.predict(sig, 300.0), repeats)

    ptb = np.load(datasets / "ptbxl-fold10-eval.npz")
    x500 = _upsample(ptb["X"][0].astype(np.float64) / 1000.0, 5)
    leads = [str(n) for n in ptb["lead_names"]]
    out["rhythm_3_leads_12lead_10s_500Hz"] = _timeit(lambda: rhythm.predict_leads(x500, 500.0, leads), repeats)
    out["twelve_lead_10s_500Hz"] = _timeit(lambda: twelve.predict(x500, 500.0, leads), repeats)

    def both() -> None:
        rhythm.predict_leads(x500, 500.0, leads)
        twelve.predict(x500, 500.0, leads)

    out["ecg_models_per_12lead_ecg"] = _timeit(both, repeats)

    with tempfile.TemporaryDirectory() as tmp:
        items = []
        for i in range(8):
            x = _upsample(ptb["X"][i].astype(np.float64) / 1000.0, 5)
            hea, dat = write_wfdb_record(Path(tmp), f"r{i}", x, fs=500.0, lead_names=leads)
            items.append(
                {"files": {"wfdb_header": str(hea), "wfdb_signal": str(dat)}, "priority": "routine", "indication": ""}
            )
        out["ecg_triage_per_exam_batch1"] = _timeit(lambda: pipeline.triage_ecg_batch(items[:1]), repeats)
        per8 = _timeit(lambda: pipeline.triage_ecg_batch(items), max(5, repeats // 8))
        out["ecg_triage_per_exam_batch8"] = {k: (v / 8 if k.endswith("_ms") else v) for k, v in per8.items()}

    pm = np.load(datasets / "pneumoniamnist-test-eval.npz")
    img = pm["images"][0]
    for size in (512, 2048):
        for j2k in (False, True):
            ds = _dx_dataset(img, size, jpeg2000=j2k)
            name = f"chest_dicom_{size}px_{'j2k' if j2k else 'raw'}"
            out[name] = _timeit(lambda ds=ds: chest.predict_dicom(ds), max(10, repeats // 2))
    return out


def main(argv: list[str] | None = None) -> int:
    from teleread.models.training.evaluate import default_datasets

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None, help="evaluation files folder (default ../shared/datasets)")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    info = machine()
    figures = run(args.data or default_datasets(), args.repeats)
    targets = {"ecg_models_per_12lead_ecg": 50.0, "ecg_triage_per_exam_batch1": 50.0}
    targets.update({k: 100.0 for k in figures if k.startswith("chest_dicom")})
    print(f"model load (all three, once per process): {figures['model_load_s']:.2f} s")
    print(f"{'figure':40s} {'p50 ms':>8s} {'p95 ms':>8s} {'mean ms':>8s}  target")
    for name, f in figures.items():
        if not isinstance(f, dict):
            continue
        target = targets.get(name)
        verdict = "" if target is None else f"<= {target:g} ms {'met' if f['p95_ms'] <= target else 'MISSED'} (p95)"
        print(f"{name:40s} {f['p50_ms']:8.1f} {f['p95_ms']:8.1f} {f['mean_ms']:8.1f}  {verdict}")
    import os

    import torch

    print(
        f"machine: {info['cpu']}, {info['cores']} cores, {info['ram_gb']} GB RAM, Python {info['python']}, "
        f"torch {torch.__version__} with 1 thread, Linux {info['kernel']}; load average (1 min) "
        f"{info['load_before']:.2f} before, {os.getloadavg()[0]:.2f} after; code at {info['commit'] or '?'}"
    )
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "figures": figures}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
