"""Figures of a sample plan: a world map of the tiles and the biome x year counts.

Data flow: sampling plan -> PNG files in the build's artifact folder. The land outline comes from the
committed world layers: no tile server, no network.
"""

from __future__ import annotations

from typing import IO

import geopandas as gpd
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from mmearth_data.registry import BIOME_CLASSES  # noqa: E402
from mmearth_data.world import get_world  # noqa: E402

BIOME_COLORS = plt.get_cmap("tab20")(np.linspace(0, 1, 20))[:14]


def sample_map(plan: gpd.GeoDataFrame, out: str | IO[bytes]) -> None:
    """World map of the primary tiles coloured by biome."""
    p = plan[plan["rank"] == 0]
    land = get_world().land[::6, ::6] >= 50
    fig, ax = plt.subplots(figsize=(12, 6.2))
    ax.imshow(np.where(land, 0.85, 1.0), cmap="gray", vmin=0, vmax=1, extent=(-180, 180, -90, 90))
    for b, name in BIOME_CLASSES.items():
        sel = p[p["biome"] == b]
        ax.scatter(sel["lon"], sel["lat"], s=6, color=BIOME_COLORS[b - 1], label=f"{b} {name}")
    ax.set(xlim=(-180, 180), ylim=(-90, 90), xlabel="longitude", ylabel="latitude")
    ax.set_title(f"{len(p)} planned tiles, years {sorted(p['year'].unique().tolist())}")
    ax.legend(fontsize=6, loc="lower left", markerscale=2, ncol=2)
    fig.tight_layout()
    fig.savefig(out, format="png", dpi=110)
    plt.close(fig)


def strata_plot(plan: gpd.GeoDataFrame, out: str | IO[bytes]) -> None:
    """Primary tiles per biome, stacked by year."""
    p = plan[plan["rank"] == 0]
    years = sorted(p["year"].unique())
    counts = np.array([[((p["biome"] == b) & (p["year"] == y)).sum() for y in years] for b in BIOME_CLASSES])
    fig, ax = plt.subplots(figsize=(10, 5))
    bottom = np.zeros(len(BIOME_CLASSES))
    for k, y in enumerate(years):
        ax.barh(list(BIOME_CLASSES), counts[:, k], left=bottom, label=str(y))
        bottom += counts[:, k]
    ax.set_yticks(list(BIOME_CLASSES), [f"{b} {n[:38]}" for b, n in BIOME_CLASSES.items()], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("tiles")
    ax.set_title("tiles per biome x year")
    ax.legend(title="year")
    fig.tight_layout()
    fig.savefig(out, format="png", dpi=110)
    plt.close(fig)
