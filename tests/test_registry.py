import numpy as np
import pytest

from mmearth_data import registry


def test_every_stored_modality_has_consistent_schema():
    for m in registry.MODALITIES:
        assert len(m.bands) == m.n_bands > 0
        shape = m.shape(5, 64)
        assert len(shape) == len(m.dims())
        if m.kind == "pixel":
            assert shape == (5, m.n_bands, 64, 64)
        if m.categorical:
            assert m.resampling == "nearest", f"{m.name}: categorical maps must not be interpolated"
        if m.categorical:
            assert m.fill not in m.classes, f"{m.name}: fill value collides with a class"
        d = m.to_dict()
        assert d["name"] == m.name and d["bands"] == list(m.bands)


def test_sentinel2_band_order_keeps_b8_before_b8a():
    s2 = registry.get("sentinel2")
    assert s2.bands.index("B8") + 1 == s2.bands.index("B8A")
    assert "B10" in s2.bands and "B10" not in registry.S2_L2A_BANDS


def test_worldcover_tree_cover_is_a_class_not_nodata():
    wc = registry.get("esa_worldcover")
    assert wc.classes[10] == "tree_cover" and wc.fill == 0


def test_unknown_modality_names_the_known_ones():
    with pytest.raises(registry.RegistryError, match="known modalities: sentinel2"):
        registry.get("landsat")


def test_fill_detection_is_nan_aware():
    s1 = registry.get("sentinel1")
    assert s1.is_fill(np.array([np.nan, -10.0], np.float16)).tolist() == [True, False]
    ch = registry.get("canopy_height")
    assert ch.is_fill(np.array([255, 0], np.uint8)).tolist() == [True, False]
