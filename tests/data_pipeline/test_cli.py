import subprocess

import pandas as pd
import pytest

from data_pipeline.cli import main


def test_main_synth_then_check_clean(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["synth", "--out", str(out), "--n", "64", "--n-test", "16"]) == 0
    assert main(["check", str(out), "--quiet", "--workers", "1"]) == 0
    assert "no problems found" in capsys.readouterr().out


def test_main_check_bad_data_exits_non_zero_with_report(kaggle_dir, tmp_path, capsys):
    ids = pd.read_csv(kaggle_dir / "train_labels.csv", dtype=str)["id"].iloc[:2].tolist()
    for i in ids:
        (kaggle_dir / "train" / f"{i}.tif").unlink()
    report = tmp_path / "report.csv"
    assert (
        main(["check", str(kaggle_dir), "--quiet", "--workers", "1", "--report", str(report)]) == 1
    )
    out = capsys.readouterr().out
    assert "2 missing_file" in out and ids[0] in out
    assert set(pd.read_csv(report, dtype=str)["id"]) == set(ids)


def test_main_build_stops_then_skip_bad_builds(kaggle_dir, capsys):
    bad = pd.read_csv(kaggle_dir / "train_labels.csv", dtype=str)["id"].iloc[0]
    (kaggle_dir / "train" / f"{bad}.tif").write_bytes(b"not a tiff")
    assert main(["build", str(kaggle_dir), "--quiet", "--workers", "1"]) == 2
    assert bad in capsys.readouterr().err
    assert main(["build", str(kaggle_dir), "--quiet", "--workers", "1", "--skip-bad"]) == 0
    assert "skipped 1 bad rows" in capsys.readouterr().out


def test_main_folds_writes_balanced_grouped_folds(kaggle_dir, capsys):
    assert main(["folds", str(kaggle_dir), "--quiet", "--workers", "1", "--k", "4"]) == 0
    path = capsys.readouterr().out.split("folds: ")[1].split("\n")[0]
    folds = pd.read_csv(path, dtype={"id": str})
    assert sorted(folds.fold.unique()) == [0, 1, 2, 3] and len(folds) == 160


def test_main_unknown_folder_is_clear_error(tmp_path, capsys):
    assert main(["check", str(tmp_path), "--quiet"]) == 2
    assert "Expected either the Kaggle layout" in capsys.readouterr().err


def test_main_without_slide_map_says_the_folds_are_patch_folds(kaggle_dir, capsys):
    # the Kaggle zip has no patch_id_wsi.csv: check, build and folds must say so, and the
    # folds file is named for what it is
    (kaggle_dir / "patch_id_wsi.csv").unlink()
    assert main(["check", str(kaggle_dir), "--quiet", "--workers", "1"]) == 0
    assert "no slide map" in capsys.readouterr().err
    assert main(["build", str(kaggle_dir), "--quiet", "--workers", "1"]) == 0
    assert "no slide map" in capsys.readouterr().err
    assert main(["folds", str(kaggle_dir), "--quiet", "--workers", "1", "--k", "3"]) == 0
    out, err = capsys.readouterr()
    assert "patch-no-slide-map-k3-s0.csv" in out and "leak slides" in err


def test_main_with_slide_map_has_no_warning(kaggle_dir, capsys):
    assert main(["folds", str(kaggle_dir), "--quiet", "--workers", "1", "--k", "3"]) == 0
    out, err = capsys.readouterr()
    assert "/slide-k3-s0.csv" in out and "warning" not in err


def test_main_cache_dir_that_is_a_file_is_named(kaggle_dir, tmp_path, monkeypatch, capsys):
    not_a_folder = tmp_path / "cache-file"
    not_a_folder.write_text("")
    monkeypatch.setenv("PCAM_CACHE_DIR", str(not_a_folder))
    assert main(["build", str(kaggle_dir), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"the cache folder {not_a_folder} is a file" in err and "PCAM_CACHE_DIR" in err


def test_main_read_only_home_names_the_folder_and_what_to_set(
    kaggle_dir, tmp_path, monkeypatch, capsys
):
    # no PCAM_CACHE_DIR and a HOME that cannot be written (a tmpfs mounted read-only: tests
    # run as root, where permission bits do not stop writes)
    home = tmp_path / "home"
    home.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(home)])
    if r.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN)")
    try:
        monkeypatch.delenv("PCAM_CACHE_DIR", raising=False)
        monkeypatch.setenv("HOME", str(home))
        assert main(["build", str(kaggle_dir), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert f"cannot create the cache folder {home / '.cache' / 'pcam-search'}" in err
        assert "PCAM_CACHE_DIR" in err and "Traceback" not in err
    finally:
        subprocess.run(["umount", "-l", str(home)], capture_output=True)


def test_main_build_on_a_full_disk_names_the_folder_and_bytes(kaggle_dir, tmp_path, capsys):
    # a memmap written past the disk's end is SIGBUS: the space is checked first
    small = tmp_path / "small"
    small.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(small)])
    if r.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN)")
    try:
        assert main(["build", str(kaggle_dir), "--cache-dir", str(small), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert f"not enough free disk for the cache in {small}" in err and " MB" in err
        assert [p.name for p in small.iterdir() if p.name.startswith(".building")] == []
    finally:
        subprocess.run(["umount", "-l", str(small)], capture_output=True)


def test_main_folds_default_k_is_the_searchs(kaggle_dir, capsys):
    # pcam-search on this (CPU) machine uses k = 3: pcam-data folds makes the same file
    assert main(["folds", str(kaggle_dir), "--quiet", "--workers", "1"]) == 0
    assert "-k3-s0.csv" in capsys.readouterr().out


def test_main_ctrl_c_is_a_clean_exit_130(kaggle_dir, tmp_path, monkeypatch, capsys):
    import data_pipeline.cli as cli_mod

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_mod, "open_dataset", interrupted)
    assert main(["build", str(kaggle_dir), "--cache-dir", str(tmp_path), "--quiet"]) == 130
    assert "interrupted" in capsys.readouterr().err


def test_main_check_names_a_one_class_dataset(kaggle_dir, capsys):
    labels = kaggle_dir / "train_labels.csv"
    df = pd.read_csv(labels, dtype={"id": str})
    df["label"] = 0
    df.to_csv(labels, index=False)
    assert main(["check", str(kaggle_dir), "--quiet", "--workers", "1"]) == 1
    out = capsys.readouterr().out
    assert "one_class" in out and f"all {len(df)} labelled patches have label 0" in out


def _zip(folder, out, wrap: bool = False):
    import zipfile

    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                name = p.relative_to(folder).as_posix()
                zf.write(p, f"histopathologic-cancer-detection/{name}" if wrap else name)
    return out


@pytest.mark.parametrize("wrap", [False, True])
def test_main_reads_the_kaggle_zip_as_downloaded(kaggle_dir, tmp_path, capsys, wrap):
    z = _zip(kaggle_dir, tmp_path / "histopathologic-cancer-detection.zip", wrap)
    cache = ["--cache-dir", str(tmp_path / "cache"), "--quiet", "--workers", "1"]
    assert main(["check", str(z), *cache]) == 0
    assert main(["build", str(z), *cache]) == 0
    assert "cache:" in capsys.readouterr().out
    # unpacked once: a second build finds the same folder and cache
    unpacked = list((tmp_path / "cache" / "unpacked").iterdir())
    assert main(["build", str(z), *cache]) == 0
    assert list((tmp_path / "cache" / "unpacked").iterdir()) == unpacked


def test_main_names_a_bad_zip_member(kaggle_dir, tmp_path, capsys):
    import zipfile

    z = tmp_path / "evil.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("train_labels.csv", "id,label\n")
        zf.writestr("../outside.txt", "x")
    assert main(["check", str(z), "--cache-dir", str(tmp_path / "cache"), "--quiet"]) == 2
    assert "member '../outside.txt' points outside the archive" in capsys.readouterr().err
    # a member whose bytes do not match its CRC
    good = _zip(kaggle_dir, tmp_path / "k.zip")
    blob = bytearray(good.read_bytes())
    with zipfile.ZipFile(good) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith(".tif"))
    start = info.header_offset + 30 + len(info.filename) + len(info.extra) + 5
    blob[start] ^= 0xFF
    good.write_bytes(bytes(blob))
    assert main(["check", str(good), "--cache-dir", str(tmp_path / "c2"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"member {info.filename!r} is corrupt" in err or "is corrupt" in err
