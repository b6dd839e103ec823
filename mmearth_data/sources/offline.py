"""The offline source: a deterministic, physically plausible world that needs no account or network.

Data flow: world layers (land, Koppen, MODIS IGBP, ERA5 climatology, elevation proxy) + a planned tile
-> every modality of the registry on the tile's 10 m grid -> store.

Each tile is a pure function of (tile id, build seed); arrays are byte-identical across runs and
machines with the same numpy. What is grounded in real layers and what is modelled:

- **Scene date**: eight candidate days of the tile's year, each with a cloud cover drawn around the
  month's climatological cloudiness (from its precipitation; wholly clear days more likely in dry
  months); the least cloudy one wins (low sun excluded), as MMEarth's documented least-cloudy choice.
- **Terrain**: mean elevation from the world's lapse-rate proxy; relief (elevation standard deviation
  within the tile: about 1-3 m on lowland plains, 15-60 m in mountains at 128 px) grows with elevation
  and the proxy's local gradient (x1.5 in montane grasslands), so tile-mean slopes run from about 1
  degree on plains to 15-25 degrees in mountains; fractal (power-law) surface (spectral slope 3)
  on the DEM's native 30 m grid; slope from that grid's gradient, both resampled bilinearly to 10 m
  as the Earth Engine recipe resamples GLO-30 and its ``ee.Terrain.slope``.
- **Land cover**: the MODIS IGBP mix of the surrounding 0.05 deg cells -> fractions of 11 surface
  classes (a fixed IGBP -> class table, :data:`IGBP_TO_CLASS`), perturbed per tile (Dirichlet), then
  placed with spatially smooth fields so that water sits in low terrain, crops on flat land, snow high,
  bare rock on steep slopes; then the landscape's objects (``landscape.py``): rectangular field
  parcels sized by biome with their own crop (crops or grass for the whole parcel; spring-sown, from bare
  soil to canopy with the season, or autumn-sown, green whenever it is mild; the ground cover logistic in
  the crop's development, so that most parcels are bare or closed, as on real farmland), growth stage,
  brightness and within-field texture,
  hedgerows, roads and tracks, a river down the DEM that ends in a lake at a pit, roof and canopy
  texture.
- **Label products**: WorldCover as an independent 2020 map (crop rotation between the tile's year
  and 2020, patchy classification errors at about its documented accuracy, a 3 x 3 majority filter);
  Dynamic World as the mode of six per-date classifications with confusion (crops bare, snow on the
  winter dates). They agree on about two thirds of the pixels, as the real products do.
- **Sentinel-2**: class spectra (water dark in NIR and SWIR, vegetation red edge with a full canopy's
  spectrum measured on real L2A farmland, snow bright in the
  visible and dark in SWIR) mixed by a greenness that follows the month's temperature and rain,
  seasonal snow below -1 C (lapse-corrected per pixel), Lambertian terrain illumination for the scene's
  sun position, the MSI's point spread (mixed pixels at boundaries), sensor noise from its SNR; clouds
  (cumulus fields in warm wet months, stratiform sheets otherwise) with soft edges and offset shadows,
  cirrus in B10 more often in wet climates. L2A (surface reflectance) from 2019, L1C (with path radiance and
  transmittance) before, as the global L2A archive. Masks: SCL and MSK_CLDPRB (L2A only) and QA60
  (60 m blocks) from the same clouds.
- **Sentinel-1**: per-class VV backscatter and VV-VH ratio (VV above VH), soil moisture from the
  month's rain, vegetation volume scattering from greenness, local incidence angle from terrain and the
  orbit's look direction, layover and radar shadow on slopes steeper than the incidence angle (or its
  complement), each parcel its own roughness, and on farmland each parcel's biomass as its crop or grass
  shows it in Sentinel-2 (VH up about 5 dB from bare soil to full canopy, VV a little, the soil's
  roughness damped under the canopy, as crop monitoring with Sentinel-1 measures), roads dark; gamma
  speckle drawn at the sensor's 20 m resolution and interpolated to 10 m (lag-1 correlation about 0.8,
  as in real GRD patches). Ascending / descending scenes are each missing on some tiles, HH/HV replace
  VV/VH near the poles, as in the real archive.
- **Canopy height**: from tree cover with a biome-typical height, shrubs a few metres, water no data.
- **ERA5**: the climatology for the S2 month, the month before and the 12 months ending with it,
  plus a year anomaly shared by all tiles of a 5 deg block; monthly min/max from a diurnal range that
  widens with aridity.
- **Biome and ecoregion**: from the world's biome map and ecoregion proxy (see make_world.py).
"""

from __future__ import annotations

import zlib
from types import SimpleNamespace
from typing import Any

import numpy as np

from mmearth_data.registry import Modality
from mmearth_data.sources import landscape
from mmearth_data.sources.base import TileFailure, TileRequest, TileResult, empty_arrays
from mmearth_data.sources.noise import fractal_field, smooth_fields
from mmearth_data.world import World, get_world

# surface classes of the generator
CLASSES = (
    "water",
    "trees",
    "grass",
    "flooded",
    "crops",
    "shrub",
    "built",
    "bare",
    "snow",
    "mangrove",
    "moss",
)
C = {n: i for i, n in enumerate(CLASSES)}
TO_DYNAMIC_WORLD = np.array([1, 2, 3, 4, 5, 6, 7, 8, 9, 2, 3], np.uint8)
TO_WORLDCOVER = np.array([80, 10, 30, 90, 40, 20, 50, 60, 70, 95, 100], np.uint8)

# IGBP class (row) -> fractions of surface classes
IGBP_TO_CLASS = np.zeros((17, len(CLASSES)))
for _igbp, _fr in {
    0: {"water": 1.0},
    1: {"trees": 0.85, "grass": 0.05, "shrub": 0.05, "bare": 0.02, "water": 0.03},
    2: {"trees": 0.9, "grass": 0.03, "shrub": 0.03, "water": 0.04},
    3: {"trees": 0.8, "shrub": 0.1, "grass": 0.05, "water": 0.05},
    4: {"trees": 0.8, "grass": 0.08, "crops": 0.05, "shrub": 0.04, "water": 0.03},
    5: {"trees": 0.8, "grass": 0.07, "shrub": 0.06, "crops": 0.04, "water": 0.03},
    6: {"shrub": 0.7, "grass": 0.15, "trees": 0.1, "bare": 0.05},
    7: {"shrub": 0.45, "bare": 0.3, "grass": 0.25},
    8: {"trees": 0.45, "grass": 0.3, "shrub": 0.2, "crops": 0.05},
    9: {"grass": 0.55, "trees": 0.2, "shrub": 0.2, "crops": 0.05},
    10: {"grass": 0.8, "shrub": 0.08, "bare": 0.07, "crops": 0.05},
    11: {"flooded": 0.55, "water": 0.25, "grass": 0.1, "trees": 0.1},
    12: {"crops": 0.8, "grass": 0.08, "trees": 0.05, "built": 0.04, "water": 0.03},
    13: {"built": 0.65, "trees": 0.12, "grass": 0.13, "crops": 0.05, "water": 0.05},
    14: {"crops": 0.45, "trees": 0.25, "grass": 0.2, "built": 0.05, "shrub": 0.05},
    15: {"snow": 0.85, "bare": 0.15},
    16: {"bare": 0.92, "shrub": 0.05, "grass": 0.03},
}.items():
    for _name, _v in _fr.items():
        IGBP_TO_CLASS[_igbp, C[_name]] = _v

# reflectance spectra, bands B1 B2 B3 B4 B5 B6 B7 B8 B8A B9 B10 B11 B12
SPEC = {
    "water": [0.070, 0.060, 0.050, 0.035, 0.025, 0.018, 0.015, 0.012, 0.010, 0.006, 0.001, 0.004, 0.003],
    # full canopy: the median of eodal's L2A farmland pixels with NDVI above 0.85 (Swiss plateau, May;
    # B1 and B9, not in that stack, from B2 and from B8A less water-vapour absorption)
    "green": [0.025, 0.027, 0.052, 0.026, 0.088, 0.300, 0.385, 0.420, 0.410, 0.350, 0.001, 0.140, 0.065],
    "dryveg": [0.050, 0.060, 0.082, 0.105, 0.138, 0.165, 0.178, 0.190, 0.205, 0.175, 0.001, 0.265, 0.190],
    "soil": [0.058, 0.072, 0.096, 0.120, 0.142, 0.158, 0.170, 0.182, 0.192, 0.175, 0.001, 0.275, 0.230],
    "sand": [0.140, 0.180, 0.240, 0.320, 0.360, 0.380, 0.400, 0.410, 0.420, 0.380, 0.002, 0.480, 0.420],
    "built": [0.110, 0.120, 0.130, 0.140, 0.150, 0.160, 0.170, 0.180, 0.185, 0.160, 0.001, 0.210, 0.190],
    "snow": [0.900, 0.920, 0.900, 0.880, 0.860, 0.840, 0.820, 0.800, 0.780, 0.600, 0.005, 0.090, 0.060],
    "cloud": [0.550, 0.560, 0.570, 0.580, 0.590, 0.600, 0.600, 0.600, 0.600, 0.500, 0.050, 0.450, 0.350],
}
SPEC = {k: np.array(v, np.float32) for k, v in SPEC.items()}
CANOPY_SHADE = np.array([0.7, 0.7, 0.7, 0.7, 0.75, 0.8, 0.82, 0.82, 0.82, 0.8, 1.0, 0.7, 0.65], np.float32)
# L1C: atmospheric path reflectance and two-way transmittance per band
PATH = np.array(
    [0.09, 0.07, 0.05, 0.035, 0.03, 0.025, 0.022, 0.02, 0.018, 0.01, 0.0, 0.005, 0.002], np.float32
)
TRANS = np.array([0.75, 0.8, 0.85, 0.9, 0.92, 0.93, 0.94, 0.95, 0.95, 0.5, 0.05, 0.95, 0.92], np.float32)

# Sentinel-2 radiometric noise (reflectance), from the MSI SNR at reference radiance (about 100-170)
S2_NOISE = np.array(
    [0.0015, 0.001, 0.001, 0.001, 0.001, 0.001, 0.001, 0.001, 0.001, 0.002, 0.001, 0.0015, 0.0015], np.float32
)

# a crop's ground cover against its development (0 sown, 1 ripe): logistic, half cover at MID
CROP_COVER_MID, CROP_COVER_WIDTH = 0.3, 0.08

# native pixel size of the DEM (Copernicus GLO-30) in 10 m pixels
DEM_NATIVE_FACTOR = 3
TERRAIN_BETA = 3.0
MTF_SIGMA_PX = 0.5  # Gaussian point spread of the MSI at 10 m (about 0.5 px)
# texture amplitude per band (relative to NIR): shadows and gaps show most in the red and the NIR, least
# in the blue (haze and adjacency) and the 60 m bands
TEXTURE_BAND_GAIN = np.array([0.3, 0.35, 0.7, 1.0, 0.8, 1.0, 1.2, 1.35, 1.2, 0.3, 0.0, 0.6, 0.6], np.float32)
# typical field size (parcel width, 10 m pixels) by biome: small in humid temperate and tropical
# smallholder landscapes, large on dry plains
FIELD_SIZE_PX = {
    1: 8,
    2: 9,
    3: 10,
    4: 14,
    5: 14,
    6: 16,
    7: 12,
    8: 28,
    9: 14,
    10: 12,
    11: 20,
    12: 12,
    13: 18,
    14: 10,
}  # power-spectrum exponent of the terrain surface (real terrain: about 2-3.5)

# native pixel size of each Sentinel-2 band in 10 m pixels (B1, B9, B10 at 60 m; red edge, B8A, SWIR at 20 m)
S2_NATIVE_FACTOR = np.array([6, 1, 1, 1, 2, 2, 2, 1, 2, 6, 6, 2, 2])

# Sentinel-1 VV backscatter (dB) and VV - VH (dB) per surface class
S1_VV = np.array([-21, -7.5, -11, -6, -10, -10.5, -4, -15, -12, -6.5, -12], np.float32)
S1_RATIO = np.array([8.5, 5.5, 7, 7.5, 6.5, 6.5, 6.5, 8, 7, 5.5, 7], np.float32)
S1_LOOK_AZIMUTH = {"asc": 80.0, "desc": 280.0}
S1_INCIDENCE = 37.0
S1_ENL = 4.4  # equivalent number of looks of GRD-H at 10 m
S1_ENL_20M = 1.2  # looks of the speckle drawn at 20 m: interpolated to 10 m it has about S1_ENL

# canopy height (m) of trees by biome
TREE_HEIGHT = {
    1: 32,
    2: 20,
    3: 24,
    4: 24,
    5: 30,
    6: 15,
    7: 12,
    8: 10,
    9: 10,
    10: 8,
    11: 5,
    12: 10,
    13: 6,
    14: 14,
}
VEG_CLASSES = np.array([c in ("trees", "grass", "flooded", "shrub", "mangrove", "moss") for c in CLASSES])

YEARS = range(2016, 2026)  # S2 from mid-2015; the climatology covers 2000-2025


def tile_seed(tile_id: str, seed: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([seed, zlib.crc32(tile_id.encode())])


def sun_position(lat: float, day_of_year: int, local_hour: float = 10.5) -> tuple[float, float]:
    """Solar zenith and azimuth (degrees from north, clockwise) at the S2 overpass."""
    decl = np.radians(23.44) * np.sin(2 * np.pi * (day_of_year - 81) / 365.0)
    phi = np.radians(lat)
    h = np.radians(15.0 * (local_hour - 12.0))
    cos_z = np.sin(phi) * np.sin(decl) + np.cos(phi) * np.cos(decl) * np.cos(h)
    zen = np.degrees(np.arccos(np.clip(cos_z, -1, 1)))
    az = np.degrees(np.arctan2(np.sin(h), np.cos(h) * np.sin(phi) - np.tan(decl) * np.cos(phi))) + 180.0
    return float(zen), float(az % 360)


def _cos_incidence(dzdx: np.ndarray, dzdy: np.ndarray, zenith: float, azimuth: float) -> np.ndarray:
    """Cosine of the angle between the surface normal and a direction (zenith, azimuth) in degrees."""
    z, a = np.radians(zenith), np.radians(azimuth)
    norm = np.sqrt(dzdx**2 + dzdy**2 + 1)
    return (-dzdx * np.sin(a) * np.sin(z) - dzdy * np.cos(a) * np.sin(z) + np.cos(z)) / norm


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def slope_degrees(elevation: np.ndarray, resolution: float = 10.0) -> np.ndarray:
    """Slope (degrees) of an elevation grid by central differences (one-sided at edges)."""
    dzdy, dzdx = np.gradient(elevation.astype(np.float64), resolution)
    return np.degrees(np.arctan(np.hypot(dzdx, dzdy))).astype(np.float32)


def dem_on_tile_grid(z_native: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Elevation and slope of a DEM grid at its native 30 m, each resampled bilinearly to ``size`` 10 m
    pixels (pixel centres aligned): what the Earth Engine recipe returns for GLO-30."""
    res = 10.0 * DEM_NATIVE_FACTOR
    slope = slope_degrees(z_native, res)
    z10 = _bilinear_up(z_native.astype(np.float32), DEM_NATIVE_FACTOR, size).astype(np.float32)
    return z10, _bilinear_up(slope, DEM_NATIVE_FACTOR, size).astype(np.float32)


class _TileState(SimpleNamespace):
    """What every modality of one tile is drawn from, filled in by :class:`OfflineSource`'s steps in
    order (scene, terrain, land cover, structure, vegetation, then each modality): the tile's
    request ``t``, its size ``S``, its random generator ``rng`` (drawn from in a fixed order), its
    climate and everything the earlier steps made."""

    def get(self, names: str) -> tuple:
        """The values of the space-separated ``names``, in order."""
        return tuple(getattr(self, n) for n in names.split())


class OfflineSource:
    """Deterministic synthetic corpus grounded in real global layers (the default source)."""

    name = "offline"
    years = YEARS
    # what a tile's arrays are for a given (tile, seed); changes whenever the generator's output does
    # (2: DEM on GLO-30's 30 m grid, relief scaled to real terrain; 3: landscape structure, label products,
    # clouds by climate, correlated speckle, terrain k^-3; 4: farmland crop or grass per parcel, spring-
    # and autumn-sown crop calendars, a river's path always water; 5: Sentinel-1 sees each parcel's
    # biomass; 6: full canopy's spectrum measured on real farmland, crop cover logistic in development)
    version = "6"

    def __init__(
        self, seed: int = 0, world: World | None = None, l2a_from: str = "2019-01-01",
        field_sizes: tuple[float, float] | None = None,
    ):  # fmt: skip
        """``field_sizes`` (lo, hi): draw each tile's typical parcel width log-uniformly in that range of
        10 m pixels, whatever the location (the downstream tasks' landscapes: their field-size label
        must not be a function of the biome, a pretext target); by default it follows the biome."""
        self.seed = int(seed)
        self._world = world
        self.l2a_from = np.datetime64(l2a_from)
        if field_sizes is not None and not 3 <= field_sizes[0] < field_sizes[1]:
            raise ValueError(f"`field_sizes` {field_sizes}: need 3 <= lo < hi (10 m pixels)")
        self.field_sizes = field_sizes

    @property
    def world(self) -> World:
        if self._world is None:
            self._world = get_world()
        return self._world

    def describe(self) -> dict[str, Any]:
        out = {
            "source": self.name,
            "seed": self.seed,
            "l2a_from": str(self.l2a_from),
            "world_inputs": {k: v["version"] for k, v in self.world.provenance["inputs"].items()},
        }
        return out | ({"field_sizes": list(self.field_sizes)} if self.field_sizes else {})

    def fetch(
        self, tiles: list[TileRequest], modalities: tuple[Modality, ...]
    ) -> list[TileResult | TileFailure]:
        out: list[TileResult | TileFailure] = []
        for t in tiles:
            if t.year not in self.years:
                out.append(TileFailure(t.tile_id, "sentinel2", f"no offline scene for year {t.year}"))
                continue
            out.append(self.generate(t, modalities))
        return out

    # ------------------------------------------------------------------------------------------------
    def generate(self, t: TileRequest, modalities: tuple[Modality, ...]) -> TileResult:
        """All modalities of one tile."""
        w = self.world
        S = t.size
        rng = np.random.default_rng(tile_seed(t.tile_id, self.seed))
        T12, P12 = (a.astype(np.float32) for a in w.climate(t.lat, t.lon))
        elev0 = float(w.elevation(t.lat, t.lon))
        relief0 = float(w.relief(t.lat, t.lon))
        mix = w.igbp_mix(t.lat, t.lon)
        p_ann = float(P12.sum())
        st = _TileState(
            t=t, w=w, S=S, rng=rng, T12=T12, P12=P12, elev0=elev0, relief0=relief0, mix=mix, p_ann=p_ann
        )
        self._scene(st)
        self._terrain(st)
        self._land_cover(st)
        self._structure(st)
        self._vegetation(st)
        self._sentinel2(st)
        self._clouds(st)
        self._s2_masks(st)
        self._sentinel1(st)
        self._canopy(st)
        self._labels(st)
        return self._result(st, modalities)

    def _scene(self, st: _TileState) -> None:
        """The scene: the least cloudy of eight candidate days of the year, its cloud cover, product
        level, sun position and the month's climate."""
        P12, T12, rng, t = st.get("P12 T12 rng t")
        year_start = np.datetime64(f"{t.year}-01-01")
        n_days = int((np.datetime64(f"{t.year + 1}-01-01") - year_start).astype(int))
        days = np.sort(rng.choice(n_days, size=8, replace=False))
        months = np.array([(year_start + int(d)).astype(object).month - 1 for d in days])
        sun_cos = np.array([np.cos(np.radians(sun_position(t.lat, int(d) + 1)[0])) for d in days])
        # cloud cover of each candidate day: a Beta draw around the month's climatological cloudiness
        # (wetter months cloudier; dry seasons mostly clear), low sun excluded; the least cloudy wins
        mean_cloud = np.clip(0.04 + P12[months] / 160.0, 0.03, 0.92)
        k_cloud = 2.5
        covers = rng.beta(mean_cloud * k_cloud, (1 - mean_cloud) * k_cloud)
        covers = np.where(rng.random(8) < 1 - mean_cloud, 0.0, covers)  # wholly clear days
        pick = int(np.argmin(covers + np.where(sun_cos < 0.25, 2.0, 0.0)))
        cover = float(covers[pick])
        doy = int(days[pick])
        s2_date = year_start + doy
        m = int(months[pick])
        product = "L2A" if s2_date >= self.l2a_from else "L1C"
        zen, az = sun_position(t.lat, doy + 1)
        T_m, P_m, P_prev = float(T12[m]), float(P12[m]), float(P12[m - 1])
        vars(st).update(
            P_m=P_m, P_prev=P_prev, T_m=T_m, az=az, cover=cover, product=product, s2_date=s2_date, zen=zen
        )

    def _terrain(self, st: _TileState) -> None:
        """The DEM: elevation and slope made at 30 m and resampled to the tile grid, and the
        gradients sun and radar see."""
        S, elev0, relief0, rng, t = st.get("S elev0 relief0 rng t")
        # relief: standard deviation of elevation across a 1.28 km tile, growing with altitude and with
        # the regional relief; a k^-3 surface's deviation grows with the extent, hence the S / 128
        relief = np.clip(0.5 + 0.004 * elev0 + 0.08 * relief0, 0.3, 150) * float(rng.lognormal(0, 0.5))
        if t.biome == 10:
            relief *= 1.5
        relief *= S / 128
        # the DEM is a 30 m product: elevation and slope (ee.Terrain, on the DEM's own 30 m grid) are
        # made at 30 m and resampled bilinearly to the 10 m tile grid, as the Earth Engine recipe does
        n30 = -(-S // DEM_NATIVE_FACTOR)
        z30 = (elev0 + relief * fractal_field(rng, n30, TERRAIN_BETA)).astype(np.float32)
        z, slope = dem_on_tile_grid(z30, S)
        dzdy_rows, dzdx = np.gradient(z.astype(np.float64), 10.0)  # the surface that sun and radar see
        dzdy = -dzdy_rows  # rows run south
        zn = (z - z.mean()) / (z.std() + 1e-6)
        slope_n = (slope - slope.mean()) / (slope.std() + 1e-6)
        vars(st).update(dzdx=dzdx, dzdy=dzdy, slope=slope, slope_n=slope_n, z=z, zn=zn)

    def _land_cover(self, st: _TileState) -> None:
        """The surface classes, placed by smooth fields in the shares of the location's land-cover
        mix."""
        S, mix, rng, slope_n, t, zn = st.get("S mix rng slope_n t zn")
        frac = mix @ IGBP_TO_CLASS
        if t.biome == 14:
            frac[C["mangrove"]] += 0.7 * frac[C["trees"]] + 0.1
            frac[C["trees"]] *= 0.3
        if t.biome == 11:
            frac[C["moss"]] += 0.5 * frac[C["grass"]] + 0.3 * frac[C["shrub"]]
            frac[C["grass"]] *= 0.5
            frac[C["shrub"]] *= 0.7
        if t.biome == 13:
            frac[C["bare"]] += 0.5 * frac[C["grass"]]
            frac[C["grass"]] *= 0.5
        frac = rng.dirichlet(frac / frac.sum() * 25 + 0.02)
        fields = smooth_fields(rng, S, [25, 3, 10, 10, 8, 8, 6, 5, 5, 6, 1.0])
        parcels = np.kron(smooth_fields(rng, max(S // 8, 4), [1.5])[0], np.ones((8, 8), np.float32))[:S, :S]
        scores = {
            "water": -1.5 * zn + fields[0],
            "built": fields[1],
            "crops": parcels + 0.3 * fields[2] - 0.5 * slope_n,
            "flooded": -zn + fields[3],
            "mangrove": -zn + fields[4],
            "trees": fields[5] + 0.3 * zn,
            "snow": 2 * zn + fields[6],
            "bare": slope_n + fields[7],
            "shrub": fields[8],
            "moss": fields[9],
        }
        cls = np.full((S, S), C["grass"], np.uint8)
        free = np.ones(S * S, bool)
        n_px = S * S
        for name, score in scores.items():
            n = int(round(frac[C[name]] * n_px))
            n = min(n, int(free.sum()))
            if n <= 0:
                continue
            s = np.where(free, score.ravel(), -np.inf)
            idx = np.argpartition(-s, n - 1)[:n]
            cls.ravel()[idx] = C[name]
            free[idx] = False
        texture = fields[10]
        vars(st).update(cls=cls, fields=fields, frac=frac, texture=texture)

    def _structure(self, st: _TileState) -> None:
        """Landscape structure: field parcels and their states, hedgerows, a river, roads and
        tracks."""
        S, cls, frac, p_ann, rng, t, z = st.get("S cls frac p_ann rng t z")
        agri = float(frac[C["crops"]] + 0.3 * frac[C["grass"]])
        if self.field_sizes is None:
            size_px = FIELD_SIZE_PX.get(t.biome, 14) * float(rng.lognormal(0, 0.3))
        else:
            size_px = float(np.exp(rng.uniform(*np.log(self.field_sizes))))
        parcel, pedge = landscape.fields(rng, S, size_px)
        n_par = int(parcel.max()) + 1
        par_state = rng.random(n_par).astype(np.float32)  # growth stage of each parcel's crop
        par_kind = rng.choice(3, n_par, p=[0.6, 0.25, 0.15])  # growing, harvested / senescent, ploughed
        par_rough = rng.normal(0, 1.5, n_par).astype(np.float32)  # soil roughness and moisture, dB
        par_tex = rng.uniform(0.04, 0.12, n_par).astype(np.float32)  # within-field heterogeneity
        par_hedge = rng.random(n_par) < (0.45 if t.biome in (4, 5, 12) else 0.08)
        par_bright = rng.normal(0, 0.12, n_par).astype(np.float32)  # management, moisture, variety
        par_winter = rng.random(n_par) < 0.35  # autumn-sown (winter cereals, rapeseed): green while mild
        river, river_path = np.zeros((S, S), bool), []
        if rng.random() < float(np.clip(p_ann / 1500.0, 0.05, 0.6)):
            river, river_path = landscape.river(rng, z, float(rng.uniform(1.0, 4.0)))
            cls[river & (cls != C["snow"])] = C["water"]
        # farmland follows its parcels: crop or grass is one owner's decision per parcel, so where the
        # land cover has crops and grass, each parcel takes the one most of its pixels have
        crops, grass = cls == C["crops"], cls == C["grass"]
        n_crop = np.bincount(parcel[crops], minlength=n_par)
        n_grass = np.bincount(parcel[grass], minlength=n_par)
        farm = crops | grass
        cls[farm] = np.where((n_crop >= n_grass)[parcel[farm]], C["crops"], C["grass"])
        meadow = (cls == C["grass"]) & (agri > 0.15)
        fieldish = (cls == C["crops"]) | meadow
        hedge = pedge & par_hedge[parcel] & fieldish
        cls[hedge] = C["trees"]  # hedgerows
        fieldish &= cls != C["trees"]
        road = np.zeros((S, S), bool)
        for _ in range(min(int(rng.poisson(0.3 + 4 * frac[C["built"]] + 1.2 * agri)), 4)):
            road |= landscape.line(rng, S, float(rng.uniform(1.0, 2.2)), float(rng.uniform(0, S / 6)))
        road &= cls != C["water"]
        track = np.zeros((S, S), bool)
        for _ in range(min(int(rng.poisson(1.5 * agri)), 3)):
            track |= landscape.line(rng, S, 1.0, float(rng.uniform(0, S / 10)))
        track &= ~road & np.isin(cls, [C["crops"], C["grass"], C["shrub"], C["bare"]])
        cls[road] = C["built"]
        cls[track] = C["bare"]
        fieldish &= ~(road | track)
        fine = smooth_fields(rng, S, [0.6, 1.8])  # pixel- and crown-scale texture
        vars(st).update(
            fieldish=fieldish,
            fine=fine,
            hedge=hedge,
            meadow=meadow,
            n_par=n_par,
            par_bright=par_bright,
            par_winter=par_winter,
            par_kind=par_kind,
            par_rough=par_rough,
            par_state=par_state,
            par_tex=par_tex,
            parcel=parcel,
            pedge=pedge,
            river=river,
            river_path=river_path,
            road=road,
            size_px=size_px,
            track=track,
        )

    def _vegetation(self, st: _TileState) -> None:
        """Greenness of the month (trees, crops) and snow cover from temperature and altitude."""
        (
            P_m, P_prev, T_m, cls, elev0, mix, par_kind, par_state, par_winter, parcel, z
        ) = st.get(
            "P_m P_prev T_m cls elev0 mix par_kind par_state par_winter parcel z"
        )  # fmt: skip
        wet = np.clip((P_m + P_prev) / 100.0, 0.15, 1.0)  # the last two months' rain
        g = float(_sigmoid((T_m - 5) / 2.5) * wet)
        forest_mix = mix[1:6].sum()
        evergreen = float((mix[1] + mix[2]) / forest_mix) if forest_mix > 0 else 0.5
        g_tree = evergreen * (0.75 + 0.25 * g) + (1 - evergreen) * g
        # each parcel on its own crop calendar: a spring-sown crop runs from bare soil (just sown) to
        # full canopy with the season; an autumn-sown one keeps a canopy whenever it is not frozen
        mild = float(_sigmoid(T_m / 2.0) * wet)
        winter_state = np.maximum(g, 0.7 * mild) * (0.5 + 0.5 * par_state)
        dev = np.where(par_winter, winter_state, g * par_state)  # each parcel's development, 0-1
        # the canopy's ground cover grows logistically with development: most parcels are bare or
        # closed, few in between (real farmland's NDVI is bimodal in spring: eodal's May scene has a
        # quarter of its pixels below 0.5 and half above 0.76)
        mid, width = CROP_COVER_MID, CROP_COVER_WIDTH
        lo, hi = _sigmoid(-mid / width), _sigmoid((1 - mid) / width)
        cover = (_sigmoid((dev - mid) / width) - lo) / (hi - lo)
        crop_state = np.clip(cover, 0, 1)[parcel].astype(np.float32)
        crop_state = np.where(par_kind[parcel] == 0, crop_state, 0.15 * crop_state)
        t_pix = T_m - 0.0065 * (z - elev0)
        snow = _sigmoid((-t_pix - 1.0) / 1.5).astype(np.float32)
        snow = np.where(cls == C["water"], 0.0, snow)
        snow = np.where(np.isin(cls, [C["trees"], C["mangrove"]]), 0.5 * snow, snow)
        snow = np.where(cls == C["snow"], 1.0, snow).astype(np.float32)
        vars(st).update(crop_state=crop_state, g=g, g_tree=g_tree, snow=snow)

    def _sentinel2(self, st: _TileState) -> None:
        """Surface reflectance of every pixel: class spectra, crops per parcel, texture, snow,
        illumination."""
        (
            S, az, cls, crop_state, dzdx, dzdy, fieldish, fine, g, g_tree, meadow, p_ann, par_bright,
            par_kind, par_state, par_tex, parcel, rng, road, snow, texture, zen
        ) = st.get(
            "S az cls crop_state dzdx dzdy fieldish fine g g_tree meadow p_ann par_bright par_kind "
            "par_state par_tex parcel rng road snow texture zen"
        )  # fmt: skip
        aridity = float(np.clip(1 - p_ann / 600.0, 0, 1))
        veg = lambda gg: gg * SPEC["green"] + (1 - gg) * SPEC["dryveg"]  # noqa: E731
        bare = aridity * SPEC["sand"] + (1 - aridity) * SPEC["soil"]
        water = SPEC["water"].copy()
        water[1:4] += rng.uniform(0, 0.03)  # turbidity
        spectra = np.stack(
            [
                water,
                veg(g_tree) * CANOPY_SHADE,
                veg(g),
                0.5 * veg(g) + 0.5 * SPEC["water"],
                veg(g),  # crops: replaced per pixel below
                0.5 * veg(g) + 0.5 * bare,
                SPEC["built"],
                bare,
                SPEC["snow"],
                0.85 * veg(max(g_tree, 0.8)) * CANOPY_SHADE + 0.15 * SPEC["water"],
                0.4 * veg(g) + 0.6 * SPEC["soil"] * 0.8,
            ]
        ).astype(np.float32)
        refl = spectra[cls]  # (S, S, 13)
        crop = cls == C["crops"]
        cs = crop_state[crop][:, None]
        stubble = (par_kind[parcel] == 1)[crop][:, None]
        refl[crop] = cs * SPEC["green"] + (1 - cs) * np.where(stubble, SPEC["dryveg"], SPEC["soil"])
        mg = (g * (0.6 + 0.4 * par_state[parcel]))[meadow][:, None]
        refl[meadow] = mg * SPEC["green"] + (1 - mg) * SPEC["dryveg"]
        refl[fieldish] *= np.clip(1 + par_bright[parcel][fieldish], 0.6, 1.5)[:, None]
        refl[road] = SPEC["built"] * 0.7  # asphalt
        # texture: within fields per parcel, canopy crowns and gaps in forests, roofs in settlements
        amp = np.full((S, S), 0.07, np.float32) + 0.04 * np.abs(texture)
        amp = np.where(fieldish, par_tex[parcel], amp)
        amp = np.where(np.isin(cls, [C["trees"], C["mangrove"]]), 0.2, amp)
        amp = np.where(cls == C["water"], 0.01, amp)
        built = (cls == C["built"]) & ~road
        amp = np.where(built, 0.3, amp)
        tex = 0.5 * fine[0] + 0.9 * fine[1]
        refl *= (1 + amp[..., None] * tex[..., None] * TEXTURE_BAND_GAIN).clip(0.2, None)
        refl = refl * (1 - snow[..., None]) + snow[..., None] * SPEC["snow"]
        cos_i = _cos_incidence(dzdx, dzdy, zen, az)
        illum = np.clip(cos_i / max(np.cos(np.radians(zen)), 0.05), 0.1, 3.0) ** 0.6
        illum = np.where(cls == C["water"], 1.0, illum).astype(np.float32)
        refl *= illum[..., None]
        vars(st).update(aridity=aridity, crop=crop, illum=illum, refl=refl)

    def _clouds(self, st: _TileState) -> None:
        """Clouds, their shadows and cirrus; L1C's atmosphere; the sensor's blur, noise and native
        resolution."""
        P_m, S, T_m, az, cover, product, refl, rng, zen = st.get("P_m S T_m az cover product refl rng zen")
        # cloud type: cumulus fields in warm wet months, stratiform sheets otherwise; cirrus more
        # often in wet climates (B10, L1C)
        cumulus = T_m > 15 and P_m > 40
        cirrus_on = rng.random() < 0.08 + 0.25 * float(np.clip(P_m / 150.0, 0, 1))
        cf = smooth_fields(rng, S, [4.0 if cumulus else 16.0, 20.0])
        alpha = np.zeros((S, S), np.float32)
        if cover > 0.005:
            thr = np.quantile(cf[0], 1 - cover)
            alpha = np.clip((cf[0] - thr) / (0.3 if cumulus else 0.6), 0, 1).astype(np.float32)
        shift = int(np.clip(rng.uniform(300, 1000) * np.tan(np.radians(min(zen, 75))) / 10, 0, S // 2))
        dy = int(round(shift * np.cos(np.radians(az))))  # shadows fall away from the sun
        dx = int(round(-shift * np.sin(np.radians(az))))
        shadow = np.roll(alpha, (dy, dx), axis=(0, 1)) * (1 - alpha)
        cirrus = np.zeros((S, S), np.float32)
        if cirrus_on:
            cirrus = (np.clip(cf[1] - 0.5, 0, None) * 0.05).astype(np.float32)
        refl *= (1 - 0.6 * shadow)[..., None]
        refl = refl * (1 - alpha[..., None]) + alpha[..., None] * SPEC["cloud"]
        refl += cirrus[..., None] * 0.5
        if product == "L1C":
            aerosol = float(rng.uniform(0.6, 1.4))
            refl = refl * TRANS + PATH * aerosol
            refl[..., 10] = 0.002 + cirrus * 2 + 0.02 * alpha
        refl = refl.transpose(2, 0, 1)
        refl = landscape.gaussian_blur(refl, MTF_SIGMA_PX)  # the sensor's point spread: mixed pixels
        # noise per native pixel: the block mean below divides it by the block width
        noise_std = (S2_NOISE * S2_NATIVE_FACTOR)[:, None, None]
        refl += rng.standard_normal(refl.shape, dtype=np.float32) * noise_std
        refl = to_native_resolution(refl, S2_NATIVE_FACTOR)
        s2 = np.clip(np.rint(refl * 10000), 1, 65535).astype(np.uint16)
        if product == "L2A":
            s2[10] = 0  # no B10 in L2A
        vars(st).update(alpha=alpha, cirrus=cirrus, s2=s2, shadow=shadow)

    def _s2_masks(self, st: _TileState) -> None:
        """The Sentinel-2 masks of the scene: SCL and cloud probability (L2A), QA60."""
        (
            S, alpha, cirrus, cls, crop, crop_state, illum, product, rng, shadow, snow
        ) = st.get(
            "S alpha cirrus cls crop crop_state illum product rng shadow snow"
        )  # fmt: skip
        qa_opaque = _block_max(alpha > 0.5, 6)
        qa_cirrus = _block_max(cirrus > 0.01, 6)
        qa60 = np.where(qa_opaque, 1, np.where(qa_cirrus, 2, 0)).astype(np.uint8)
        # the ground the scene hides (SCL 8-9, 3 and 11 below; the downstream tasks read it too)
        cloudy, shadowed, snowy = alpha > 0.25, shadow > 0.3, snow > 0.3
        if product == "L2A":
            scl = np.where(VEG_CLASSES[cls] | (crop & (crop_state > 0.4)), 4, 5).astype(np.uint8)
            scl[cls == C["water"]] = 6
            scl[snowy] = 11
            scl[illum < 0.35] = 2
            scl[shadowed] = 3
            scl[cirrus > 0.01] = 10
            scl[cloudy] = 8
            scl[alpha > 0.6] = 9
            prob = alpha * 100 + rng.normal(0, 3, alpha.shape)
            cldprb = np.where(alpha > 0.02, np.clip(np.rint(prob), 0, 100), 0).astype(np.uint8)
        else:
            scl = np.full((S, S), 255, np.uint8)
            cldprb = np.full((S, S), 255, np.uint8)
        masks = np.stack([scl, cldprb, qa60])
        vars(st).update(masks=masks, obscured=cloudy | shadowed | snowy)

    def _sentinel1(self, st: _TileState) -> None:
        """Sentinel-1 backscatter of each orbit direction present: class, moisture, terrain,
        speckle."""
        (
            P_m, P_prev, S, aridity, cls, crop, crop_state, dzdx, dzdy, fieldish, g, meadow, par_rough,
            par_state, parcel, rng, road, t
        ) = st.get(
            "P_m P_prev S aridity cls crop crop_state dzdx dzdy fieldish g meadow par_rough par_state parcel "
            "rng road t"
        )  # fmt: skip
        smi = float(np.clip((P_m + P_prev) / 240.0, 0, 1))
        vv = S1_VV[cls] + np.where(cls == C["bare"], -3.0 * aridity, 0.0)
        moist = ~np.isin(cls, [C["water"], C["built"], C["snow"]])
        vv = vv + np.where(moist, 2.5 * (smi - 0.4), 0.0)
        # farmland: each parcel's biomass, the canopy Sentinel-2 shows (crop state, the meadow's green),
        # raises VH by volume scattering and VV a little, and hides the soil's roughness beneath it
        bio = np.where(crop, crop_state, 0.0)
        bio = np.where(meadow, g * (0.6 + 0.4 * par_state[parcel]), bio)  # read on farmland only
        rough = par_rough[parcel] * (1 - 0.6 * bio)
        vv = vv + np.where(fieldish, rough + 1.0 * bio, 0.0)  # each parcel its roughness and moisture
        vv = np.where(road, -16.0, vv)  # smooth asphalt reflects away from the sensor
        vol = np.where(fieldish, 5.0 * bio - 3.0, np.where(VEG_CLASSES[cls] | crop, 2.0 * g, 0.0))
        vh = vv - S1_RATIO[cls] + vol
        s1 = np.full((8, S, S), np.nan, np.float32)
        polar = rng.random() < (0.7 if abs(t.lat) >= 70 else 0.02)
        orbits_present = {}
        for k, orbit in enumerate(("asc", "desc")):
            present = rng.random() < (0.85 if orbit == "asc" else 0.88)
            orbits_present[orbit] = present
            # speckle at the sensor's resolution (GRD-H: about 20 x 22 m), sampled every 10 m
            coarse = rng.gamma(S1_ENL_20M, 1 / S1_ENL_20M, (2, S // 2 + 1, S // 2 + 1)).astype(np.float32)
            if not present:
                continue
            up = np.stack([_bilinear_up(c, 2, S) for c in coarse])
            speckle = 10 * np.log10(landscape.gaussian_blur(up, 0.6).clip(1e-4, None))
            to_sensor = (S1_LOOK_AZIMUTH[orbit] + 180) % 360
            cos_loc = _cos_incidence(dzdx, dzdy, S1_INCIDENCE, to_sensor)
            terr = 10 * np.log10(np.clip(cos_loc / np.cos(np.radians(S1_INCIDENCE)), 0.05, 4.0))
            # layover where the slope facing the sensor is steeper than the incidence angle, radar
            # shadow where the slope facing away is steeper than its complement
            rise = dzdx * np.sin(np.radians(to_sensor)) + dzdy * np.cos(np.radians(to_sensor))
            facing = np.degrees(np.arctan(rise))
            terr = np.where(facing > S1_INCIDENCE, terr + 4.0, terr)
            terr = np.where(-facing > 90 - S1_INCIDENCE, -12.0, terr)
            wind = np.where(cls == C["water"], rng.normal(0, 2), 0.0)
            co = vv + terr + wind + speckle[0]
            cross = vh + terr + wind + speckle[1]
            base = 4 * k + (2 if polar else 0)
            s1[base] = co + (0.5 if polar else 0.0)
            s1[base + 1] = cross
        s1 = s1.astype(np.float16)
        s1_present = any(orbits_present.values())
        vars(st).update(orbits_present=orbits_present, s1=s1, s1_present=s1_present)

    def _canopy(self, st: _TileState) -> None:
        """Canopy height and its standard deviation."""
        S, cls, fields, g_tree, rng, t, texture = st.get("S cls fields g_tree rng t texture")
        h_tree = TREE_HEIGHT.get(t.biome, 12) * (0.75 + 0.25 * fields[5]) * (0.8 + 0.2 * g_tree)
        height = np.zeros((S, S), np.float32)
        treeish = np.isin(cls, [C["trees"], C["mangrove"]])
        height[treeish] = h_tree[treeish]
        shrub = cls == C["shrub"]
        height[shrub] = 1.5 + 0.8 * np.abs(fields[8][shrub])
        height = np.clip(height + rng.normal(0, 1.0, height.shape) * treeish, 0, 254)
        std = np.clip(2 + 0.25 * height + 0.5 * np.abs(texture), 0, 254)
        canopy = np.stack([np.rint(height), np.rint(std)]).astype(np.uint8)
        canopy[:, cls == C["water"]] = 255
        vars(st).update(canopy=canopy)

    def _labels(self, st: _TileState) -> None:
        """The label products: WorldCover (the 2020 map, crops rotated) and Dynamic World (the
        year's mode)."""
        T12, cls, meadow, n_par, parcel, rng, t = st.get("T12 cls meadow n_par parcel rng t")
        cls_2020 = cls.copy()
        if t.year != 2020:  # crop rotation between the tile's year and the 2020 map
            rotated = (rng.random(n_par) < 0.25)[parcel]
            cls_2020[rotated & (cls == C["crops"])] = C["grass"]
            cls_2020[rotated & meadow & (cls == C["grass"])] = C["crops"]
        wc_cls = landscape.worldcover_map(rng, cls_2020, len(CLASSES))
        winter, snowy = float(np.mean(T12 < 3.0)), float(np.mean(T12 < -3.0))
        dw_cls = landscape.dynamic_world_map(rng, cls, 6, winter, snowy)
        vars(st).update(dw_cls=dw_cls, wc_cls=wc_cls)

    def _result(self, st: _TileState, modalities: tuple[Modality, ...]) -> TileResult:
        """ERA5 and the tile's result: every requested modality, presence, provenance and structure."""
        (
            P12, P_m, S, T12, alpha, canopy, cls, dw_cls, fieldish, hedge, masks, orbits_present, parcel,
            obscured, pedge, product, river, river_path, road, s1, s1_present, s2, s2_date, size_px, slope, t,
            track, wc_cls, z
        ) = st.get(
            "P12 P_m S T12 alpha canopy cls dw_cls fieldish hedge masks orbits_present parcel obscured pedge "
            "product river river_path road s1 s1_present s2 s2_date size_px slope t track wc_cls z"
        )  # fmt: skip
        era5 = self._era5(t, s2_date, T12, P12)

        arrays = {
            "sentinel2": s2,
            "sentinel2_masks": masks,
            "sentinel1": s1,
            "dem": np.stack([z, slope]).astype(np.float32),
            "era5": era5,
            "dynamic_world": TO_DYNAMIC_WORLD[dw_cls][None],
            "esa_worldcover": TO_WORLDCOVER[wc_cls][None],
            "canopy_height": canopy,
            "biome": np.uint8(t.biome),
            "ecoregion": np.uint16(t.ecoregion),
        }
        present = {name: True for name in arrays}
        present["sentinel1"] = s1_present
        # every requested modality, from its empty arrays: one the offline world does not model (a new
        # registry entry) is delivered absent, as a source delivers what its archive lacks
        out = empty_arrays(modalities, S)
        for k in out:
            if k in arrays:
                out[k] = np.asarray(arrays[k], dtype=out[k].dtype)
        return TileResult(
            tile_id=t.tile_id,
            arrays=out,
            present={k: bool(present.get(k, False)) for k in out},
            s2_date=s2_date,
            s2_product=product,
            extra={
                "cloud_fraction": float((alpha > 0.5).mean()),
                "s1_orbits": orbits_present,
                "class_fractions": np.bincount(cls.ravel(), minlength=len(CLASSES)) / cls.size,
                # the objects the modalities were drawn from (not stored; for tests and inspection)
                "structure": {
                    "classes": cls,
                    "parcel": np.where(fieldish, parcel, -1).astype(np.int32),
                    "river_path": river_path,
                    "river": river,
                    "road": road,
                    "track": track,
                    "hedge": hedge,
                    "field_boundary": pedge & fieldish,
                    "field_size_px": size_px,
                    "obscured": obscured,  # ground hidden by cloud, cloud shadow or snow
                    "greenness": st.g,  # the month's greenness: 0 dormant, 1 the height of the season
                    "scene_month_precip_mm": P_m,
                },
            },
        )

    def _era5(self, t: TileRequest, date: np.datetime64, T12: np.ndarray, P12: np.ndarray) -> np.ndarray:
        d = date.astype(object)
        bi, bj = int((90 - t.lat) // 5), int((t.lon + 180) // 5)

        def month_values(year: int, month0: int) -> tuple[float, float, float, float]:
            r = np.random.default_rng([self.seed, 101, year, month0, bi, bj])
            temp = float(T12[month0]) + r.normal(0, 0.9)
            prec = float(P12[month0]) * float(r.lognormal(0, 0.35))
            dtr = 6 + 8 * float(np.clip(1 - prec / 120.0, 0, 1))
            spread = 3 + 0.1 * abs(t.lat)
            return temp, temp - dtr / 2 - spread, temp + dtr / 2 + spread, prec

        seq = []
        y, mo = d.year, d.month - 1
        for _ in range(13):  # S2 month and the 12 before it
            seq.append(month_values(y, mo))
            mo -= 1
            if mo < 0:
                y, mo = y - 1, 11
        cur, prev, window = seq[0], seq[1], seq[:12]
        year_vals = (
            float(np.mean([v[0] for v in window])),
            min(v[1] for v in window),
            max(v[2] for v in window),
            sum(v[3] for v in window),
        )
        out = []
        for tm, tmin, tmax, pr in (prev, cur, year_vals):
            out += [tm + 273.15, tmin + 273.15, tmax + 273.15, pr / 1000.0]
        return np.array(out, np.float32)


def _block_mean(a: np.ndarray, k: int) -> np.ndarray:
    """Mean over k x k blocks of a (H, W) array, edge-padded to a whole number of blocks."""
    S = a.shape[0]
    n = -(-S // k) * k
    pad = np.pad(a, ((0, n - S), (0, n - S)), mode="edge")
    return pad.reshape(n // k, k, n // k, k).mean(axis=(1, 3))


def _bilinear_up(c: np.ndarray, k: int, size: int) -> np.ndarray:
    """Bilinear resampling of a coarse grid (pixel k x k fine pixels) onto the fine grid, centres aligned."""
    n = c.shape[0]
    x = np.clip((np.arange(size) + 0.5) / k - 0.5, 0, n - 1)
    i0 = np.floor(x).astype(int)
    i1 = np.minimum(i0 + 1, n - 1)
    w = (x - i0).astype(np.float32)
    rows = c[i0] * (1 - w)[:, None] + c[i1] * w[:, None]
    return rows[:, i0] * (1 - w)[None, :] + rows[:, i1] * w[None, :]


def to_native_resolution(bands: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """Each band seen at its native pixel size (block mean), then resampled bilinearly back to 10 m.

    The sensor integrates over its own pixel, and an export on the 10 m grid interpolates the coarser
    bands the way the Earth Engine recipe asks (continuous bands bilinear).
    """
    out = bands.copy()
    size = bands.shape[-1]
    for b, k in enumerate(factors):
        if k > 1:
            out[b] = _bilinear_up(_block_mean(bands[b], int(k)), int(k), size)
    return out


def _block_max(mask: np.ndarray, k: int) -> np.ndarray:
    """Max over k x k blocks, broadcast back to full resolution (e.g. QA60's 60 m pixels)."""
    S = mask.shape[0]
    n = -(-S // k) * k
    pad = np.zeros((n, n), bool)
    pad[:S, :S] = mask
    blocks = pad.reshape(n // k, k, n // k, k).any(axis=(1, 3))
    return np.repeat(np.repeat(blocks, k, 0), k, 1)[:S, :S]
