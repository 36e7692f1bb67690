import optuna
import pytest

from search.training.engine import TrainParams
from search.tuning.space import STUDIES_DIR, SpaceError, load_space, suggest


def _write(tmp_path, text):
    p = tmp_path / "space.toml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("name", sorted(p.stem for p in STUDIES_DIR.glob("*.toml")))
def test_load_space_shipped_files_sample_valid_params(name):
    space = load_space(name)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        # every sample must build TrainParams: the space and the engine agree on names/values
        TrainParams.from_dict(suggest(study.ask(), space))


def test_suggest_unfreeze_only_for_resnet_with_weights():
    space = load_space("default")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    seen_with, seen_without = [], []
    for _ in range(40):
        with_w = suggest(study.ask(), space, pretrained=True)
        without = suggest(study.ask(), space, pretrained=False)
        seen_with.append(with_w)
        seen_without.append(without)
    # without weights a frozen random stage is meaningless: never asked
    assert all("unfreeze" not in p for p in seen_without)
    # with weights: asked exactly for ResNets
    assert all(("unfreeze" in p) == p["arch"].startswith("resnet") for p in seen_with)
    # width is a simple_cnn knob only
    assert all(("width" in p) == (p["arch"] == "simple_cnn") for p in seen_with)


def test_load_space_unknown_param_names_it(tmp_path):
    p = _write(tmp_path, '[params.learning_rate]\ntype = "float"\nlow = 0.1\nhigh = 1.0\n')
    with pytest.raises(SpaceError, match=r"space.toml.*'learning_rate'"):
        load_space(p)


def test_load_space_invalid_choice_names_value(tmp_path):
    p = _write(tmp_path, '[params.crop]\ntype = "categorical"\nchoices = [32, 50]\n')
    with pytest.raises(SpaceError, match=r"\[params.crop\] value 50"):
        load_space(p)


def test_load_space_unknown_arch_suggests_close_name(tmp_path):
    p = _write(tmp_path, '[fixed]\narch = "resnet5O"\n')
    with pytest.raises(SpaceError, match="did you mean.*resnet50"):
        load_space(p)


def test_load_space_log_range_needs_positive_low(tmp_path):
    p = _write(tmp_path, '[params.lr]\ntype = "float"\nlow = 0\nhigh = 1e-2\nlog = true\n')
    with pytest.raises(SpaceError, match="log scale needs low > 0"):
        load_space(p)


def test_load_space_missing_file_lists_known(tmp_path):
    with pytest.raises(SpaceError, match=r"not found.*'cpu'"):
        load_space("nope")


def test_load_space_start_tables_must_use_searched_params_and_values(tmp_path):
    base = '[params.lr]\ntype = "float"\nlow = 1e-4\nhigh = 1e-2\n'
    ok = tmp_path / "ok.toml"
    ok.write_text(base + "[[start]]\nlr = 3e-3\n")
    assert load_space(ok).start == [{"lr": 3e-3}]
    for bad, match in (("width = 16", "not searched"), ("lr = 1.0", "outside")):
        f = tmp_path / "bad.toml"
        f.write_text(base + f"[[start]]\n{bad}\n")
        with pytest.raises(SpaceError, match=match):
            load_space(f)


def test_cpu_space_starts_from_a_valid_recipe():
    space = load_space("cpu")
    assert space.start and all(set(t) <= set(space.params) for t in space.start)


@pytest.mark.parametrize(
    "text, says",
    [
        (
            '[params.width]\ntype = "int"\nlow = 8\nhigh = 24\nstep = 0',
            "[params.width]: step must be",
        ),
        (
            '[params.lr]\ntype = "float"\nlow = 1e-4\nhigh = 1e-2\nlog = true\nstep = 1e-4',
            "step and log",
        ),
        ('[fixed]\nbatch_size = "64"', "[fixed]: batch_size must be of type int, got '64'"),
        ("[fixed]\nwidth = 0", "[fixed]: width and depth must be >= 1"),
        ("[fixed]\ncrop = 32\ndepth = 7", "[fixed]: depth 7 is too deep for crop 32"),
        ("[fixed]\nrestore_best = 1", "restore_best must be of type bool, got 1"),
    ],
)
def test_load_space_bad_values_name_the_file_and_key(tmp_path, text, says):
    path = tmp_path / "space.toml"
    path.write_text(text + "\n")
    with pytest.raises(SpaceError) as e:
        load_space(path)
    assert str(e.value).startswith(str(path)) and says in str(e.value)
