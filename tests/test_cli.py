"""Bad input exits 2 with a message naming the problem; nothing already written is touched."""

import hashlib
from pathlib import Path

import pytest

from flows.cli import main
from mmearth_data.build import BuildInputError


def tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        h.update(str(p.relative_to(path)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tiles", "8", "--modalities", "sentinel2,landsat"], "unknown modality 'landsat'"),
        (["--tiles", "8", "--modalities", "dem"], "sentinel2 must be among"),
        (["--tiles", "0"], "number of tiles must be an integer from 1"),
        (["--tiles", "-4"], "number of tiles must be an integer from 1"),
        (["--tiles", "8", "--years", "2012-2014"], "outside what the offline source covers"),
        (["--tiles", "8", "--tile-size", "100"], "multiple of 32"),
        (["--tiles", "8", "--source", "landsat-archive"], "unknown source"),
        (["--tiles", "8", "--compression", "jpeg"], "--compression 'jpeg' is not known"),
    ],
)
def test_bad_build_requests_exit_2(tmp_path, capsys, args, message):
    store = tmp_path / "s.zarr"
    try:
        code = main(["build", "--store", str(store), *args])
    except SystemExit as e:  # argparse's own checks
        code = e.code
    assert code == 2
    assert message in capsys.readouterr().err.replace("\n", " ")
    assert not store.exists()


def test_library_errors_name_parameters_and_the_command_line_names_flags(tmp_path, capsys):
    from mmearth_data.argtypes import cli_terms
    from mmearth_data.build import BuildConfig, check_config

    with pytest.raises(BuildInputError, match=r"^`n_tiles` must be a positive number of tiles, got 0$"):
        check_config(BuildConfig(store=str(tmp_path / "s.zarr"), n_tiles=0))
    cfg = BuildConfig(store=str(tmp_path / "s.zarr"), n_tiles=8, shard_tiles=24, chunk_tiles=16)
    with pytest.raises(BuildInputError) as err:
        check_config(cfg)
    assert "(`shard_tiles`, `chunk_tiles`)" in str(err.value) and "--" not in str(err.value)
    assert cli_terms(err.value).endswith("(--shard-tiles, --chunk-tiles)")
    assert cli_terms("`n_tiles` 8, `dst` x, `key_file` y, `mmearth build --store`") == (
        "--tiles 8, --out x, --ee-key y, `mmearth build --store`"
    )
    argv = [
        "build",
        "--store",
        str(tmp_path / "t.zarr"),
        "--tiles",
        "8",
        "--shard-tiles",
        "24",
        "--chunk-tiles",
        "16",
    ]
    assert main(argv) == 2
    assert "(--shard-tiles, --chunk-tiles)" in capsys.readouterr().err.replace("\n", " ")


def test_bad_years_syntax_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["build", "--store", str(tmp_path / "s.zarr"), "--tiles", "8", "--years", "twenty"])
    assert e.value.code == 2
    assert "use a range like 2017-2020" in capsys.readouterr().err


def test_store_path_holding_something_else_is_left_alone(tmp_path, capsys):
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"\xff\xd8 not a corpus")
    before = tree_digest(foreign)
    assert main(["build", "--store", str(foreign), "--tiles", "8"]) == 2
    assert "not a corpus store" in capsys.readouterr().err
    assert tree_digest(foreign) == before
    afile = tmp_path / "notes.txt"
    afile.write_text("keep me")
    assert main(["build", "--store", str(afile), "--tiles", "8"]) == 2
    assert afile.read_text() == "keep me"


def test_store_built_with_other_options_is_left_alone(small_store, capsys):
    before = tree_digest(Path(small_store))
    assert main(["build", "--store", small_store, "--tiles", "57", "--tile-size", "64"]) == 2
    err = capsys.readouterr().err.replace("\n", " ")
    assert "another configuration" in err and "n_tiles" in err
    assert tree_digest(Path(small_store)) == before


def test_store_from_another_generator_version_is_left_alone(small_store, capsys, monkeypatch):
    from mmearth_data.sources.offline import OfflineSource

    same = ["--tiles", "56", "--tile-size", "64", "--shard-tiles", "16", "--chunk-tiles", "4", "--seed", "7"]
    before = tree_digest(Path(small_store))
    monkeypatch.setattr(OfflineSource, "version", "99")  # tiles would differ from the stored ones
    assert main(["build", "--store", small_store, *same]) == 2
    err = capsys.readouterr().err.replace("\n", " ")
    assert "another configuration" in err and "source_version" in err
    assert tree_digest(Path(small_store)) == before


def test_validate_exit_codes(small_store, tmp_path, capsys):
    assert main(["validate", "--store", small_store]) == 0
    assert "valid" in capsys.readouterr().out
    assert main(["validate", "--store", str(tmp_path / "none.zarr")]) == 1


def test_the_demo_replaces_only_its_own_stale_store(tmp_path, monkeypatch):
    from flows.demo import replace_stale_demo
    from mmearth_data.build import BuildConfig, build_dir, build_in_process
    from mmearth_data.sources.offline import OfflineSource

    cfg = BuildConfig(store=str(tmp_path / "demo.zarr"), n_tiles=8, tile_size=64, shard_tiles=8)
    build_in_process(cfg)
    assert replace_stale_demo(cfg) is False and Path(cfg.store).exists()  # current: resumed as is
    monkeypatch.setattr(OfflineSource, "version", "99")  # a newer generator
    assert replace_stale_demo(cfg) is True
    assert not Path(cfg.store).exists() and not Path(build_dir(cfg.store)).exists()
    photos = tmp_path / "photos.zarr"
    photos.mkdir()
    (photos / "holiday.jpg").write_bytes(b"\xff\xd8")
    other = BuildConfig(store=str(photos), n_tiles=8, tile_size=64, shard_tiles=8)
    with pytest.raises(BuildInputError, match="not a corpus store"):
        replace_stale_demo(other)
    assert (photos / "holiday.jpg").exists()
