"""The modality registry: one declarative table that every other part derives from.

Data flow: ``registry`` -> sources (what to fetch and how to resample), store (array schema), statistics
(which bands are continuous), catalog (band metadata) and the model (one head and loss per target).
Adding a modality is one entry in :data:`MODALITIES`; nothing else names modalities by hand.

Band order is part of the contract. Sentinel-2 is stored in Earth Engine's order with ``B8`` before
``B8A`` (MMEarth's evaluation code swapped the two); ``B10`` exists only for L1C scenes and is fill for
L2A ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Literal

import numpy as np

Kind = Literal["pixel", "tile"]
Resampling = Literal["bilinear", "nearest"]
Codec = Literal["blosc", "pcodec"]


@dataclass(frozen=True)
class EERecipe:
    """How the Earth Engine source obtains a modality.

    ``collection`` is the asset id, ``bands`` the asset's band names in registry order, ``select`` how a
    single image is chosen or composed for the tile (``scene``, ``closest_orbit``, ``mosaic``,
    ``mode_year``, ``first``, ``monthly_window``, ``label``), ``params`` anything else the recipe needs.
    """

    collection: str
    bands: tuple[str, ...]
    select: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Modality:
    """One modality of the corpus.

    ``kind`` is ``pixel`` (stored as ``(tile, <name>_band, y, x)``) or ``tile`` (stored as
    ``(tile, <name>_band)``, or ``(tile,)`` when ``scalar``). ``fill`` marks no-data on disk. ``classes``
    maps on-disk values to class names for categorical modalities. ``target`` says whether MP-MAE
    predicts it; ``stored`` is false for modalities derived from per-tile metadata (location, time).
    ``codec`` is how the store compresses it, losslessly either way: ``blosc`` (Blosc/Zstd level 5 with
    byte shuffle, a core Zarr v3 codec; Sentinel-2 too, where real scenes come out smaller than with
    Pcodec) or ``pcodec`` (Pcodec, the registered Zarr v3 extension codec ``numcodecs.pcodec``: the DEM).
    ``model_bands`` are the bands the model reads and predicts when they differ from the stored ones
    (Sentinel-2: the 12 bands MMEarth uses; B10, an L1C-only cirrus band, stays in the store).
    """

    name: str
    kind: Kind
    bands: tuple[str, ...]
    dtype: str
    fill: float | int
    units: tuple[str, ...] | str
    resampling: Resampling
    description: str
    provider: str
    license: str
    ee: EERecipe | None = None
    classes: dict[int, str] | None = None
    scalar: bool = False
    target: bool = True
    stored: bool = True
    derived_from: tuple[str, ...] = ()
    codec: Codec = "blosc"
    model_bands: tuple[str, ...] | None = None  # bands the model sees and predicts (None: all)

    @property
    def categorical(self) -> bool:
        return self.classes is not None

    @property
    def band_dim(self) -> str:
        return f"{self.name}_band"

    @property
    def n_bands(self) -> int:
        return len(self.bands)

    @property
    def model_band_index(self) -> list[int]:
        """Positions of :attr:`model_bands` among the stored bands (all bands when None)."""
        return [self.bands.index(b) for b in (self.model_bands or self.bands)]

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)

    def unit_of(self, band: str) -> str:
        if isinstance(self.units, str):
            return self.units
        return self.units[self.bands.index(band)]

    def dims(self) -> tuple[str, ...]:
        if self.kind == "pixel":
            return ("tile", self.band_dim, "y", "x")
        return ("tile",) if self.scalar else ("tile", self.band_dim)

    def shape(self, n_tiles: int, tile_size: int) -> tuple[int, ...]:
        if self.kind == "pixel":
            return (n_tiles, self.n_bands, tile_size, tile_size)
        return (n_tiles,) if self.scalar else (n_tiles, self.n_bands)

    @property
    def nan_fill(self) -> bool:
        """Whether no-data is NaN (float modalities), which compares unequal to itself."""
        return isinstance(self.fill, float) and bool(np.isnan(self.fill))

    @property
    def nodata(self) -> float | int | None:
        """The fill as a nodata value for formats that spell NaN as absent (JSON, STAC): None for NaN."""
        return None if self.nan_fill else self.fill

    def is_fill(self, values: np.ndarray) -> np.ndarray:
        """Boolean mask of no-data entries (NaN-aware for float fills)."""
        if self.nan_fill:
            return np.isnan(values)
        return values == self.fill

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable description, as written into the store and the catalog."""
        fill = self.nodata
        return {
            "name": self.name,
            "kind": self.kind,
            "bands": list(self.bands),
            "dtype": self.dtype,
            "fill": fill if fill is not None else "NaN",
            "units": list(self.units) if not isinstance(self.units, str) else self.units,
            "resampling": self.resampling,
            "classes": {str(k): v for k, v in self.classes.items()} if self.classes else None,
            "scalar": self.scalar,
            "target": self.target,
            "stored": self.stored,
            "derived_from": list(self.derived_from),
            "codec": self.codec,
            "model_bands": list(self.model_bands) if self.model_bands else None,
            "description": self.description,
            "provider": self.provider,
            "license": self.license,
            "ee": None
            if self.ee is None
            else {
                "collection": self.ee.collection,
                "bands": list(self.ee.bands),
                "select": self.ee.select,
                "params": self.ee.params,
            },
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Modality:
        """The entry :meth:`to_dict` wrote (a store's recorded registry); keys it does not know are
        refused, keys an older store did not record take the field's default."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise RegistryError(f"modality {d.get('name')!r}: unknown registry fields {unknown}")
        kw = dict(d)
        kw["bands"] = tuple(d["bands"])
        kw["fill"] = NAN if d["fill"] in ("NaN", None) else d["fill"]
        kw["units"] = d["units"] if isinstance(d["units"], str) else tuple(d["units"])
        kw["classes"] = {int(k): v for k, v in d["classes"].items()} if d.get("classes") else None
        kw["derived_from"] = tuple(d.get("derived_from") or ())
        kw["model_bands"] = tuple(d["model_bands"]) if d.get("model_bands") else None
        e = d.get("ee")
        kw["ee"] = (
            None if e is None else EERecipe(e["collection"], tuple(e["bands"]), e["select"], e["params"])
        )
        return cls(**kw)


S2_BANDS = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12")
S2_L2A_BANDS = tuple(b for b in S2_BANDS if b != "B10")
S1_BANDS = tuple(f"{pol}_{orbit}" for orbit in ("asc", "desc") for pol in ("VV", "VH", "HH", "HV"))
ERA5_BANDS = tuple(
    f"{period}_{var}"
    for period in ("prev_month", "month", "year")
    for var in ("t2m", "t2m_min", "t2m_max", "precip")
)

DYNAMIC_WORLD_CLASSES = {
    1: "water",
    2: "trees",
    3: "grass",
    4: "flooded_vegetation",
    5: "crops",
    6: "shrub_and_scrub",
    7: "built",
    8: "bare",
    9: "snow_and_ice",
}
WORLDCOVER_CLASSES = {
    10: "tree_cover",
    20: "shrubland",
    30: "grassland",
    40: "cropland",
    50: "built_up",
    60: "bare_sparse_vegetation",
    70: "snow_and_ice",
    80: "permanent_water_bodies",
    90: "herbaceous_wetland",
    95: "mangroves",
    100: "moss_and_lichen",
}
BIOME_CLASSES = {
    1: "Tropical & Subtropical Moist Broadleaf Forests",
    2: "Tropical & Subtropical Dry Broadleaf Forests",
    3: "Tropical & Subtropical Coniferous Forests",
    4: "Temperate Broadleaf & Mixed Forests",
    5: "Temperate Conifer Forests",
    6: "Boreal Forests/Taiga",
    7: "Tropical & Subtropical Grasslands, Savannas & Shrublands",
    8: "Temperate Grasslands, Savannas & Shrublands",
    9: "Flooded Grasslands & Savannas",
    10: "Montane Grasslands & Shrublands",
    11: "Tundra",
    12: "Mediterranean Forests, Woodlands & Scrub",
    13: "Deserts & Xeric Shrublands",
    14: "Mangroves",
}
N_ECOREGIONS = 846
NAN = float("nan")

MODALITIES: tuple[Modality, ...] = (
    Modality(
        name="sentinel2",
        kind="pixel",
        bands=S2_BANDS,
        dtype="uint16",
        fill=0,
        units="reflectance x 10000",
        resampling="bilinear",
        description="Sentinel-2 MSI reflectance: L2A surface reflectance where available, else L1C "
        "top-of-atmosphere (see s2_product). The scene's UTM grid at 10 m defines the tile.",
        provider="ESA Copernicus",
        license="Copernicus Sentinel data terms (free, full and open)",
        codec="blosc",
        model_bands=S2_L2A_BANDS,
        ee=EERecipe(
            "COPERNICUS/S2_SR_HARMONIZED",
            S2_BANDS,
            "scene",
            {
                "l1c_collection": "COPERNICUS/S2_HARMONIZED",
                "cloud_score_collection": "GOOGLE/CLOUD_SCORE_PLUS/V1/S2_HARMONIZED",
                "cloud_score_band": "cs",
                "granule_cloud_property": "CLOUDY_PIXEL_PERCENTAGE",
                "max_scene_cloud": 10,
                "choice": "random",
            },
        ),
    ),
    Modality(
        name="sentinel2_masks",
        kind="pixel",
        bands=("SCL", "MSK_CLDPRB", "QA60"),
        dtype="uint8",
        fill=255,
        units=("class", "percent", "flags"),
        resampling="nearest",
        description="Cloud and scene masks of the Sentinel-2 scene: scene classification (L2A only), "
        "cloud probability in percent (L2A only), and QA60 bits 10-11 shifted to 1=opaque, 2=cirrus.",
        provider="ESA Copernicus",
        license="Copernicus Sentinel data terms (free, full and open)",
        ee=EERecipe("COPERNICUS/S2_SR_HARMONIZED", ("SCL", "MSK_CLDPRB", "QA60"), "scene"),
        target=False,
    ),
    Modality(
        name="sentinel1",
        kind="pixel",
        bands=S1_BANDS,
        dtype="float16",
        fill=NAN,
        units="dB",
        resampling="bilinear",
        description="Sentinel-1 GRD IW backscatter in dB, the ascending and the descending scene "
        "closest to the Sentinel-2 date within the maximum gap; absent polarisations are NaN.",
        provider="ESA Copernicus",
        license="Copernicus Sentinel data terms (free, full and open)",
        ee=EERecipe(
            "COPERNICUS/S1_GRD",
            ("VV", "VH", "HH", "HV"),
            "closest_orbit",
            {"instrumentMode": "IW", "max_gap_days": 30, "coverage": "complete same-day pass"},
        ),
    ),
    Modality(
        name="dem",
        kind="pixel",
        bands=("elevation", "slope"),
        dtype="float32",
        fill=NAN,
        units=("m", "degrees"),
        resampling="bilinear",
        description="Elevation above sea level and terrain slope (ee.Terrain) at 10 m.",
        provider="ESA Copernicus DEM GLO-30",
        license="Copernicus DEM licence (free)",
        codec="pcodec",
        ee=EERecipe("COPERNICUS/DEM/GLO30", ("DEM",), "mosaic", {"native_m": 30}),
    ),
    Modality(
        name="era5",
        kind="tile",
        bands=ERA5_BANDS,
        dtype="float32",
        fill=NAN,
        units=tuple("m" if b.endswith("precip") else "K" for b in ERA5_BANDS),
        resampling="bilinear",
        description="ERA5-Land monthly 2 m temperature (mean, min, max) and total precipitation for "
        "the month before the Sentinel-2 date, its month, and the 12 months ending with it.",
        provider="ECMWF Copernicus Climate Change Service",
        license="Copernicus C3S licence",
        ee=EERecipe(
            "ECMWF/ERA5_LAND/MONTHLY_AGGR",
            (
                "temperature_2m",
                "temperature_2m_min",
                "temperature_2m_max",
                "total_precipitation_sum",
            ),
            "monthly_window",
            {"window_months": 12},
        ),
    ),
    Modality(
        name="dynamic_world",
        kind="pixel",
        bands=("label",),
        dtype="uint8",
        fill=0,
        units="class",
        resampling="nearest",
        description="Dynamic World land-cover label (class + 1; 0 is no data), mode over the S2 year.",
        provider="Google, World Resources Institute",
        license="CC-BY-4.0",
        ee=EERecipe("GOOGLE/DYNAMICWORLD/V1", ("label",), "mode_year"),
        classes=DYNAMIC_WORLD_CLASSES,
    ),
    Modality(
        name="esa_worldcover",
        kind="pixel",
        bands=("map",),
        dtype="uint8",
        fill=0,
        units="class",
        resampling="nearest",
        description="ESA WorldCover 2020 land-cover map (v100).",
        provider="ESA",
        license="CC-BY-4.0",
        ee=EERecipe("ESA/WorldCover/v100", ("Map",), "first"),
        classes=WORLDCOVER_CLASSES,
    ),
    Modality(
        name="canopy_height",
        kind="pixel",
        bands=("height", "std"),
        dtype="uint8",
        fill=255,
        units=("m", "m"),
        resampling="bilinear",
        description="ETH global canopy height 2020 and its standard deviation, in whole metres.",
        provider="ETH Zurich EcoVision (Lang et al. 2023)",
        license="CC-BY-4.0",
        ee=EERecipe(
            "users/nlang/ETH_GlobalCanopyHeight_2020_10m_v1",
            ("b1",),
            "first",
            {"std_asset": "users/nlang/ETH_GlobalCanopyHeightSD_2020_10m_v1"},
        ),
    ),
    Modality(
        name="biome",
        kind="tile",
        bands=("biome",),
        dtype="uint8",
        fill=0,
        units="class",
        resampling="nearest",
        description="RESOLVE Ecoregions 2017 biome of the tile centre (14 classes, Rock and Ice dropped).",
        provider="RESOLVE",
        license="CC-BY-4.0",
        ee=EERecipe("RESOLVE/ECOREGIONS/2017", ("BIOME_NUM",), "label"),
        classes=BIOME_CLASSES,
        scalar=True,
    ),
    Modality(
        name="ecoregion",
        kind="tile",
        bands=("ecoregion",),
        dtype="uint16",
        fill=0,
        units="class",
        resampling="nearest",
        description="RESOLVE Ecoregions 2017 ecoregion id of the tile centre (846 classes).",
        provider="RESOLVE",
        license="CC-BY-4.0",
        ee=EERecipe("RESOLVE/ECOREGIONS/2017", ("ECO_ID",), "label"),
        classes={i: f"ecoregion_{i}" for i in range(1, N_ECOREGIONS + 1)},
        scalar=True,
    ),
    Modality(
        name="location",
        kind="tile",
        bands=("x", "y", "z"),
        dtype="float32",
        fill=NAN,
        units="unit sphere",
        resampling="nearest",
        description="Tile centre on the unit sphere (cos lat cos lon, cos lat sin lon, sin lat).",
        provider="derived",
        license="CC0-1.0",
        stored=False,
        derived_from=("lat", "lon"),
    ),
    Modality(
        name="time",
        kind="tile",
        bands=("month_sin", "month_cos"),
        dtype="float32",
        fill=NAN,
        units="unit circle",
        resampling="nearest",
        description="Month of the Sentinel-2 scene on the unit circle.",
        provider="derived",
        license="CC0-1.0",
        stored=False,
        derived_from=("s2_date",),
    ),
)


class RegistryError(KeyError):
    """An unknown modality name."""


def get(name: str) -> Modality:
    """The registry entry called ``name``; raises :class:`RegistryError` naming the known ones."""
    for m in MODALITIES:
        if m.name == name:
            return m
    known = ", ".join(m.name for m in MODALITIES)
    raise RegistryError(f"unknown modality {name!r}; known modalities: {known}")


def stored_modalities(names: list[str] | tuple[str, ...] | None = None) -> tuple[Modality, ...]:
    """Registry entries that have a store variable, optionally restricted to ``names``."""
    mods = MODALITIES if names is None else tuple(get(n) for n in names)
    return tuple(m for m in mods if m.stored)


def registry_dict(modalities: tuple[Modality, ...] = MODALITIES) -> dict[str, Any]:
    """The registry as written into store attributes."""
    return {m.name: m.to_dict() for m in modalities}
