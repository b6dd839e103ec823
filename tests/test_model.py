"""MP-MAE: masked execution equal to sparse convolution, losses from the registry, the streaming
dataset's coverage and crops, and the training CLI (resume, bad input)."""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import re
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from mmearth_data.build import BuildConfig, build_in_process
from mmearth_data.registry import MODALITIES, Modality, get
from mmearth_data.store import CorpusReader, StoreError
from model.data import DataError, StreamingCorpus, class_lookup, make_loader
from model.encoder import SIZES, MaskedConvNeXtV2
from model.mpmae import MPMAE, random_mask, select_pretext
from model.pretrain import main as pretrain_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _perturb_masked(x: torch.Tensor, mask: torch.Tensor, p: int) -> torch.Tensor:
    big = mask.repeat_interleave(p, -2).repeat_interleave(p, -1)[:, None].bool().expand_as(x)
    x2 = x.clone()
    x2[big] = torch.randn(int(big.sum())) * 50
    return x2


@pytest.mark.parametrize("size", sorted(SIZES))
@pytest.mark.parametrize("patch,img", [(8, 56), (16, 112)])
def test_masked_input_never_reaches_visible_outputs(size, patch, img):
    torch.manual_seed(0)
    enc = MaskedConvNeXtV2(size, in_chans=13, patch_size=patch).eval()
    with torch.no_grad():  # non-zero biases, LayerNorm shifts and GRN parameters
        for prm in enc.parameters():
            if prm.ndim == 1:
                prm.normal_(0, 0.05)
    x = torch.randn(2, 13, img, img)
    mask = random_mask(2, img // patch, 0.6)
    x2 = _perturb_masked(x, mask, patch)
    with torch.no_grad():
        a, b = enc(x, mask), enc(x2, mask)
        # the dense fallback that zeroes the input once only is not equivalent: biases and norms at
        # masked positions leak into visible outputs
        naive_keep = 1 - mask.repeat_interleave(patch, -2).repeat_interleave(patch, -1)[:, None]
        naive = enc(x * naive_keep)
    visible = (mask == 0)[:, None].expand_as(a)
    assert a.shape == (2, SIZES[size].dims[-1], img // patch, img // patch)
    assert torch.allclose(a[visible], b[visible], atol=1e-5)
    assert a[visible].abs().mean() > 1e-3  # the features are not trivially zero
    assert torch.all(a[~visible] == 0)
    assert not torch.allclose(naive[visible], a[visible], atol=1e-3)


def _dataset(store, mods=None, **kw) -> StreamingCorpus:
    mods = mods or select_pretext("all")
    return StreamingCorpus(store, mods, kw.pop("img_size", 56), **kw)


def _batch(ds: StreamingCorpus, n: int) -> dict[str, torch.Tensor]:
    return next(iter(DataLoader(ds, batch_size=n)))


def test_loss_finite_with_nan_targets_and_missing_sentinel1(small_store):
    torch.manual_seed(0)
    ds = _dataset(small_store, epochs=1)
    batch = _batch(ds, 6)
    batch["sentinel1"][0] = float("nan")  # a tile without Sentinel-1 at all
    batch["dem"][1, :, :10] = float("nan")
    batch["sentinel2"][2, :, 5:9, 5:9] = float("nan")  # NaN Sentinel-2 must not reach the encoder
    batch["era5"][3] = float("nan")
    batch["biome"][4] = -1
    model = MPMAE(select_pretext("all"), "atto", 8, decoder_dim=64)
    loss, logs = model(batch)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert set(logs) >= {m.name for m in select_pretext("all")}
    # every target missing everywhere: zero loss for it, still finite overall
    batch["sentinel1"][:] = float("nan")
    loss2, logs2 = model(batch)
    assert torch.isfinite(loss2) and float(logs2["sentinel1"]) == 0.0


def test_per_modality_decoders_and_plain_sum(small_store):
    ds = _dataset(small_store, epochs=1)
    batch = _batch(ds, 4)
    targets = select_pretext("pixel")
    model = MPMAE(targets, "atto", 8, decoder="per-modality", decoder_dim=32, weighting="sum")
    assert set(model.decoders) == {m.name for m in targets}
    loss, logs = model(batch)
    assert torch.isfinite(loss)
    assert not any(k.startswith("w/") for k in logs)
    assert torch.allclose(loss, sum(logs[m.name] for m in targets))


def test_a_modality_added_to_the_registry_gets_a_head_and_a_loss():
    soil = Modality(
        name="soil_moisture",
        kind="pixel",
        bands=("sm",),
        dtype="float32",
        fill=float("nan"),
        units="m3/m3",
        resampling="bilinear",
        description="test",
        provider="test",
        license="CC0-1.0",
    )
    koppen = replace(get("biome"), name="koppen", classes={1: "A", 2: "B", 3: "C", 4: "D", 5: "E"})
    registry = MODALITIES + (soil, koppen)
    targets = select_pretext("s2,soil_moisture,koppen", registry)
    assert [m.name for m in targets] == ["sentinel2", "soil_moisture", "koppen"]
    model = MPMAE(targets, "atto", 8, decoder_dim=32)
    assert model.heads["soil_moisture"].pred.out_channels == 8 * 8 * 1
    assert model.heads["koppen"].pred.out_features == 5
    batch = {
        "sentinel2": torch.randn(3, 12, 56, 56),
        "soil_moisture": torch.rand(3, 1, 56, 56),
        "koppen": torch.tensor([0, 4, -1]),
    }
    loss, logs = model(batch)
    loss.backward()
    assert float(logs["soil_moisture"]) > 0 and float(logs["koppen"]) > 0
    assert model.heads["soil_moisture"].pred.weight.grad.abs().sum() > 0


def test_pretext_selection():
    assert [m.name for m in select_pretext("s2")] == ["sentinel2"]
    pix = {m.name for m in select_pretext("pixel")}
    img = {m.name for m in select_pretext("image")}
    assert "dem" in pix and "era5" not in pix
    assert {"era5", "biome", "ecoregion", "location", "time"} <= img and "dem" not in img
    assert "sentinel2_masks" not in {m.name for m in select_pretext("all")}
    with pytest.raises(ValueError, match="unknown modality nope"):
        select_pretext("dem,nope")


def test_worldcover_tree_cover_is_a_class_not_nodata():
    lut = class_lookup(get("esa_worldcover"))
    assert lut[10] == 0 and lut[0] == -1 and lut[100] == len(get("esa_worldcover").classes) - 1
    assert lut[get("dynamic_world").fill] == -1


@pytest.mark.parametrize(
    "world,workers", [(1, 0), (2, 0), (2, 2), (3, 2), (4, 2)]
)  # 4 x 2: 2 nodes x 2 ranks x 2 workers
def test_ranks_and_workers_cover_each_tile_exactly_once(small_store, world, workers):
    seen = []
    for rank in range(world):
        ds = _dataset(small_store, epochs=1, rank=rank, world_size=world, shuffle_buffer=8)
        for b in make_loader(ds, 5, workers):
            seen.extend(int(i) for i in b["index"])
    eligible = np.flatnonzero(_dataset(small_store).eligible)
    assert sorted(seen) == sorted(eligible.tolist())


def test_stream_is_shuffled_and_restartable(small_store):
    full = [int(s["index"]) for s in _dataset(small_store, epochs=2, shuffle_buffer=16)]
    n = len(full) // 2
    assert sorted(full[:n]) == sorted(full[n:]) and full[:n] != full[n:]  # epochs reshuffle
    resumed = [int(s["index"]) for s in _dataset(small_store, epochs=2, shuffle_buffer=16, start=n + 3)]
    assert resumed == full[n + 3 :]
    # a DataLoader with 2 workers resumed after 3 batches yields exactly the rest of the stream
    kw = dict(shuffle_buffer=8, batch_size=4)
    dl = make_loader(_dataset(small_store, **kw), 4, 2)
    whole = [b["index"].tolist() for b in itertools.islice(dl, 20)]
    dl2 = make_loader(_dataset(small_store, start_batches=3, **kw), 4, 2)
    assert [b["index"].tolist() for b in itertools.islice(dl2, 17)] == whole[3:]


def test_crops_are_aligned_across_modalities_and_normalised_by_level(small_store):
    reader = CorpusReader(small_store)
    mods = [get("sentinel2"), get("dem"), get("esa_worldcover")]
    ds = StreamingCorpus(small_store, mods, 40, epochs=1)
    stats = reader.statistics["sentinel2"]
    levels = []
    for s in list(ds)[:12]:
        i = int(s["index"])
        dem = np.asarray(reader.group["dem"][i], np.float32)
        wc = np.asarray(reader.group["esa_worldcover"][i, 0])
        s2 = np.asarray(reader.group["sentinel2"][i], np.float32)
        # locate the crop in the DEM, then check the other modalities at the same window
        elev = dem[0]
        target = s["dem"][0, 0, 0].item() * ds.norm["dem"].std[0] + ds.norm["dem"].mean[0]
        cands = np.argwhere(np.isclose(elev[:-39, :-39], target, rtol=0, atol=1e-2))
        found = False
        for y, x in cands:
            back = s["dem"].numpy() * ds.norm["dem"].std[:, None, None] + ds.norm["dem"].mean[:, None, None]
            if np.allclose(back, dem[:, y : y + 40, x : x + 40], atol=1e-2):
                found = True
                break
        assert found
        lut = class_lookup(get("esa_worldcover"))
        assert np.array_equal(s["esa_worldcover"].numpy(), lut[wc[y : y + 40, x : x + 40]])
        level = reader.group["s2_product"][i]
        st = stats[str(level)]
        b4 = (s2[3, y : y + 40, x : x + 40] - st["B4"]["mean"]) / st["B4"]["std"]
        assert np.allclose(s["sentinel2"][3].numpy(), b4, atol=1e-4)
        levels.append(str(level))
    assert {"L1C", "L2A"} <= set(levels)


def test_dataset_reads_an_fsspec_url(tiny_store):
    import fsspec
    import zarr

    url = "memory://model-test/store.zarr"
    src = zarr.open_group(tiny_store, mode="r")
    fs = fsspec.filesystem("memory")
    local = fsspec.filesystem("file")
    for path in local.find(tiny_store):
        fs.pipe(url.replace("memory://", "/") + path[len(tiny_store) :], local.cat_file(path))
    ds = _dataset(url, epochs=1, img_size=32)
    got = sorted(int(s["index"]) for s in ds)
    assert got == np.flatnonzero(ds.eligible).tolist() and len(got) > 0
    assert src.attrs["n_tiles"] == ds.n_tiles


def test_missing_modality_and_sizes_are_data_errors(tmp_path, small_store):
    store = str(tmp_path / "nos1.zarr")
    mods = tuple(m.name for m in MODALITIES if m.stored and m.name != "sentinel1")
    build_in_process(BuildConfig(store=store, n_tiles=16, tile_size=64, seed=1, modalities=mods))
    with pytest.raises(DataError, match="lacks sentinel1"):
        _dataset(store)
    with pytest.raises(DataError, match="exceeds the store's tile size"):
        _dataset(small_store, img_size=96)


# a tiny model run: small crops, small batch, small decoder
TINY = ["--img-size", "32", "--patch-size", "8", "--batch-size", "4", "--decoder-dim", "32"]


def _pretrain(*args, model: str = "atto") -> int:
    return pretrain_main(["--no-progress", "--model", model, *TINY, *args])


@pytest.mark.parametrize("weighting", ["uncertainty", "balanced"])
def test_resume_continues_exactly(tmp_path, small_store, capsys, weighting):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    w = ("--weighting", weighting)
    assert _pretrain("--store", small_store, "--out", a, "--steps", "4", *w) == 0
    assert _pretrain("--store", small_store, "--out", b, "--steps", "4", "--stop-after", "2", *w) == 0
    state = torch.load(f"{b}/state.pt", weights_only=True)
    assert int(state["step"]) == 2
    assert _pretrain("--store", small_store, "--out", b, "--steps", "4", "--resume", *w) == 0
    wa, wb = load_file(f"{a}/model.safetensors"), load_file(f"{b}/model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6), k
    sa = torch.load(f"{a}/state.pt", weights_only=True)["optimizer"]["state"]
    sb = torch.load(f"{b}/state.pt", weights_only=True)["optimizer"]["state"]
    for k in sa:
        assert torch.allclose(sa[k]["exp_avg_sq"], sb[k]["exp_avg_sq"], atol=1e-9)
    lines = open(f"{b}/metrics.csv").read().splitlines()
    assert [ln.split(",")[0] for ln in lines[1:]] == ["1", "2", "3", "4"]
    assert os.path.getsize(f"{b}/loss_curves.png") > 10_000
    assert "encoder.stages.3.blocks.1.mlp.grn.weight" in wa  # timm's parameter names
    assert ("grad_norms" in wa) == (weighting == "balanced")  # the running norms resume with the run
    assert "w/sentinel2" in lines[0]


def test_bf16_autocast_on_cpu_changes_the_arithmetic_not_the_run(tmp_path, small_store):
    runs = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        argv = ["--store", small_store, "--out", str(out), "--steps", "2", "--precision", precision]
        assert _pretrain(*argv) == 0
        with open(out / "metrics.csv") as f:
            runs[precision] = [float(r["loss/sentinel2"]) for r in csv.DictReader(f)]
        assert json.loads(torch.load(out / "state.pt", weights_only=True)["args"])["precision"] == precision
    # step 1: the same batch, masks and weights; only the forward pass's precision differs. The logged
    # loss (6 digits) is dominated by the target at initialisation, so the weights show the difference
    a, b = runs["fp32"][0], runs["bf16"][0]
    assert abs(a - b) < 0.02 * a
    wa, wb = (load_file(str(tmp_path / p / "model.safetensors")) for p in ("fp32", "bf16"))
    assert any(not torch.equal(wa[k], wb[k]) for k in wa)
    assert all(math.isfinite(v) for v in runs["bf16"])


def test_bad_input_exits_2(tmp_path, small_store, capsys):
    out = str(tmp_path / "r")
    assert _pretrain("--store", small_store, "--out", out, "--steps", "1", "--img-size", "36") == 2
    assert "not a multiple of --patch-size" in capsys.readouterr().err
    assert _pretrain("--store", small_store, "--out", out, "--steps", "1", "--patch-size", "12") == 2
    assert "multiple of 8" in capsys.readouterr().err
    assert _pretrain("--store", str(tmp_path / "none.zarr"), "--out", out, "--steps", "1") == 2
    assert "not a corpus store" in capsys.readouterr().err
    assert _pretrain("--store", small_store, "--out", out, "--steps", "1") == 0
    capsys.readouterr()
    assert _pretrain("--store", small_store, "--out", out, "--steps", "2") == 2
    assert "pass --resume" in capsys.readouterr().err
    rc = _pretrain("--store", small_store, "--out", out, "--steps", "2", "--resume", model="femto")
    assert rc == 2
    assert "another model (model: checkpoint 'atto', now 'femto')" in capsys.readouterr().err
    rc = _pretrain("--store", small_store, "--out", out, "--steps", "2", "--resume", "--aux-loss-on", "all")
    assert rc == 2
    assert "aux_loss_on: checkpoint 'masked', now 'all'" in capsys.readouterr().err


def test_pretraining_from_python_options_equals_the_command_line(tmp_path, tiny_store):
    from model.pretrain import UsageError, options, run

    cli, py = str(tmp_path / "cli"), str(tmp_path / "py")
    assert _pretrain("--store", tiny_store, "--out", cli, "--steps", "2", "--blr", "1e-3") == 0
    res = run(
        options(
            store=tiny_store, out=py, steps=2, blr=1e-3, model="atto", img_size=32, patch_size=8,
            batch_size=4, decoder_dim=32, no_progress=True,
        )
    )  # fmt: skip
    assert res["step"] == 2 and res["checkpoint"] == f"{py}/model.safetensors"
    wa, wb = load_file(f"{cli}/model.safetensors"), load_file(f"{py}/model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    with pytest.raises(UsageError, match=r"unknown pretraining options \['img'\]"):
        options(store=tiny_store, out=py, img=32)
    with pytest.raises(UsageError, match="needs out"):
        options(store=tiny_store)


@pytest.mark.slow
def test_torchrun_two_ranks_see_disjoint_tiles(tmp_path, small_store):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "model.pretrain",
           "--store", small_store, "--out", str(out), "--model", "atto", *TINY,
           "--steps", "3", "--log-tiles", "--no-progress"]  # fmt: skip
    subprocess.run(cmd, cwd=REPO, check=True, timeout=600)
    r0 = [int(x) for x in (out / "tiles_rank0.txt").read_text().split()]
    r1 = [int(x) for x in (out / "tiles_rank1.txt").read_text().split()]
    assert len(r0) == len(r1) == 12
    assert not set(r0) & set(r1)
    assert (out / "model.safetensors").exists()


def test_linear_probe_runs_on_a_pretrained_run(tmp_path, small_store, capsys):
    from model.probe import main as probe_main

    out = str(tmp_path / "p")
    assert _pretrain("--store", small_store, "--out", out, "--steps", "2") == 0
    assert probe_main(["--store", small_store, "--run", out, "--target", "biome"]) == 0
    res = json.loads((tmp_path / "p" / "probe_biome.json").read_text())
    for name in ("pretrained", "random init"):
        r = res["results"][name]
        assert 0.0 <= r["accuracy"] <= 1.0 and r["n_train"] > 0 and r["n_test"] > 0
        assert r["seeds"] == 1 and r["std"] == 0.0
    assert probe_main(["--store", small_store, "--run", out, "--target", "biome", "--seeds", "3"]) == 0
    res = json.loads((tmp_path / "p" / "probe_biome.json").read_text())
    assert res["results"]["random init"]["seeds"] == 3 and res["results"]["random init"]["std"] > 0
    assert res["gap_beyond_spread"] == (
        res["gap"] > res["results"]["pretrained"]["std"] + res["results"]["random init"]["std"]
    )
    assert "sum of the two spreads" in capsys.readouterr().out
    assert probe_main(["--store", small_store, "--run", out, "--target", "dem"]) == 2
    assert "tile-level categorical" in capsys.readouterr().err
    assert probe_main(["--store", small_store, "--run", str(tmp_path / "none")]) == 2


def sparse_reference(enc: MaskedConvNeXtV2, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """What a sparse ConvNeXt V2 computes, written independently of the encoder's own masking: every
    operation runs densely and the mask is re-applied after each one, so a masked site never holds a
    value and never contributes to a neighbour (sparse convolutions skip absent sites; sparse LayerNorm,
    GELU and GRN see only present sites)."""
    import torch.nn.functional as F

    from model.encoder import upsample_mask

    def m(t):
        return t * upsample_mask(mask, t.shape[-1]).to(t.dtype)

    s = enc.stem
    t = m(x)
    t = m(s["conv"](t))
    t = m(s["norm"](t))
    t = m(F.gelu(t))
    t = m(s["conv_dw"](t))
    t = m(s["norm_dw"](t))
    for i, stage in enumerate(enc.stages):
        if i > 0:
            t = m(stage.downsample[0](t))
            t = m(stage.downsample[1](t))
        for blk in stage.blocks:
            short = t
            u = m(blk.conv_dw(t))
            u = m(blk.norm(u))
            u = m(blk.mlp.fc1(u))
            u = m(blk.mlp.act(u))
            u = m(blk.mlp.grn(u))  # GRN's spatial norm: only present sites, which are non-zero
            u = m(blk.mlp.fc2(u))
            t = m(u + short)
    return t


def test_an_encoder_stops_after_the_stages_asked():
    enc = MaskedConvNeXtV2("atto", in_chans=12, patch_size=8).eval()
    x = torch.randn(2, 12, 56, 56)
    with torch.no_grad():
        full = enc(x)
        shapes = [tuple(enc(x, stages=n).shape) for n in range(1, 5)]
        assert torch.equal(enc(x, stages=4), full)
    assert shapes == [(2, d, 7 * 2 ** (3 - i), 7 * 2 ** (3 - i)) for i, d in enumerate(enc.dims)]


@pytest.mark.parametrize("size", ["atto", "femto"])
@pytest.mark.parametrize("patch,img", [(8, 56), (16, 112)])
def test_masked_encoder_equals_the_sparse_reference_exactly(size, patch, img):
    torch.manual_seed(1)
    enc = MaskedConvNeXtV2(size, in_chans=12, patch_size=patch).eval()
    with torch.no_grad():
        for prm in enc.parameters():
            if prm.ndim == 1:
                prm.normal_(0, 0.05)
    x = torch.randn(2, 12, img, img)
    mask = random_mask(2, img // patch, 0.6)
    with torch.no_grad():
        got, want = enc(x, mask), sparse_reference(enc, x, mask)
        # over-masking (dropping a visible patch too) would pass a leakage test but not this one
        more = mask.clone()
        more[0, 0, 0] = 1 - more[0, 0, 0]
        other = enc(x, more)
    assert torch.equal(got, want)
    assert not torch.equal(other, want)


def test_pretext_bench_splits_a_patch_into_spectral_and_spatial_parts():
    split_parts = _bench("pretext").split_parts
    t = torch.randn(2, 12, 3, 4, 3, 4)
    spectral, spatial = split_parts(t)
    assert spectral.shape == (2, 3, 3)
    assert torch.allclose(spectral + spatial, (t**2).mean(dim=(1, 3, 5)), atol=1e-6)  # an exact split
    flat = t.mean(dim=(3, 5), keepdim=True).expand_as(t)  # each band constant within its patch
    assert torch.allclose(split_parts(flat)[1], torch.zeros(2, 3, 3), atol=1e-6)
    edge = torch.zeros(1, 12, 1, 4, 1, 4)
    edge[..., :2] = 1.0
    edge[..., 2:] = -1.0  # the same edge in every band: no spectral shape at all
    spectral, spatial = split_parts(edge)
    assert float(spectral) == 0.0 and float(spatial) == 1.0


def test_sentinel2_target_is_normalised_per_patch_jointly_over_its_bands():
    from model.mpmae import Target, pixel_loss

    p = 4
    y = torch.zeros(1, 12, 8, 8)
    for b in range(12):  # each band constant within the patch, bands at different levels
        y[:, b] = float(b)
    y[:, :, :, 4:] += torch.randn(1, 12, 8, 4) * 0.1  # texture in the right-hand patches
    mask = torch.ones(1, 8, 8)
    pred = torch.zeros_like(y)
    s2 = get("sentinel2")
    joint, _ = pixel_loss(Target.of(s2, "joint"), pred, y, mask, p)
    per_band, _ = pixel_loss(Target.of(s2, "per-band"), pred, y, mask, p)
    # jointly, a patch keeps its spectral shape (unit variance over all its values); per band, the
    # left-hand patches' shape is removed entirely and only noise remains on the right
    assert joint.item() == pytest.approx(1.0, abs=1e-3)
    assert per_band.item() < 0.51
    assert Target.of(s2).n_out == 12 and Target.of(s2).norm_pix == "joint"


def test_cloud_aware_losses_leave_opaque_cloud_out():
    from model.data import opaque_cloud
    from model.mpmae import Target, pixel_loss

    masks = np.zeros((1, 3, 4, 4), np.uint8)
    masks[0, 0] = [[4, 8, 9, 3]] * 4  # SCL: vegetation, cloud medium, cloud high, shadow
    masks[0, 2, 3] = 1  # QA60 opaque on the last row
    cloud = opaque_cloud(masks)[0]
    assert cloud[:3].tolist() == [[False, True, True, False]] * 3 and cloud[3].all()
    t = Target.of(get("dem"))
    target = torch.randn(1, 2, 4, 4)
    pred = torch.zeros_like(target)
    mask = torch.ones(1, 4, 4)
    _, n_all = pixel_loss(t, pred, target, mask, 4)
    _, n_clear = pixel_loss(t, pred, target, mask, 4, torch.from_numpy(cloud)[None])
    assert n_all == 32 and n_clear == 2 * int((~cloud).sum())


def test_other_pixel_targets_are_scored_on_masked_patches_or_on_every_pixel():
    torch.manual_seed(0)
    targets = [get("sentinel2"), get("dynamic_world"), get("dem")]
    mask = torch.zeros(2, 2, 2)
    mask[:, 0, 0] = 1  # one masked patch of four
    batch = {
        "sentinel2": torch.randn(2, 12, 16, 16),
        "dynamic_world": torch.randint(0, 9, (2, 16, 16)),
        "dem": torch.randn(2, 2, 16, 16),
    }
    visible = torch.ones(16, 16, dtype=torch.bool)
    visible[:8, :8] = False
    changed = {
        "sentinel2": batch["sentinel2"],  # the same input, so the same predictions
        "dynamic_world": torch.where(visible, (batch["dynamic_world"] + 1) % 9, batch["dynamic_world"]),
        "dem": torch.where(visible, batch["dem"] + 5.0, batch["dem"]),
    }
    for where in ("masked", "all"):
        model = MPMAE(targets, "atto", 8, decoder_dim=32, aux_loss_on=where).eval()
        with torch.no_grad():
            _, a = model(batch, mask)
            _, b = model(changed, mask)
        for name in ("dynamic_world", "dem"):
            assert torch.equal(a[name], b[name]) == (where == "masked"), (where, name)
    with pytest.raises(ValueError, match="aux_loss_on"):
        MPMAE(targets, "atto", 8, aux_loss_on="visible")


def _last_layer_gradients(model: MPMAE, batch: dict, mask: torch.Tensor) -> dict[str, float]:
    """Each target's gradient norm on the encoder's last layer, from whole backward passes of a plain
    sum: Sentinel-2 alone (every other target blanked), then Sentinel-2 plus one target, minus the first."""
    last = model.encoder.stages[-1].blocks[-1].mlp.fc2.weight

    def grad(keep: set[str]) -> torch.Tensor:
        b = {k: v for k, v in batch.items()}
        for t in model.targets[1:]:
            if t.name not in keep:
                b[t.name] = (
                    torch.full_like(b[t.name], -1)
                    if t.categorical
                    else torch.full_like(b[t.name], float("nan"))
                )
        model.zero_grad(set_to_none=True)
        loss, _ = model(b, mask)
        loss.backward()
        return last.grad.clone()

    g_s2 = grad(set())
    return {"sentinel2": float(g_s2.norm())} | {
        t.name: float((grad({t.name}) - g_s2).norm()) for t in model.targets[1:]
    }


def test_balanced_weighting_gives_every_target_the_same_gradient_on_the_encoder(small_store):
    from model.mpmae import BALANCE_EVERY

    torch.manual_seed(0)
    targets = select_pretext("s2,dynamic_world,dem,era5,biome,time")  # pixel and tile-level targets
    batch = _batch(_dataset(small_store, targets, img_size=32, epochs=1), 2)
    mask = random_mask(2, 4, 0.5, torch.Generator().manual_seed(1))
    model = MPMAE(targets, "atto", 8, decoder_dim=32, weighting="balanced").train()
    _, logs = model(batch, mask)  # the first training call measures the norms
    w = {t.name: float(logs[f"w/{t.name}"]) for t in model.targets}
    plain = MPMAE(targets, "atto", 8, decoder_dim=32, weighting="sum").train()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if k in plain.state_dict()})
    g = _last_layer_gradients(plain, batch, mask)
    bench = _bench("gradients").target_gradients(plain.eval(), batch, mask)  # one pass per head
    assert {n: v[1] for n, v in bench.items()} == pytest.approx(g, rel=1e-3)
    plain.train()
    # unweighted, the targets' gradients differ by orders of magnitude (the tile-level ones largest) ...
    assert max(g.values()) / min(g.values()) > 20, g
    assert g["time"] > 20 * g["sentinel2"], g
    # ... weighted, each moves the encoder's last layer equally
    weighted = np.array([w[n] * g[n] for n in g])
    assert weighted.max() / weighted.min() < 1.01, dict(zip(g, weighted.round(5), strict=True))
    # measured every BALANCE_EVERY training calls, not in evaluation or without gradients
    norms = model.grad_norms.clone()
    for _ in range(BALANCE_EVERY - 1):
        model(batch, mask)
    assert torch.equal(model.grad_norms, norms) and int(model.balance_calls) == BALANCE_EVERY
    with torch.no_grad():
        model(batch, mask)
    model.eval()
    _, logs_eval = model(batch, mask)
    assert torch.equal(model.grad_norms, norms) and int(model.balance_calls) == BALANCE_EVERY
    assert float(logs_eval["w/time"]) == pytest.approx(w["time"])
    model.train()
    model(batch, random_mask(2, 4, 0.5, torch.Generator().manual_seed(2)))  # the next measurement ...
    assert not torch.equal(model.grad_norms, norms)  # ... moves the running mean
    with pytest.raises(ValueError, match="balanced"):
        MPMAE(select_pretext("s2"), "atto", 8, weighting="gradnorm")


def test_tile_heads_normalise_each_position_before_pooling():
    from model.mpmae import Head, Target

    head = Head(Target.of(get("era5")), 16, 8).eval()
    y = torch.randn(2, 16, 7, 7)
    y[:, :, 3, 3] *= 100  # one position with a much larger feature scale
    with torch.no_grad():
        per_position = head.pred(head.norm(y.permute(0, 2, 3, 1)).mean(dim=(1, 2)))
        assert torch.allclose(head(y), per_position)
        pooled_first = head.pred(head.norm(y.mean(dim=(-2, -1))))
        assert not torch.allclose(head(y), pooled_first, atol=1e-3)


def test_the_loader_gives_the_model_12_bands_and_the_cloud_mask(small_store):
    ds = _dataset(small_store, select_pretext("s2"), cloud_mask=True)
    b = _batch(ds, 4)
    assert b["sentinel2"].shape == (4, 12, 56, 56) and b["cloud"].shape == (4, 56, 56)
    assert b["cloud"].dtype == torch.bool


def test_paper_recipe():
    from model.pretrain import apply_recipe, parse_args

    args = parse_args(["--store", "s", "--out", "o", "--recipe", "paper", "--batch-size", "64"])
    apply_recipe(args, world=2, n_tiles=100_000)
    assert args.epochs == 200 and args.steps is None and args.accum == 32 and args.blr == 1.5e-4
    assert args.batch_size * args.accum * 2 == 4096 and args.warmup == 977  # 40 epochs
    mine = parse_args(["--store", "s", "--out", "o", "--recipe", "paper", "--steps", "10", "--accum", "2"])
    apply_recipe(mine, world=1, n_tiles=1000)
    assert mine.steps == 10 and mine.accum == 2  # explicit options win


def test_mmearth_checkpoints_load_into_our_encoder(tmp_path):
    sys.path.insert(0, os.path.join(REPO, "tests", "data", "mmearth_ckpt"))
    import make_checkpoint

    from model.mmearth_ckpt import (
        MMEARTH_PRETRAIN_BANDS,
        CheckpointError,
        _kernel_to_weight,
        load_mmearth_encoder,
    )

    for size, patch in (("atto", 16), ("femto", 8)):
        path = str(tmp_path / f"{size}.pth")
        ref = make_checkpoint.make(path, size, patch)
        enc = load_mmearth_encoder(path).eval()
        assert enc.size == size and enc.patch_size == patch and enc.in_chans == 12
        x = torch.randn(2, 12, 7 * patch, 7 * patch)
        mask = random_mask(2, 7, 0.6)
        with torch.no_grad():
            assert torch.equal(enc(x, mask), ref(x, mask))
    # the kernel offset convention: offset index = column * k + row (first spatial axis fastest)
    kern = torch.zeros(9, 1)
    kern[1, 0] = 1.0
    w = _kernel_to_weight(kern)
    assert w.shape == (1, 1, 3, 3) and w[0, 0, 1, 0] == 1 and w.sum() == 1
    # B8A came before B8 in MMEarth's pretraining input: the stem reads our B8 from its B8 channel
    raw = torch.load(str(tmp_path / "atto.pth"), weights_only=True)["model"]
    stem = raw["encoder.initial_conv.0.kernel"]  # [9, in, out]
    ours = load_mmearth_encoder(str(tmp_path / "atto.pth")).stem["conv"].weight
    b8_ours = list(get("sentinel2").model_bands).index("B8")
    b8_theirs = MMEARTH_PRETRAIN_BANDS.index("B8")
    assert torch.equal(ours[:, b8_ours], _kernel_to_weight(stem[:, b8_theirs : b8_theirs + 1])[:, 0])
    torch.save({"model": {"decoder.weight": torch.zeros(3)}}, str(tmp_path / "bad.pth"))
    with pytest.raises(CheckpointError, match="no encoder weights"):
        load_mmearth_encoder(str(tmp_path / "bad.pth"))


def test_downstream_tasks_come_from_held_out_blocks_and_evaluate(tmp_path, small_store, capsys):
    import zarr

    from flows.cli import main as cli_main
    from mmearth_data.store import strings
    from model.evaluate import EvaluationError, evaluate
    from model.evaluate import main as evaluate_main

    tasks = str(tmp_path / "tasks.zarr")
    assert cli_main(["tasks", "build", "--out", tasks, "--tiles", "40", "--tile-size", "64"]) == 0
    g = zarr.open_group(tasks, mode="r")
    assert g["sentinel2"].shape == (40, 13, 64, 64) and g["boundaries"].shape == (40, 64, 64)
    assert set(strings(g["split"][:])) == {"train", "val", "test"}
    assert np.bincount(np.asarray(g["fields"][:]), minlength=4).tolist() == [10, 10, 10, 10]  # balanced
    # the candidates came from one process per CPU; one process draws the same store
    one = str(tmp_path / "tasks_one_worker.zarr")
    assert cli_main(["tasks", "build", "--out", one, "--tiles", "40", "--workers", "1"]) == 0
    g1 = zarr.open_group(one, mode="r")
    for name in ("sentinel2", "boundaries", "fields", "objects", "tile_id"):
        assert np.array_equal(g1[name][...], g[name][...]), name
    # held out: no task tile lies in a 1-degree block that pretraining on --split train reads
    from mmearth_data.sampling import split_of

    assert set(split_of(np.asarray(g["lat"][:]), np.asarray(g["lon"][:]))) <= {"val", "test"}
    fields, boundaries = np.asarray(g["fields"][:]), np.asarray(g["boundaries"][:])
    density = boundaries.mean((1, 2))
    assert (density > 0).all()  # every task tile is farmland
    per_class = [density[fields == k].mean() for k in range(4)]
    assert per_class == sorted(per_class, reverse=True)  # larger parcels, fewer boundary pixels
    assert cli_main(["tasks", "build", "--out", tasks, "--tiles", "40"]) == 2  # never overwritten
    out = str(tmp_path / "p")
    assert _pretrain("--store", small_store, "--out", out, "--steps", "2") == 0
    res_path = tmp_path / "eval.json"
    args = ["--tasks", tasks, "--run", out, "--seeds", "2", "--fraction", "0.5,1", "--json", str(res_path)]
    assert evaluate_main(args) == 0
    rows = json.loads(res_path.read_text())["rows"]
    assert {(r["task"], r["metric"]) for r in rows} == {
        ("fields", "accuracy"),
        ("objects", "micro_f1"),
        ("boundaries", "miou"),
    }
    assert len(rows) == 6 and all(0.0 <= r["mean"] <= 1.0 and r["seeds"] == 2 for r in rows)
    for r in rows:  # each seed's score kept, so that runs can be pooled (bench/paper.py --pretrain-seeds)
        assert len(r["values"]) == 2 and r["mean"] == pytest.approx(np.mean(r["values"]))
        assert r["std"] == pytest.approx(np.std(r["values"]))
    assert {r["stage"] for r in rows} == {3}  # the final stage
    assert evaluate_main(["--tasks", tasks, "--run", out, "--fraction", "2"]) == 2
    early = tmp_path / "stage0.json"
    assert (
        evaluate_main(["--tasks", tasks, "--run", out, "--seeds", "1", "--stage", "0", "--json", str(early)])
        == 0
    )
    assert [r["stage"] for r in json.loads(early.read_text())["rows"]] == [0, 0, 0]
    assert evaluate_main(["--tasks", tasks, "--run", out, "--stage", "4"]) == 2
    assert "give a stage in 0..3" in capsys.readouterr().err
    one = tmp_path / "fields.json"
    assert (
        evaluate_main(
            ["--tasks", tasks, "--run", out, "--seeds", "1", "--only", "fields", "--json", str(one)]
        )
        == 0
    )
    assert [r["task"] for r in json.loads(one.read_text())["rows"]] == ["fields"]
    assert evaluate_main(["--tasks", tasks, "--run", out, "--only", "fields,crops"]) == 2  # one misspelt
    assert (
        "--only crops: no such task; the sources have fields, objects, boundaries" in capsys.readouterr().err
    )
    with pytest.raises(EvaluationError, match="stage 7"):  # a bad request, not a bad checkpoint
        evaluate(tasks, out, stage=7)
    ft = tmp_path / "ft.json"
    assert evaluate_main(["--tasks", tasks, "--run", out, "--finetune", "--epochs", "1", "--seeds", "1",
                          "--json", str(ft)]) == 0  # fmt: skip
    rows = json.loads(ft.read_text())["rows"]
    assert len(rows) == 3 and all(r["protocol"] == "finetune" and 0 <= r["mean"] <= 1 for r in rows)
    progress = capsys.readouterr().err
    assert "finetune fields seed 0: epoch 1/1 loss" in progress and "val miou" in progress
    # bench/ceiling.py: a supervised network from scratch beside the linear probes, on the probes' inputs
    ceiling = _bench("ceiling")
    assert ceiling.main(["--tasks", tasks, "--run", out, "--epochs", "2", "--seeds", "2"]) == 0
    printed = capsys.readouterr().out
    assert "input (12, 32, 32)" in printed and "| plain CNN, from scratch | supervised, 2 epochs" in printed
    assert "| atto, random init" in printed and "| atto, pretrained" in printed
    assert "| hand-made statistics (band means, stds, gradient / std at 1, 2, 4 px) | linear probe" in printed
    assert re.search(r"^bench: ceiling fields_headroom=-?[0-9.]+ target=0.1 .* (ok|short)$", printed, re.M)
    assert ceiling.main(["--tasks", tasks, "--run", out, "--epochs", "0", "--seeds", "1"]) == 0
    printed = capsys.readouterr().out
    assert "plain CNN" not in printed and "(hand-made statistics' probe " in printed
    with pytest.raises(SystemExit):
        ceiling.main(["--tasks", str(tmp_path / "none.zarr"), "--run", out])
    assert "no task store there" in capsys.readouterr().err
    # bench/pretext.py: the Sentinel-2 reconstruction split into its spectral and spatial parts
    pretext = _bench("pretext")
    assert pretext.main(["--runs", f"{out},{out}", "--batches", "1", "--refit-decoder", "2"]) == 0
    printed = capsys.readouterr().out
    assert (
        printed.count("| p | all |") == 2
        and "| p, frozen encoder + fresh S2 decoder (2 steps) | all |" in printed
    )
    rows = [line for line in printed.splitlines() if line.startswith("| p | all |")]
    assert rows[0] == rows[1]  # the same run twice on the same batches and masks: the same numbers
    assert re.search(r"^bench: pretext spatial_explained_ratio=\S+ target=0.8 .* (ok|short)$", printed, re.M)
    with pytest.raises(SystemExit, match="no run at"):
        pretext.main(["--runs", str(tmp_path / "none")])


def test_task_labels_come_from_the_parcels_the_tile_shows():
    from mmearth_data.sources import landscape
    from mmearth_data.tasks import labels_of

    S = 64
    none = np.zeros((S, S), bool)

    def structure(size: float, field_rows: int = S):
        parcel, edge = landscape.fields(np.random.default_rng(0), S, size)
        parcel[field_rows:] = -1
        return {"parcel": parcel, "field_boundary": edge & (parcel >= 0), "field_size_px": 99.0,
                "river": none, "road": none, "hedge": none, "track": none, "obscured": none,
                "greenness": 0.9}  # fmt: skip

    classes = [int(labels_of(structure(w))["fields"]) for w in (4, 8, 14, 30)]
    assert classes == sorted(classes) and classes[0] == 0 and classes[-1] == 3  # not the asked-for 99 px
    assert labels_of(structure(10, field_rows=S // 5)) is None  # under 30 % farmland: not a task tile
    snow = np.zeros((S, S), bool)
    snow[: S // 5] = True
    assert labels_of(structure(10) | {"obscured": snow}) is None  # a fifth under snow or cloud: left out
    assert labels_of(structure(10) | {"greenness": 0.3}) is None  # a dormant scene: parcels hardly differ
    lab = labels_of(structure(10) | {"track": np.eye(S, dtype=bool)})
    assert lab["objects"].tolist() == [0, 0, 0, 1] and lab["boundaries"].shape == (S, S)


def test_layer_wise_lr_decay_depths():
    from model import evaluate

    enc = MaskedConvNeXtV2("atto", in_chans=12, patch_size=8)
    depths = [len(s.blocks) for s in enc.stages]  # 2, 2, 6, 2
    n = 1 + 12 + 1
    assert evaluate.layer_id("stem.conv.weight", depths) == 0
    assert evaluate.layer_id("stages.0.blocks.1.norm.weight", depths) == 2
    assert evaluate.layer_id("stages.2.downsample.1.weight", depths) == 5
    assert evaluate.layer_id("stages.3.blocks.1.mlp.fc2.weight", depths) == 12
    assert evaluate.layer_id("weight", depths) == n  # the head


def test_a_deleted_shard_or_a_vanished_store_stops_training_with_a_message(tmp_path, small_store, capsys):
    import shutil
    from pathlib import Path

    store = str(tmp_path / "s.zarr")
    shutil.copytree(small_store, store)
    shard = sorted(p for p in (Path(store) / "sentinel2" / "c").rglob("*") if p.is_file())[0]
    shard.unlink()  # reads back as fill while its tiles stay complete
    out = str(tmp_path / "r")
    assert _pretrain("--store", store, "--out", out, "--steps", "4", "--workers", "1") == 2
    err = capsys.readouterr().err
    assert "array 'sentinel2'" in err and store in err and "mmearth repair" in err
    assert "Traceback" not in err
    # without verification the fill would be trained on (the option exists for damaged-but-known stores)
    assert _pretrain("--store", store, "--out", str(tmp_path / "nv"), "--steps", "1", "--no-verify") == 0

    # a tile-level modality (read whole when the loader opens) with a shard file gone
    era5 = str(tmp_path / "e.zarr")
    shutil.copytree(small_store, era5)
    sorted(p for p in (Path(era5) / "era5" / "c").rglob("*") if p.is_file())[0].unlink()
    with pytest.raises(DataError, match=r"array 'era5', tiles 0, 1, .*no-data"):
        StreamingCorpus(era5, [get("sentinel2"), get("era5")], 32, split=None, epochs=1)

    # the cloud masks (read beside Sentinel-2 for the cloud-aware losses) with a later shard file gone
    masks = str(tmp_path / "m.zarr")
    shutil.copytree(small_store, masks)
    next(
        p for p in (Path(masks) / "sentinel2_masks" / "c").rglob("*") if p.is_file() and p.parts[-4] == "2"
    ).unlink()
    ds = StreamingCorpus(masks, [get("sentinel2")], 32, split=None, epochs=1, cloud_mask=True)
    with pytest.raises(DataError, match=r"array 'sentinel2_masks', tiles 32\.\."):
        list(ds)

    shutil.copytree(small_store, str(tmp_path / "t.zarr"))
    ds = StreamingCorpus(str(tmp_path / "t.zarr"), [get("sentinel2")], 32, split=None, epochs=1)
    shutil.rmtree(tmp_path / "t.zarr")  # the store removed between opening and reading
    with pytest.raises((DataError, StoreError), match=r"t\.zarr"):
        list(ds)


def test_device_normalisation_equals_the_loaders(tmp_path, small_store):
    """Workers handing out stored integers, normalised in the training process, give exactly the
    loader's float32 values (and so the same training)."""
    from model.data import BatchNormaliser

    mods = select_pretext("all")
    a = StreamingCorpus(small_store, mods, 32, split=None, seed=3, epochs=1, cloud_mask=True)
    b = StreamingCorpus(small_store, mods, 32, split=None, seed=3, epochs=1, cloud_mask=True, raw=True)
    norm = BatchNormaliser(b)
    n = 0
    for x, y in zip(DataLoader(a, batch_size=8), DataLoader(b, batch_size=8), strict=True):
        assert y["sentinel2"].dtype == torch.uint16 and y["sentinel1"].dtype == torch.float16
        y = norm(y)
        for k in x:
            assert torch.equal(
                torch.nan_to_num(x[k].float(), nan=-9e9), torch.nan_to_num(y[k].float(), nan=-9e9)
            ), k
        n += 1
    assert n >= 5
    ra, rb = str(tmp_path / "a"), str(tmp_path / "b")
    assert _pretrain("--store", small_store, "--out", ra, "--steps", "2", "--normalise", "loader") == 0
    assert _pretrain("--store", small_store, "--out", rb, "--steps", "2", "--normalise", "device") == 0
    wa, wb = load_file(f"{ra}/model.safetensors"), load_file(f"{rb}/model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_hand_statistics_read_the_parcels_scale():
    """bench/ceiling.py's hand-made statistics: a band's mean and std, and gradient / std falling with the
    size of the blocks that make the image (small parcels put the variation at the finest scale)."""
    ceiling = _bench("ceiling")

    def blocks(size: int) -> torch.Tensor:  # a 32 px checkerboard of size x size squares, values 1 and 3
        i = torch.arange(32) // size
        return (1.0 + 2.0 * ((i[:, None] + i[None, :]) % 2)).float()[None, None]

    small, large = ceiling.hand_statistics(blocks(2)), ceiling.hand_statistics(blocks(8))
    assert small.shape == (1, 5)
    assert torch.allclose(small[0, :2], torch.tensor([2.0, 1.0]), atol=0.02)  # mean 2, std 1
    assert small[0, 2] > 2 * large[0, 2] > 0  # gradient / std at 1 px
    flat = ceiling.hand_statistics(torch.full((1, 2, 8, 8), 5.0))
    assert torch.equal(flat[0, 4:], torch.zeros(6))  # no variation at any scale


def _bench(name: str):
    """bench/<name>.py as a module (bench/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{name}_bench", f"bench/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _paper_bench():
    return _bench("paper")


def test_paper_bench_refuses_a_run_of_another_corpus(tmp_path):
    import argparse

    paper = _paper_bench()
    run = tmp_path / "run_all_700"
    run.mkdir()
    saved = {"store": "work/corpus_2048_64_s1.zarr", "model": "atto", "img_size": 56, "blr": 0.01,
             "batch_size": 32, "pretext": "all", "weight_lr": 0.02}  # fmt: skip
    torch.save({"step": torch.tensor(700), "args": json.dumps(saved)}, run / "state.pt")
    args = argparse.Namespace(work=str(tmp_path), steps=700, model="atto", img_size=56, batch_size=32,
                              blr=0.01, device="cpu", workers=0, precision="bf16",
                              norm_pix="joint", weighting="uncertainty")  # fmt: skip
    assert paper.pretrain(args, "work/corpus_2048_64_s1.zarr", "all") == str(run)  # the same: reused
    perband = tmp_path / "run_all_700_perband"  # the ablation's run lives beside it, not in it
    perband.mkdir()
    torch.save({"step": torch.tensor(700), "args": json.dumps(saved)}, perband / "state.pt")  # a joint run
    with pytest.raises(SystemExit, match="norm_pix: joint there, per-band asked"):
        paper.pretrain(argparse.Namespace(**vars(args) | {"norm_pix": "per-band"}), saved["store"], "all")
    balanced = argparse.Namespace(**vars(args) | {"weighting": "balanced"})
    (tmp_path / "run_all_700_balanced").mkdir()  # the balanced all-modality run has a name of its own
    torch.save(
        {"step": torch.tensor(700), "args": json.dumps(saved)}, tmp_path / "run_all_700_balanced" / "state.pt"
    )
    with pytest.raises(SystemExit, match="weighting: uncertainty there, balanced asked"):
        paper.pretrain(balanced, saved["store"], "all")
    s2 = tmp_path / "run_s2_700"  # S2-only has one target: any weighting reuses its run
    s2.mkdir()
    torch.save({"step": torch.tensor(700), "args": json.dumps(saved | {"pretext": "s2"})}, s2 / "state.pt")
    assert paper.pretrain(balanced, saved["store"], "s2") == str(s2)
    with pytest.raises(SystemExit, match="store: work/corpus_2048_64_s1.zarr there, work/corpus_8192"):
        paper.pretrain(args, "work/corpus_8192_64_s1.zarr", "all")
    saved.pop("weight_lr")  # a run from before --weight-lr: its weights followed the encoder's lr
    torch.save({"step": torch.tensor(700), "args": json.dumps(saved)}, run / "state.pt")
    with pytest.raises(SystemExit, match="weight_lr: None there, 0.02 asked"):
        paper.pretrain(args, "work/corpus_2048_64_s1.zarr", "all")


def test_paper_bench_refuses_a_store_of_another_offline_world(tmp_path, tiny_store):
    import argparse
    import shutil

    import zarr

    from mmearth_data.sources.offline import OfflineSource

    paper = _paper_bench()
    n = zarr.open_group(tiny_store, mode="r").attrs["n_tiles"]
    store = tmp_path / f"corpus_{n}_32_s1.zarr"
    shutil.copytree(tiny_store, store)
    args = argparse.Namespace(work=str(tmp_path), tiles=n, tile_size=32, seed=1)
    assert paper.corpus(args) == str(store)  # drawn by this world: reused
    g = zarr.open_group(str(store), mode="r+")
    build = dict(g.attrs["build"])
    build["config"] = {**build["config"], "source_version": "0"}
    g.attrs["build"] = build
    expected = f"offline world version 0, this code draws version {OfflineSource.version}"
    with pytest.raises(SystemExit, match=expected):
        paper.corpus(args)
    assert store.exists()  # refused, not deleted


def test_uncertainty_weights_reach_their_balance_at_their_own_learning_rate():
    # exp(-s) L + s is smallest at s = log L: with its own constant lr each log-variance gets there within
    # a hundred steps, where the encoder's lr (here 1e-3) would have moved it by at most 0.1
    from model.pretrain import build_parser, param_groups, set_lr

    model = MPMAE(select_pretext("image"), "atto", 8, decoder_dim=32)
    groups = param_groups(model, 0.05)
    assert [len(g["params"]) for g in groups][2] == len(model.log_vars) and groups[2]["weight_decay"] == 0
    losses = {name: 4.0 if i % 2 else 0.25 for i, name in enumerate(model.log_vars)}
    for weight_lr, expect in ((build_parser().get_default("weight_lr"), losses), (0.0, None)):
        for s in model.log_vars.values():
            torch.nn.init.zeros_(s)
        opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1.0, betas=(0.9, 0.95))
        for _ in range(100):
            set_lr(opt, 1e-3, weight_lr)
            opt.zero_grad()
            sum(torch.exp(-s) * losses[n] + s for n, s in model.log_vars.items()).backward()
            opt.step()
        w = {n: float(torch.exp(-s.detach())) for n, s in model.log_vars.items()}
        if expect:  # weight = 1 / loss, each weighted loss 1
            assert all(abs(w[n] * losses[n] - 1) < 0.1 for n in w), w
        else:  # on the schedule's lr they barely move
            assert all(abs(np.log(w[n])) < 0.16 for n in w), w


def test_paper_bench_pools_pretraining_seeds_and_names_their_runs(tmp_path):
    import argparse

    paper = _paper_bench()
    a = [{"task": "fields", "fraction": 1.0, "metric": "accuracy", "values": [0.30, 0.32, 0.31]}]
    b = [{"task": "fields", "fraction": 1.0, "metric": "accuracy", "values": [0.26, 0.28, 0.27]}]
    (row,) = paper.pool([a, b])
    vals = [0.30, 0.32, 0.31, 0.26, 0.28, 0.27]
    assert row["seeds"] == 6 and row["runs"] == 2
    assert row["mean"] == pytest.approx(np.mean(vals)) and row["std"] == pytest.approx(np.std(vals))
    # the runs' spread is in the pooled one: wider than either run's own
    assert row["std"] > max(np.std(a[0]["values"]), np.std(b[0]["values"]))
    with pytest.raises(ValueError):  # runs evaluated on different tasks or fractions
        paper.pool([a, a + b])
    with pytest.raises(ValueError, match="different tasks or fractions"):  # same length, other fraction
        paper.pool([a, [b[0] | {"fraction": 0.5}]])

    saved = {"store": "s.zarr", "model": "atto", "img_size": 56, "blr": 0.01, "batch_size": 32,
             "pretext": "s2", "weight_lr": 0.02}  # fmt: skip
    args = argparse.Namespace(work=str(tmp_path), steps=700, model="atto", img_size=56, batch_size=32,
                              blr=0.01, device="cpu", workers=0, precision="bf16",
                              norm_pix="joint", weighting="uncertainty")  # fmt: skip
    for seed, name in ((0, "run_s2_700"), (1, "run_s2_700_seed1")):
        (tmp_path / name).mkdir()
        torch.save({"step": torch.tensor(700), "args": json.dumps(saved | {"seed": seed})},
                   tmp_path / name / "state.pt")  # fmt: skip
        assert paper.pretrain(args, "s.zarr", "s2", seed) == str(tmp_path / name)
    torch.save({"step": torch.tensor(700), "args": json.dumps(saved | {"seed": 0})},
               tmp_path / "run_s2_700_seed1" / "state.pt")  # fmt: skip
    with pytest.raises(SystemExit, match="seed: 0 there, 1 asked"):
        paper.pretrain(args, "s.zarr", "s2", 1)
