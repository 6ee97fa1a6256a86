"""Malformed configs, table-driven in the manner of SQLite's own error tests: every one stops before any work
with exit 2, a message under 1,000 characters naming the key (or the file and line), and no traceback."""
import pytest

from harness import TINY_CONFIG, swap
from leakbench.evaluation.cli import main

#: The valid config every case edits: the tiny config the CLI tests run.
GOOD = TINY_CONFIG
#: The dataset entry of GOOD, which several cases replace whole.
DATASET = "dataset: {name: digits, params: {size: 16}}"


def _swap(old: str, new: str) -> str:
    return swap(GOOD, old, new)


def _defense(entry: str) -> str:
    return _swap("{name: gaussian_noise, params: {scale: 0.1}}", entry)


def _attack(entry: str) -> str:
    return _swap("{name: rmle, params: {iterations: 5}}", entry)


_BOMB = "".join(f"{chr(97 + i)}: &{chr(97 + i)} [{', '.join([f'*{chr(96 + i)}'] * 9) if i else 'lol'}]\n"
                for i in range(9))

# (case, config text or bytes, what the message must name)
CASES = [
    # -- the classes the issue found accepted silently ---------------------------------------------------------
    ("duplicate top-level key", GOOD + "seed: 1\n", "twice"),
    ("duplicate param key", _defense("{name: gaussian_noise, params: {scale: 0.1, scale: 0.2}}"), "twice"),
    ("seed inside a defense's params", _defense("{name: gaussian_noise, params: {scale: 0.1, seed: 3}}"),
     "defenses[1].params.seed"),
    ("train: false", _swap("train: {epochs: 1, batch_size: 128}", "train: false"), "train"),
    ("params: []", _defense("{name: gaussian_noise, params: []}"), "defenses[1].params"),
    ("params: a number", _defense("{name: gaussian_noise, params: 5}"), "defenses[1].params"),
    ("params: a string", _defense("{name: gaussian_noise, params: scale}"), "defenses[1].params"),
    ("inf lr", _swap("epochs: 1,", "epochs: 1, lr: .inf,"), "train.lr"),
    ("nan lr", _swap("epochs: 1,", "epochs: 1, lr: .nan,"), "train.lr"),
    ("inf nopeek alpha", _defense("{name: nopeek, params: {alpha: .inf}}"), "defenses[1].params.alpha"),
    ("inf rmle tv_weight", _attack("{name: rmle, params: {tv_weight: .inf}}"), "attacks[0].params.tv_weight"),
    ("inf peel prior_weight", _attack("{name: peel, params: {prior_weight: .inf}}"),
     "attacks[0].params.prior_weight"),
    ("inf quantization low", _defense("{name: quantization, params: {range: fixed, low: -.inf}}"),
     "defenses[1].params.low"),
    ("inf quantization high", _defense("{name: quantization, params: {range: fixed, high: .inf}}"),
     "defenses[1].params.high"),
    ("dp_sgd epsilon 1e-12", _defense("{name: dp_sgd, params: {epsilon: 1.0e-12}}"), "defenses[1].params.epsilon"),
    ("a huge list of seeds", _swap("seed: 0", "seed: [" + ", ".join(["0"] * 5000) + "]"), "seed"),
    ("a file over 1 MB", GOOD + "#" * 1_100_000 + "\n", "config.yaml"),
    # -- the classes that gave tracebacks ----------------------------------------------------------------------
    ("non-UTF-8 bytes", GOOD.encode() + b"name2: \xff\xfe\n", "UTF-8"),
    ("Latin-1 text", _swap("tiny", "t\xefny").encode("latin-1"), "UTF-8"),
    ("mixed-type top-level keys", GOOD + "1: one\n", "1"),
    ("a list where a name belongs", _swap("  - none", "  - [none]"), "defenses[0]"),
    ("a list as the dataset name", _swap(DATASET, "dataset: {name: [digits]}"), "dataset.name"),
    ("a non-string parameter key", _defense("{name: gaussian_noise, params: {1: 0.1}}"), "defenses[1].params"),
    ("a list as a parameter key", _defense("{name: gaussian_noise, params: {? [a, b] : 0.1}}"), "config.yaml"),
    ("a missing lpips_weights file", _swap("{num_images: 2}", "{num_images: 2, lpips_weights: /no/such.pt}"),
     "evaluation.lpips_weights"),
    ("an lpips_weights file that is not a state dict", None, "evaluation.lpips_weights"),  # written in the test
    ("deep nesting", GOOD + "deep: " + "[" * 200 + "]" * 200 + "\n", "nesting"),
    ("an alias bomb", _BOMB + GOOD, "alias"),
    ("an alias", _swap("seed: 0", "seed: &s 0") + "other: *s\n", "alias"),
    ("a merge key", GOOD + "base: &b {x: 1}\nmore: {<<: *b}\n", "config.yaml"),
    ("a python tag", GOOD + "x: !!python/object/apply:os.system [ls]\n", "config.yaml"),
    # -- accepted at validation, fatal at run time -------------------------------------------------------------
    ("seed 2^63", _swap("seed: 0", "seed: 9223372036854775808"), "seed"),
    ("seed 2^64 in a list", _swap("seed: 0", "seed: [0, 18446744073709551616]"), "seed[1]"),
    # -- output outside results/ -------------------------------------------------------------------------------
    ("name escapes the folder", _swap("name: tiny", "name: ../.."), "name"),
    ("absolute name", _swap("name: tiny", "name: /tmp/elsewhere"), "name"),
    ("name with a slash", _swap("name: tiny", "name: a/b"), "name"),
    ("hidden name", _swap("name: tiny", "name: .hidden"), "name"),
    ("empty name", _swap("name: tiny", "name: ''"), "name"),
    ("name not a string", _swap("name: tiny", "name: 5"), "name"),
    # -- structure ---------------------------------------------------------------------------------------------
    ("a list at the top", "- name: tiny\n", "top level"),
    ("a scalar at the top", "just text\n", "top level"),
    ("an empty file", "", "top level"),
    ("a comment only", "# nothing\n", "top level"),
    ("unparseable YAML", GOOD + "attacks: [rmle\n", "config.yaml"),
    ("a tab indent", _swap("  - none", "\t- none"), "config.yaml"),
    ("unknown top-level key", _swap("seed: 0", "sead: 0"), "sead"),
    ("missing dataset", _swap(DATASET + "\n", ""), "dataset"),
    ("missing model", _swap("model: resnet20\n", ""), "model"),
    ("missing cut", _swap("cut: layer1\n", ""), "cut"),
    ("missing attacks", GOOD[:GOOD.index("attacks:")] + "evaluation: {num_images: 2}\n", "attacks"),
    ("empty defenses list", _swap("defenses:\n  - none\n  - {name: gaussian_noise, params: {scale: 0.1}}",
                                  "defenses: []"), "defenses"),
    ("empty cut list", _swap("cut: layer1", "cut: []"), "cut"),
    ("unknown entry key", _defense("{name: gaussian_noise, parms: {scale: 0.1}}"), "defenses[1].parms"),
    ("entry without a name", _defense("{params: {scale: 0.1}}"), "defenses[1].name"),
    ("entry name null", _defense("{name: null}"), "defenses[1].name"),
    ("entry name a number", _defense("{name: 3}"), "defenses[1].name"),
    ("defense given as a number", _defense("7"), "defenses[1]"),
    # -- names -------------------------------------------------------------------------------------------------
    ("unknown defense", _defense("gausian_noise"), "defenses[1].name"),
    ("unknown attack", _attack("nope"), "attacks[0].name"),
    ("unknown model", _swap("model: resnet20", "model: resnet21"), "model.name"),
    ("unknown dataset", _swap(DATASET, "dataset: cifar11"), "dataset.name"),
    ("cut not in the model", _swap("cut: layer1", "cut: layer7"), "cut"),
    ("cut in a list not in the model", _swap("cut: layer1", "cut: [layer1, fc2]"), "cut[1]"),
    ("cut a number", _swap("cut: layer1", "cut: 1"), "cut"),
    # -- seeds -------------------------------------------------------------------------------------------------
    ("negative seed", _swap("seed: 0", "seed: -1"), "seed"),
    ("float seed", _swap("seed: 0", "seed: 1.5"), "seed"),
    ("bool seed", _swap("seed: 0", "seed: true"), "seed"),
    ("string seed", _swap("seed: 0", "seed: zero"), "seed"),
    ("empty seed list", _swap("seed: 0", "seed: []"), "seed"),
    # -- train -------------------------------------------------------------------------------------------------
    ("negative epochs", _swap("epochs: 1", "epochs: -1"), "train.epochs"),
    ("float epochs", _swap("epochs: 1", "epochs: 1.5"), "train.epochs"),
    ("zero lr", _swap("epochs: 1,", "epochs: 1, lr: 0,"), "train.lr"),
    ("string lr", _swap("epochs: 1,", "epochs: 1, lr: fast,"), "train.lr"),
    ("zero batch size", _swap("batch_size: 128", "batch_size: 0"), "train.batch_size"),
    ("weight decay 2", _swap("epochs: 1,", "epochs: 1, weight_decay: 2,"), "train.weight_decay"),
    ("unknown train key", _swap("epochs: 1,", "epochs: 1, momentum: 0.9,"), "train.momentum"),
    ("model train override bad", _swap("model: resnet20", "model: {name: resnet20, train: {epochs: -2}}"),
     "model.train.epochs"),
    ("model list train override bad",
     _swap("model: resnet20", "model: [resnet20, {name: resnet20, train: {batch_size: 0}}]"),
     "model[1].train.batch_size"),
    # -- dataset and model parameters ----------------------------------------------------------------------------
    ("dataset size too small", _swap(DATASET, "dataset: {name: digits, params: {size: 4}}"),
     "dataset.params.size"),
    ("dataset size a string", _swap(DATASET, "dataset: {name: digits, params: {size: big}}"),
     "dataset.params.size"),
    ("dataset channels 5", _swap(DATASET, "dataset: {name: digits, params: {channels: 5}}"),
     "dataset.params.channels"),
    ("dataset test_fraction 1", _swap(DATASET, "dataset: {name: digits, params: {test_fraction: 1}}"),
     "dataset.params.test_fraction"),
    ("dataset unknown param", _swap(DATASET, "dataset: {name: digits, params: {colour: true}}"),
     "dataset.params.colour"),
    ("second dataset bad", _swap(DATASET, "dataset: [digits, {name: portraits, params: {size: 2}}]"),
     "dataset[1].params.size"),
    ("model norm unknown", _swap("model: resnet20", "model: {name: resnet20, params: {norm: layer}}"),
     "model.params.norm"),
    ("model post_relu a string", _swap("model: resnet20", "model: {name: resnet20, params: {post_relu: 'no'}}"),
     "model.params.post_relu"),
    ("model unknown param", _swap("model: resnet20", "model: {name: resnet20, params: {depth: 3}}"),
     "model.params.depth"),
    # -- defense parameters ------------------------------------------------------------------------------------
    ("negative noise scale", _defense("{name: gaussian_noise, params: {scale: -0.1}}"), "defenses[1].params.scale"),
    ("noise relative a string", _defense("{name: gaussian_noise, params: {relative: 'yes'}}"),
     "defenses[1].params.relative"),
    ("laplace scale a list", _defense("{name: laplace_noise, params: {scale: [0.1]}}"), "defenses[1].params.scale"),
    ("feature_dp epsilon 0", _defense("{name: feature_dp, params: {epsilon: 0}}"), "defenses[1].params.epsilon"),
    ("feature_dp mechanism", _defense("{name: feature_dp, params: {mechanism: cauchy}}"),
     "defenses[1].params.mechanism"),
    ("dp_sgd delta 2", _defense("{name: dp_sgd, params: {delta: 2}}"), "defenses[1].params.delta"),
    ("dp_sgd accountant", _defense("{name: dp_sgd, params: {accountant: moments}}"), "defenses[1].params.accountant"),
    ("nopeek negative alpha", _defense("{name: nopeek, params: {alpha: -1}}"), "defenses[1].params.alpha"),
    ("pruning ratio 1", _defense("{name: pruning, params: {ratio: 1}}"), "defenses[1].params.ratio"),
    ("pruning score", _defense("{name: pruning, params: {score: shapley}}"), "defenses[1].params.score"),
    ("quantization bits 0", _defense("{name: quantization, params: {bits: 0}}"), "defenses[1].params.bits"),
    ("topk keep 0", _defense("{name: topk, params: {keep: 0}}"), "defenses[1].params.keep"),
    ("dropout p 1", _defense("{name: dropout, params: {p: 1}}"), "defenses[1].params.p"),
    ("defense unknown param", _defense("{name: gaussian_noise, params: {scael: 0.1}}"), "defenses[1].params.scael"),
    # -- attack parameters -------------------------------------------------------------------------------------
    ("rmle iterations 0", _attack("{name: rmle, params: {iterations: 0}}"), "attacks[0].params.iterations"),
    ("rmle iterations a float", _attack("{name: rmle, params: {iterations: 5.5}}"), "attacks[0].params.iterations"),
    ("rmle loss", _attack("{name: rmle, params: {loss: l1}}"), "attacks[0].params.loss"),
    ("rmle max_seconds inf", _attack("{name: rmle, params: {max_seconds: .inf}}"), "attacks[0].params.max_seconds"),
    ("peel solver", _attack("{name: peel, params: {solver: adam}}"), "attacks[0].params.solver"),
    ("peel refine a string", _attack("{name: peel, params: {refine: 'yes'}}"), "attacks[0].params.refine"),
    ("peel dtype", _attack("{name: peel, params: {dtype: float16}}"), "attacks[0].params.dtype"),
    ("inverse_net hidden 0", _attack("{name: inverse_net, params: {hidden: 0}}"), "attacks[0].params.hidden"),
    ("shadow inverter", _attack("{name: shadow, params: {inverter: gan}}"), "attacks[0].params.inverter"),
    ("attack unknown param", _attack("{name: rmle, params: {iterationz: 5}}"), "attacks[0].params.iterationz"),
    # -- zip ---------------------------------------------------------------------------------------------------
    ("zip lists of unequal length", _defense("{name: gaussian_noise, zip: {scale: [0.1, 0.2], relative: [true]}}"),
     "defenses[1].zip.relative"),
    ("zip value bad", _defense("{name: gaussian_noise, zip: {scale: [0.1, -1.0]}}"), "defenses[1].zip.scale[1]"),
    ("zip not a list", _defense("{name: gaussian_noise, zip: {scale: 0.5}}"), "defenses[1].zip.scale"),
    ("zip unknown param", _defense("{name: gaussian_noise, zip: {scael: [0.5]}}"), "defenses[1].zip.scael[0]"),
    ("zip and params both", _defense("{name: gaussian_noise, params: {scale: 1.0}, zip: {scale: [0.5]}}"),
     "defenses[1].zip.scale"),
    ("zip empty", _defense("{name: gaussian_noise, zip: {}}"), "defenses[1].zip"),
    ("zip a list", _defense("{name: gaussian_noise, zip: []}"), "defenses[1].zip"),
    # -- evaluation --------------------------------------------------------------------------------------------
    ("num_images 0", _swap("{num_images: 2}", "{num_images: 0}"), "evaluation.num_images"),
    ("num_images a float", _swap("{num_images: 2}", "{num_images: 2.5}"), "evaluation.num_images"),
    ("num_images huge", _swap("{num_images: 2}", "{num_images: 100000000}"), "evaluation.num_images"),
    ("classifier a string", _swap("{num_images: 2}", "{num_images: 2, classifier: 'yes'}"), "evaluation.classifier"),
    ("lpips_net unknown", _swap("{num_images: 2}", "{num_images: 2, lpips_net: resnet}"), "evaluation.lpips_net"),
    ("unknown evaluation key", _swap("{num_images: 2}", "{num_images: 2, metric: psnr}"), "evaluation.metric"),
    ("evaluation a list", _swap("{num_images: 2}", "[2]"), "evaluation"),
    # -- cost --------------------------------------------------------------------------------------------------
    ("a cell over the memory bound", _swap(DATASET, "dataset: {name: digits, params: {size: 512}}")
     .replace("{num_images: 2}", "{num_images: 10000}"), "GiB"),
]


@pytest.mark.parametrize("case, text, named", CASES, ids=[c[0] for c in CASES])
def test_a_malformed_config_exits_2_with_a_short_message_naming_the_key(tmp_path, capsys, case, text, named):
    path = tmp_path / "config.yaml"
    if text is None:  # a weights file that torch cannot read
        (tmp_path / "weights.pt").write_bytes(b"not a state dict")
        text = _swap("{num_images: 2}", f"{{num_images: 2, lpips_weights: {tmp_path / 'weights.pt'}}}")
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert 0 < len(err) < 1000, err
    assert named in err, err


def test_the_table_covers_at_least_80_configs_and_the_good_one_passes(tmp_path, capsys):
    assert len(CASES) >= 80
    path = tmp_path / "config.yaml"
    path.write_text(GOOD)
    assert main(["validate", str(path)]) == 0


def test_every_problem_is_reported_at_once_each_with_its_path(tmp_path, capsys):
    text = (_swap("seed: 0", "seed: -1").replace("epochs: 1", "epochs: -1")
            .replace("{name: gaussian_noise, params: {scale: 0.1}}", "{name: gaussian_noise, params: {scale: -1}}")
            .replace("{num_images: 2}", "{num_images: 0}"))
    path = tmp_path / "config.yaml"
    path.write_text(text)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    for key in ("seed", "train.epochs", "evaluation.num_images"):
        assert key in err
    # the defense's own range check runs once the structure is valid, so it is reported on the next try
    path.write_text(_defense("{name: gaussian_noise, params: {scale: -1}}").replace("epochs: 1", "epochs: -1"))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "defenses[1].params.scale" in err and "train.epochs" in err


def test_a_run_refused_by_the_schema_writes_nothing(tmp_path, capsys):
    path = tmp_path / "config.yaml"
    path.write_text(_swap("seed: 0", "seed: 9223372036854775808"))
    out = tmp_path / "out"
    assert main(["run", str(path), "--out", str(out), "--quiet"]) == 2
    assert not out.exists()


def test_repeated_seeds_and_entries_collapse_into_one_cell_each_with_a_note(tmp_path, capsys):
    path = tmp_path / "config.yaml"
    path.write_text(_swap("seed: 0", "seed: [0, 0, 1]").replace("  - none\n", "  - none\n  - {name: none}\n"))
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert "4 cells in tiny" in out  # 2 seeds x 2 defenses x 1 attack
    assert "seed: 1 repeated values dropped" in out and "defenses[1]: the same defense" in out


def test_validate_prints_the_cost_and_force_accepts_an_oversized_grid(tmp_path, capsys):
    path = tmp_path / "config.yaml"
    path.write_text(_swap(DATASET, "dataset: {name: digits, params: {size: 512}}")
                    .replace("{num_images: 2}", "{num_images: 10000}"))
    assert main(["validate", str(path), "--force"]) == 0
    out = capsys.readouterr().out
    assert "estimated peak memory per cell" in out and "config is valid" in out


def test_a_run_over_the_memory_bound_is_refused_before_any_work(tmp_path, capsys):
    path = tmp_path / "config.yaml"
    path.write_text(_swap(DATASET, "dataset: {name: digits, params: {size: 512}}")
                    .replace("{num_images: 2}", "{num_images: 10000}"))
    out = tmp_path / "out"
    assert main(["run", str(path), "--out", str(out), "--quiet"]) == 2
    assert "--force" in capsys.readouterr().err and not out.exists()
