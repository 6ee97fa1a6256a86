"""The CLI on the tiny config (harness.TINY_CONFIG): a bad config exits 2 naming the key before any work."""
import pytest

from harness import TINY_CONFIG, swap, write_config
from leakbench.evaluation.cli import main


@pytest.mark.parametrize("old, new, key", [
    ("name: gaussian_noise", "name: gausian_noise", "defenses[1].name"),
    ("scale: 0.1", "scale: -0.1", "defenses[1].params.scale"),
    ("name: rmle", "name: nope", "attacks[0].name"),
    ("iterations: 5", "iterationz: 5", "attacks[0].params.iterationz"),
    ("cut: layer1", "cut: layer7", "cut"),
    ("epochs: 1", "epochs: -1", "train.epochs"),
    ("seed: 0", "sead: 0", "sead"),
])
def test_bad_config_exits_2_naming_the_key_before_any_work(tmp_path, capsys, old, new, key):
    config = write_config(tmp_path, swap(TINY_CONFIG, old, new))
    out = tmp_path / "out"
    assert main(["run", str(config), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert key in err and err.count("\n") == 1  # one clear message
    assert not out.exists()  # nothing written


def test_missing_config_file_exits_2(tmp_path, capsys):
    assert main(["run", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err


def test_validate_lists_the_cells(tiny_config, capsys):
    assert main(["validate", str(tiny_config)]) == 0
    out = capsys.readouterr().out
    assert "2 cells" in out and "gaussian_noise" in out


def test_a_reader_that_closes_stdout_is_not_reported_as_a_config_error(tiny_config, capsys, monkeypatch):
    """`leakbench validate x.yaml | head -1`: the closed pipe ends the command quietly with 141 (as SIGPIPE)."""
    class Closed:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr("sys.stdout", Closed())
    assert main(["validate", str(tiny_config)]) == 141
    assert "cannot read" not in capsys.readouterr().err
