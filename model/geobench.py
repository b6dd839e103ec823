"""GEO-Bench datasets as evaluation tasks: ``python -m model.evaluate --tasks geobench:m-eurosat``.

Reads GEO-Bench's own file layout without the ``geobench`` package (whose dependencies are heavy):

    $GEO_BENCH_DIR/<benchmark>/<dataset>/      e.g. classification_v1.0/m-eurosat
        task_specs.pkl                         TaskSpecifications: bands_info, label_type, patch_size
        default_partition.json                 {"train": [...], "valid": [...], "test": [...]}
        <p>x_train_partition.json              label-efficiency partitions (0.01x_train, 0.20x_train, ...)
        band_stats.json                        {"<band name>": {"mean": .., "std": .., ...}, ...}
        <sample>.hdf5                          one dataset per band ("04 - Red", or "04 - Red_<date>" in
                                               time series), "label" for segmentation masks; attribute
                                               "pickle": str(pickle.dumps({"bands_order": [...],
                                               "<band>": {...}, "label": <int | 0/1 vector>}))

The pickles name geobench's classes (``geobench.dataset.Sentinel2``, ``geobench.label.Classification``,
...). They are read with a restricted unpickler that maps those names to plain attribute holders and
refuses every other global except numpy's array reconstruction, ``datetime``, ``affine.Affine`` and
``rasterio.crs.CRS``: a sample file cannot run code.

Band mapping to the encoder's 12 input bands (:data:`S2_NAMES`): each band by its GEO-Bench name,
B8 as B8 and B8A as B8A (MMEarth's evaluation swapped them relative to its pretraining order; we do
not). A band a dataset lacks is filled from its spectral neighbour as MMEarth's ``BAND_NAMES.json``
does for So2Sat: B1 from B2, B9 from B8A (:data:`FILL_FROM`). Values are normalised with the dataset's
own ``band_stats.json`` (mean and standard deviation per band, GEO-Bench's convention), so the product
level and scale of each source dataset (L1C, L2A, reflectance or DN) need no table here. Bands of a
coarser grid are resampled bilinearly to the largest band's shape. In a time series (m-cashew-plantation)
the first date in the sample's band order is used.
"""

from __future__ import annotations

import ast
import io
import json
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

# GEO-Bench's Sentinel-2 band names, in the encoder's input order (mmearth_data.registry model_bands)
S2_NAMES = {
    "B1": "01 - Coastal aerosol",
    "B2": "02 - Blue",
    "B3": "03 - Green",
    "B4": "04 - Red",
    "B5": "05 - Vegetation Red Edge",
    "B6": "06 - Vegetation Red Edge",
    "B7": "07 - Vegetation Red Edge",
    "B8": "08 - NIR",
    "B8A": "08A - Vegetation Red Edge",
    "B9": "09 - Water vapour",
    "B11": "11 - SWIR",
    "B12": "12 - SWIR",
}
# a band a dataset lacks, taken from its spectral neighbour (MMEarth's So2Sat mapping)
FILL_FROM = {"B1": "B2", "B9": "B8A"}
# the datasets of GEO-Bench v1.0 with Sentinel-2 input, and their label kinds
DATASETS = {
    "m-eurosat": "single-label",
    "m-so2sat": "single-label",
    "m-brick-kiln": "single-label",
    "m-bigearthnet": "multi-label",
    "m-cashew-plantation": "segmentation",
    "m-SA-crop-type": "segmentation",
}
SPLITS = {"train": "train", "val": "valid", "test": "test"}


class GeoBenchError(ValueError):
    """A GEO-Bench dataset that is missing or cannot be read as GEO-Bench writes it."""


class _Record:
    """A plain stand-in for one of geobench's pickled classes: its attributes, nothing else."""

    _geobench_class = ""

    def __setstate__(self, state):
        if isinstance(state, tuple):  # (dict, slots)
            state = {**(state[0] or {}), **(state[1] or {})}
        self.__dict__.update(state or {})


_RECORDS: dict[str, type] = {}


def _record_class(name: str) -> type:
    if name not in _RECORDS:
        _RECORDS[name] = type(name, (_Record,), {"_geobench_class": name})
    return _RECORDS[name]


class _Opaque:
    """``affine.Affine`` / ``rasterio.crs.CRS`` in band metadata: kept, not interpreted."""

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state


def _ndarray_reconstruct(subtype, shape, dtype):
    if subtype is not np.ndarray:
        raise pickle.UnpicklingError(f"ndarray subclass {subtype!r} in a GEO-Bench pickle")
    return np.ndarray.__new__(np.ndarray, shape, dtype)


def _dtype(*args, **kwargs):
    d = np.dtype(*args, **kwargs)
    if d.hasobject:
        raise pickle.UnpicklingError("object dtype in a GEO-Bench pickle")
    return d


def _scalar(dtype, data=None):
    if np.dtype(dtype).hasobject:
        raise pickle.UnpicklingError("object dtype in a GEO-Bench pickle")
    return np.frombuffer(data, dtype=dtype, count=1)[0] if data is not None else np.dtype(dtype).type()


_GEOBENCH_MODULES = ("geobench", "ccb")
_NUMPY = {
    ("numpy", "dtype"): _dtype,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy.core.multiarray", "_reconstruct"): _ndarray_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _ndarray_reconstruct,
    ("numpy.core.multiarray", "scalar"): _scalar,
    ("numpy._core.multiarray", "scalar"): _scalar,
}
_PLAIN = {("datetime", n) for n in ("date", "datetime", "time", "timedelta", "timezone")} | {
    ("collections", "OrderedDict")
}


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _NUMPY:
            return _NUMPY[(module, name)]
        if (module, name) in _PLAIN:
            return super().find_class(module, name)
        if (module, name) in {("affine", "Affine"), ("rasterio.crs", "CRS")}:
            return _Opaque
        if module.split(".")[0] in _GEOBENCH_MODULES:
            return _record_class(name)
        raise pickle.UnpicklingError(
            f"{module}.{name} is not part of GEO-Bench's file format; refusing to load this file"
        )


def _loads(data: bytes) -> Any:
    return _Unpickler(io.BytesIO(data)).load()


def _attr_pickle(text) -> Any:
    """GEO-Bench's sample attribute: the ``str()`` of a pickle's bytes (``b'...'``)."""
    if isinstance(text, bytes):
        text = text.decode()
    raw = ast.literal_eval(text)
    if not isinstance(raw, bytes):
        raise GeoBenchError("the sample's 'pickle' attribute does not hold a bytes literal")
    return _loads(raw)


def default_root() -> Path:
    """``$GEO_BENCH_DIR``, else geobench's own default ``~/dataset/geobench``."""
    return Path(os.environ.get("GEO_BENCH_DIR") or Path.home() / "dataset" / "geobench")


def find_dataset(name: str, root: str | Path | None = None) -> Path:
    """The directory of dataset ``name`` under any ``<benchmark>`` of the GEO-Bench root (the newest
    benchmark version when several hold it)."""
    root = Path(root) if root else default_root()
    hits = sorted(p for p in root.glob(f"*/{name}") if (p / "task_specs.pkl").exists())
    if not hits:
        known = ", ".join(sorted(DATASETS))
        raise GeoBenchError(
            f"GEO-Bench dataset {name!r} not found under {root} (looked for {root}/*/{name}/task_specs.pkl);"
            f" download GEO-Bench (`geobench-download`) and set GEO_BENCH_DIR or --geobench-dir."
            f" Datasets with Sentinel-2 input: {known}"
        )
    return hits[-1]


@dataclass
class GeoBenchDataset:
    """One GEO-Bench dataset read in the encoder's band order, normalised with its band statistics."""

    path: Path
    name: str
    kind: str
    n_classes: int
    class_names: list[str] | None
    partitions: dict[str, Path]
    mean: np.ndarray
    std: np.ndarray
    source: list[str]  # per encoder band: the GEO-Bench band it is read from
    filled: dict[str, str] = field(default_factory=dict)

    @classmethod
    def open(cls, name: str, root: str | Path | None = None, bands=tuple(S2_NAMES)) -> GeoBenchDataset:
        path = find_dataset(name, root)
        try:
            with open(path / "task_specs.pkl", "rb") as f:
                spec = _Unpickler(f).load()
        except (pickle.UnpicklingError, EOFError, AttributeError) as err:
            raise GeoBenchError(f"{path}/task_specs.pkl: {err}") from err
        label = getattr(spec, "label_type", None)
        kind = {
            "Classification": "single-label",
            "MultiLabelClassification": "multi-label",
            "SemanticSegmentation": "segmentation",
            "SegmentationClasses": "segmentation",
        }.get(getattr(label, "_geobench_class", ""))
        if kind is None:
            raise GeoBenchError(
                f"{path}: label type {getattr(label, '_geobench_class', label)!r} is not a classification or"
                " segmentation label"
            )
        names = [b.name for b in spec.bands_info]
        have = {k: v for k, v in S2_NAMES.items() if v in names}
        source, filled = [], {}
        for b in bands:
            if b in have:
                source.append(have[b])
            elif FILL_FROM.get(b) in have:
                source.append(have[FILL_FROM[b]])
                filled[b] = FILL_FROM[b]
            else:
                raise GeoBenchError(
                    f"{path}: no Sentinel-2 band {b} ({S2_NAMES.get(b, '?')}) and no neighbour to fill it"
                    f" the dataset's bands are {names}"
                )
        try:
            stats = json.loads((path / "band_stats.json").read_text())
            mean = np.array([stats[s]["mean"] for s in source], np.float32)
            std = np.array([stats[s]["std"] for s in source], np.float32)
        except (OSError, KeyError, json.JSONDecodeError) as err:
            raise GeoBenchError(
                f"{path}/band_stats.json: missing or lacks mean/std of a band ({err})"
            ) from err
        partitions = {p.name[: -len("_partition.json")]: p for p in path.glob("*_partition.json")}
        if "default" not in partitions:
            raise GeoBenchError(f"{path}: no default_partition.json")
        n_classes = int(label.n_classes)
        class_names = getattr(label, "_class_names", None) or getattr(label, "class_name", None)
        return cls(path, name, kind, n_classes, class_names, partitions, mean, std, source, filled)

    def split_names(self, fraction: float = 1.0) -> dict[str, list[str]]:
        """Sample names of train / val / test. With ``fraction`` < 1 the train list comes from GEO-Bench's
        own label-efficiency partition ``<fraction>x_train`` when the dataset ships it (None otherwise)."""
        part = self.partitions["default"]
        if fraction < 1.0:
            key = f"{fraction:.2f}x_train"
            if key not in self.partitions:
                return {}
            part = self.partitions[key]
        d = json.loads(part.read_text())
        return {ours: list(d.get(theirs, [])) for ours, theirs in SPLITS.items()}

    def read(self, sample: str) -> tuple[np.ndarray, Any]:
        """(normalised ``[12, H, W]`` float32 image, label: int, 0/1 vector or ``[H, W]`` mask)."""
        p = self.path / f"{sample}.hdf5"
        try:
            with h5py.File(p, "r") as f:
                attrs = _attr_pickle(f.attrs["pickle"])
                order = list(attrs.get("bands_order", f.keys()))
                first = {}
                for key in order:  # band name, or "<name>_<date>" in a time series: first date wins
                    base = next((n for n in self.source if key == n or key.startswith(n + "_")), None)
                    if base is not None and base not in first:
                        first[base] = key
                arrays = {n: np.asarray(f[k][()], np.float32) for n, k in first.items()}
                label = np.asarray(f["label"][()]) if "label" in f else attrs.get("label")
        except (OSError, pickle.UnpicklingError, SyntaxError, ValueError) as err:
            raise GeoBenchError(f"{p}: cannot read ({err})") from err
        except KeyError as err:
            raise GeoBenchError(f"{p}: no {err} in the sample") from err
        missing = sorted(set(self.source) - set(arrays))
        if missing:
            raise GeoBenchError(f"{p}: bands {missing} listed in task_specs.pkl are not in the sample")
        shape = max((a.shape[:2] for a in arrays.values()), key=lambda s: s[0] * s[1])
        planes = [_resize(_plane(arrays[s]), shape) for s in self.source]
        x = (np.stack(planes) - self.mean[:, None, None]) / np.maximum(self.std[:, None, None], 1e-6)
        if self.kind == "segmentation":
            label = np.asarray(label).reshape(label.shape[:2]).astype(np.int64)
        elif self.kind == "multi-label":
            label = np.asarray(label, np.float32).reshape(-1)
        else:
            label = int(label)
        return x.astype(np.float32), label


def _plane(a: np.ndarray) -> np.ndarray:
    return a[..., 0] if a.ndim == 3 else a


def _resize(a: np.ndarray, shape) -> np.ndarray:
    if a.shape == tuple(shape):
        return a
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(a))[None, None]
    return F.interpolate(t, size=tuple(shape), mode="bilinear", align_corners=False)[0, 0].numpy()
