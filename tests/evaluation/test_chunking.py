"""evaluation.batch_size: a cell's attack in chunks (evaluation.chunks) returns what the unchunked attack returns,
spends the same budget, trains a learned attack's artefacts once, and the memory estimate counts one chunk."""
import re

import pytest
import torch

from harness import TINY_CONFIG, swap, write_config
from leakbench.attacks import InverseNet
from leakbench.attacks.base import Reconstruction, budget
from leakbench.evaluation import Matrix, load_config
from leakbench.evaluation.chunks import chunk_seed, chunk_slices, merge
from leakbench.evaluation.cli import main

#: TINY_CONFIG undefended, without the judge, on 3 images: one rMLE cell (grey start: deterministic)
RMLE_CELL = swap(swap(swap(TINY_CONFIG, "  - {name: gaussian_noise, params: {scale: 0.1}}\n", ""),
                      "{num_images: 2}", "{num_images: 3, classifier: false}"), "iterations: 5", "iterations: 30")


def _cell(tmp_path, text, name):
    config = load_config(write_config(tmp_path, text, name))
    (cell,) = config.cells()
    return Matrix(config, progress=False).compute_cell(cell), cell


def test_a_chunked_rmle_cell_equals_the_unchunked_one_and_spends_the_same(tmp_path):
    whole, plain = _cell(tmp_path, RMLE_CELL, "whole.yaml")
    chunked, cell = _cell(tmp_path, swap(RMLE_CELL, "classifier: false", "classifier: false, batch_size: 2"),
                          "chunked.yaml")
    assert "batch_size" not in plain["evaluation"] and cell["evaluation"]["batch_size"] == 2
    assert whole.status == chunked.status == "done", chunked.fields.get("reason")
    a, b = whole.fields["reconstruction"], chunked.fields["reconstruction"]
    assert a.shape == b.shape and a.shape[0] == 3
    assert ((a - b).abs().flatten(1).amax(1) / a.abs().flatten(1).amax(1)).max() <= 1e-6  # per image, relative
    attack = chunked.fields["diagnostics"]["attack"]
    assert attack["chunked"] == {"batch_size": 2, "sizes": [2, 1]}
    spent, unchunked = attack["budget"], whole.fields["diagnostics"]["attack"]["budget"]
    per_sample = spent["end_to_end_evaluations_per_sample"]
    assert per_sample == unchunked["end_to_end_evaluations_per_sample"] and len(per_sample) == 3
    assert spent["end_to_end_evaluations"] == pytest.approx(sum(per_sample) / 3)
    for key in ("end_to_end_iterations", "end_to_end_evaluations", "blockwise_evaluations"):
        assert spent[key] == pytest.approx(unchunked[key]) and chunked.fields["extra"][f"budget_{key}"] == spent[key]
    assert attack["start"] == ["grey"] * 3  # a per-sample list, concatenated
    for result in (whole, chunked):  # the cell's own peak, and its rise over the start (evaluation.memory)
        assert result.fields["peak_rss_mb"] > 0 and result.fields["extra"]["peak_rss_rise_mb"] >= 0


def _part(n, seconds, evaluations, **diagnostics):
    evals = torch.tensor(evaluations)
    return Reconstruction(torch.full((n, 1, 2, 2), float(n)), {
        "seconds": seconds, "budget": budget(seconds, evals, evals, evals * 10), **diagnostics},
        {"blockwise": torch.zeros(n, 1, 2, 2)}, [torch.zeros(n, 3), torch.ones(n, 5)])


def test_merge_sums_totals_concatenates_samples_and_keeps_what_has_no_merge_per_chunk():
    parts = [_part(2, 1.5, [3, 5], residual=0.1, loss="plain", timed_out=False, from_cache=False,
                   stages=[{"stage": "layer1.0", "lbfgs_iterations": 4, "evaluations": [3, 5]}]),
             _part(1, 0.25, [10], residual=0.3, loss="plain", timed_out=True, from_cache=True,
                   stages=[{"stage": "layer1.0", "lbfgs_iterations": 9, "evaluations": [10]}])]
    merged = merge(parts)
    assert merged.images.shape == (3, 1, 2, 2) and merged.alternatives["blockwise"].shape == (3, 1, 2, 2)
    assert [t.shape for t in merged.intermediates] == [(3, 3), (3, 5)]
    spent = merged.diagnostics["budget"]
    assert spent["seconds"] == 1.75 and merged.diagnostics["seconds"] == 1.75
    assert spent["end_to_end_evaluations_per_sample"] == [3, 5, 10]
    assert spent["end_to_end_evaluations"] == pytest.approx(18 / 3)  # the chunks' totals over the images
    assert spent["blockwise_evaluations"] == pytest.approx(180 / 3)
    assert merged.diagnostics["residual"] == {"per_chunk": [0.1, 0.3]}  # a batch's relative residual: no merge
    assert merged.diagnostics["loss"] == "plain" and merged.diagnostics["timed_out"] is True
    assert merged.diagnostics["from_cache"] is False  # the first chunk trained (or loaded) for the cell
    assert merged.diagnostics["stages"] == [{"stage": "layer1.0", "lbfgs_iterations": 9, "evaluations": [3, 5, 10]}]
    with pytest.raises(ValueError, match="alternatives"):
        merge([parts[0], Reconstruction(torch.zeros(1, 1, 2, 2))])


def test_chunks_and_their_seeds():
    assert chunk_slices(5, 2) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    assert chunk_slices(5, None) == chunk_slices(5, 9) == [slice(0, 5)]
    assert chunk_seed(7, 0) == 7 and chunk_seed(7, 1) == chunk_seed(7, 1) != chunk_seed(7, 2)


def test_a_chunked_inverse_net_cell_trains_its_decoder_once(tmp_path, monkeypatch):
    """The chunks share one context, and the runner's cache key makes attacks.cache keep what the first chunk
    trained (in the default cache when cache_dir is None), so the decoder is trained once, not per chunk."""
    calls = []
    original = InverseNet.train_decoder

    def counted(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)
    monkeypatch.setattr(InverseNet, "train_decoder", counted)
    text = swap(swap(RMLE_CELL, "{name: rmle, params: {iterations: 30}}",
                     "{name: inverse_net, params: {epochs: 1, hidden: 7}}"),
                "classifier: false", "classifier: false, batch_size: 1")
    result, _ = _cell(tmp_path, text, "inverse.yaml")
    assert result.status == "done", result.fields.get("reason")
    attack = result.fields["diagnostics"]["attack"]
    assert attack["chunked"]["sizes"] == [1, 1, 1] and len(calls) == 1
    assert attack["from_cache"] is False and len(attack["train_losses"]) == 1


def _estimate(tmp_path, capsys, evaluation):
    text = swap(swap(TINY_CONFIG, "{num_images: 2}", evaluation), "  - {name: gaussian_noise, params: {scale: 0.1}}\n",
                "")
    assert main(["validate", str(write_config(tmp_path, text, "cost.yaml"))]) == 0
    return float(re.search(r"up to ([0-9.]+) GiB", capsys.readouterr().out).group(1))


def test_the_memory_estimate_counts_one_chunk(tmp_path, capsys):
    whole = _estimate(tmp_path, capsys, "{num_images: 5000, classifier: false}")
    chunked = _estimate(tmp_path, capsys, "{num_images: 5000, classifier: false, batch_size: 50}")
    assert chunked < whole - 1
