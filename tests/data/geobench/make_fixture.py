"""Write a tiny GEO-Bench in GEO-Bench's own file layout: ``python make_fixture.py OUT_DIR``.

Four datasets, each a handful of samples, written the way geobench's ``write_sample_hdf5`` and
``TaskSpecifications.save`` write them: one HDF5 file per sample (a dataset per band, named by the
band's name, with ``_<date>`` in a time series; ``label`` for a segmentation mask), the sample's
metadata as ``str(pickle.dumps({...}))`` in the file's ``pickle`` attribute, ``task_specs.pkl``
(protocol 4), ``default_partition.json`` and a label-efficiency partition, ``band_stats.json``.

The pickles name geobench's classes (``geobench.dataset.Sentinel2``, ``geobench.label.Classification``,
``geobench.task.TaskSpecifications``) exactly as the package does; this script defines stand-ins under
those module names so that it runs without the package. Run it in its own process: it registers those
modules in ``sys.modules``.

Pixel values are a known function of (band, sample, row, column) so that a reader's band mapping can be
checked value by value: ``value(b, s, r, c) = 1000 + 100 * WAVELENGTH_RANK[b] + 10 * s + (r + c) % 7``
(plus the class signal below); a 20 m band is stored at half the size. ``band_stats.json`` gives every
band the mean :data:`STATS_MEAN` and its own standard deviation :func:`stats_std`. In a time series
each later date adds :data:`DATE_STEP`. Each single-label sample's class
``k`` adds ``40 * k`` to its red band, so that a classifier has something to find.

  classification_v1.0/m-eurosat       13 bands (B10 included), 32 px, 3 classes, 12 samples
  classification_v1.0/m-so2sat        10 bands (no B1, B9, B10), 32 px, 3 classes, 12 samples
  classification_v1.0/m-bigearthnet   12 bands (no B10), 20 m bands at 16 px, 5 labels, 12 samples
  segmentation_v1.0/m-cashew-plantation  13 bands x 2 dates, 32 px, 3 classes, 9 samples
"""

from __future__ import annotations

import datetime
import json
import pickle
import sys
import types
from pathlib import Path

import h5py
import numpy as np


def _module(name: str) -> types.ModuleType:
    mod = sys.modules.get(name) or types.ModuleType(name)
    sys.modules[name] = mod
    return mod


def _cls(module: str, name: str, init):
    c = type(name, (), {"__init__": init, "__module__": module})
    c.__qualname__ = name
    setattr(_module(module), name, c)
    return c


_module("geobench")


def _band_init(self, name=None, alt_names=(), spatial_resolution=None, wavelength=None):
    self.name, self.alt_names, self.spatial_resolution, self.wavelength = (
        name, tuple(alt_names), spatial_resolution, wavelength)  # fmt: skip


def _label_init(self, n_classes, class_names=None):
    self.n_classes = n_classes
    self._class_names = class_names


def _multilabel_init(self, n_classes, class_names=None):
    self.n_classes = n_classes
    self.class_name = class_names


def _seg_init(self, name, spatial_resolution, n_classes, class_names=None):
    self.name, self.alt_names, self.spatial_resolution = name, (), spatial_resolution
    self.n_classes, self._class_names = n_classes, class_names


def _spec_init(self, **kw):
    self.__dict__.update(kw)


Sentinel2 = _cls("geobench.dataset", "Sentinel2", _band_init)
SegmentationClasses = _cls("geobench.dataset", "SegmentationClasses", _seg_init)
Classification = _cls("geobench.label", "Classification", _label_init)
MultiLabelClassification = _cls("geobench.label", "MultiLabelClassification", _multilabel_init)
TaskSpecifications = _cls("geobench.task", "TaskSpecifications", _spec_init)

# geobench.dataset.sentinel2_13_bands: name, alt names, native resolution, wavelength
BANDS = [
    ("01 - Coastal aerosol", ("1", "01"), 60, 0.443),
    ("02 - Blue", ("2", "02", "blue"), 10, 0.49),
    ("03 - Green", ("3", "03", "green"), 10, 0.56),
    ("04 - Red", ("4", "04", "red"), 10, 0.665),
    ("05 - Vegetation Red Edge", ("5", "05"), 20, 0.705),
    ("06 - Vegetation Red Edge", ("6", "06"), 20, 0.74),
    ("07 - Vegetation Red Edge", ("7", "07"), 20, 0.783),
    ("08 - NIR", ("8", "08", "NIR"), 10, 0.842),
    ("08A - Vegetation Red Edge", ("8A", "08A"), 20, 0.865),
    ("09 - Water vapour", ("9", "09"), 60, 0.945),
    ("10 - SWIR - Cirrus", ("10",), 60, 1.375),
    ("11 - SWIR", ("11",), 20, 1.61),
    ("12 - SWIR", ("12",), 20, 2.19),
]
WAVELENGTH_RANK = {b[0]: i for i, b in enumerate(BANDS)}


def value(band: str, sample: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """The fixture's pixel value of ``band`` in sample ``sample`` (see the module docstring)."""
    return 1000 + 100 * WAVELENGTH_RANK[band] + 10 * sample + (rows[:, None] + cols[None, :]) % 7


DATE_STEP = 500  # a time series' later dates are brighter by this much per date
STATS_MEAN = 1000.0  # band_stats.json: one mean for every band, so a normalised value still names its band


def stats_std(band: str) -> float:
    """The fixture's band_stats.json standard deviation of ``band``."""
    return 50.0 + WAVELENGTH_RANK[band]


def _bands(drop=()):
    return [Sentinel2(n, a, r, w) for n, a, r, w in BANDS if n not in drop]


def _write_dataset(d: Path, name: str, bands, label_type, n: int, size: int, coarse: bool,
                   dates=(None,), make_label=None) -> None:  # fmt: skip
    d.mkdir(parents=True, exist_ok=True)
    spec = TaskSpecifications(dataset_name=name, benchmark_name=d.parent.name, bands_info=bands,
                              spatial_resolution=10, patch_size=(size, size), n_time_steps=len(dates),
                              label_type=label_type)  # fmt: skip
    with open(d / "task_specs.pkl", "wb") as f:
        pickle.dump(spec, f, protocol=4)
    names = [f"{name}_{i:03d}" for i in range(n)]
    for s, sname in enumerate(names):
        label = make_label(s)
        attrs, order = {}, []
        with h5py.File(d / f"{sname}.hdf5", "w") as f:
            for di, date in enumerate(dates):
                for b in bands:
                    px = size // 2 if (coarse and b.spatial_resolution == 20) else size
                    r = np.arange(px)
                    data = (value(b.name, s, r, r) + DATE_STEP * di).astype(np.int16)
                    if isinstance(label, int) and b.name == "04 - Red":
                        data = data + np.int16(40 * label)
                    key = b.name if date is None else f"{b.name}_{date.isoformat()}"
                    f.create_dataset(key, data=data)
                    order.append(key)
                    attrs[key] = dict(date=date, date_id=date, spatial_resolution=10.0, band_info=b,
                                      meta_info=None, transform=None, crs=None)  # fmt: skip
            if isinstance(label, np.ndarray) and label.ndim == 2:
                f.create_dataset("label", data=label)
                order.append("label")
                attrs["label"] = dict(date=None, date_id=None, spatial_resolution=10.0, band_info=label_type,
                                      meta_info=None, transform=None, crs=None)  # fmt: skip
            else:
                attrs["label"] = label
            attrs["bands_order"] = order
            f.attrs["pickle"] = str(pickle.dumps(attrs))
    k = len(names)
    part = {"train": names[: k // 2], "valid": names[k // 2 : 3 * k // 4], "test": names[3 * k // 4 :]}
    (d / "default_partition.json").write_text(json.dumps(part, indent=2))
    half = dict(part, train=part["train"][: len(part["train"]) // 2])
    (d / "0.50x_train_partition.json").write_text(json.dumps(half, indent=2))
    stats = {b.name: {"mean": STATS_MEAN, "std": stats_std(b.name), "min": 0.0, "max": 3000.0} for b in bands}
    (d / "band_stats.json").write_text(json.dumps(stats, indent=4, sort_keys=True))


def main(out: str) -> None:
    root = Path(out)
    cls3 = Classification(3, ["a", "b", "c"])
    _write_dataset(root / "classification_v1.0" / "m-eurosat", "m-eurosat", _bands(), cls3, 12, 32, False,
                   make_label=lambda s: s % 3)  # fmt: skip
    _write_dataset(root / "classification_v1.0" / "m-so2sat", "m-so2sat",
                   _bands(("01 - Coastal aerosol", "09 - Water vapour", "10 - SWIR - Cirrus")),
                   Classification(3, ["a", "b", "c"]), 12, 32, False, make_label=lambda s: s % 3)  # fmt: skip
    _write_dataset(root / "classification_v1.0" / "m-bigearthnet", "m-bigearthnet",
                   _bands(("10 - SWIR - Cirrus",)), MultiLabelClassification(5), 12, 32, True,
                   make_label=lambda s: (np.arange(5) <= s % 5).astype(np.int64))  # fmt: skip

    def mask(s):
        m = np.zeros((32, 32), np.int64)
        m[: 8 + s, :] = 1
        m[:, :6] = 2
        return m

    dates = (datetime.date(2019, 11, 3), datetime.date(2020, 1, 12))
    _write_dataset(root / "segmentation_v1.0" / "m-cashew-plantation", "m-cashew-plantation", _bands(),
                   SegmentationClasses("label", 10, 3, ["bg", "cashew", "other"]), 9, 32, False,
                   dates=dates, make_label=mask)  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1])
