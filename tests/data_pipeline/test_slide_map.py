import pandas as pd

from data_pipeline.cli import main
from data_pipeline.slide_map import match_slides
from data_pipeline.synth import SynthConfig, write


def test_match_slides_by_pixel_hash_leaves_out_unknown_and_ambiguous():
    kaggle = pd.DataFrame({"id": ["a", "b", "c", "d"], "hash": ["h1", "h2", "h3", "h4"]})
    pcam = pd.DataFrame(
        {
            "hash": ["h1", "h2", "h2", "h3", "h9"],
            "slide": ["s1", "s2", "s3", "", "s9"],  # h2 on two slides; h3 without a slide
        }
    )
    got, ambiguous = match_slides(kaggle, pcam)
    assert got.to_dict("list") == {"id": ["a"], "wsi": ["s1"]} and ambiguous == 1


def test_slide_map_rebuilds_the_kaggle_map_from_pcam(tmp_path, capsys):
    cfg = SynthConfig(n=64, n_test=16)
    kaggle, pcam = write(tmp_path / "k", cfg, "kaggle"), write(tmp_path / "p", cfg, "pcam")
    truth = pd.read_csv(kaggle / "patch_id_wsi.csv", dtype=str)  # 85% of ids, true slides
    (kaggle / "patch_id_wsi.csv").unlink()
    args = ["slide-map", str(kaggle), str(pcam), "--quiet", "--workers", "1"]
    assert main(args) == 0
    assert "64 of 64 train ids (100.0%)" in capsys.readouterr().out
    rebuilt = pd.read_csv(kaggle / "patch_id_wsi.csv", dtype=str).set_index("id")["wsi"]
    assert (rebuilt.loc[truth["id"]].to_numpy() == truth["wsi"].to_numpy()).all()
    # an existing map is never replaced silently; the folders' order is checked
    assert main(args) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    swapped = ["slide-map", str(pcam), str(kaggle), "--quiet", "--force"]
    assert main(swapped) == 2
    assert "not a kaggle folder" in capsys.readouterr().err
