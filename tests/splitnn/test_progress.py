"""splitnn.progress: bars are off unless the caller switched them on, and the switch is scoped."""
import io
import threading

from leakbench.splitnn.progress import attack_progress, progress_bar, progress_enabled


def test_bars_are_off_by_default_and_scoped():
    assert not progress_enabled()
    assert progress_bar(3, "x").disable
    with attack_progress(True):
        assert progress_enabled()
        with attack_progress(False):
            assert progress_bar(3, "x").disable
        bar = progress_bar(3, "x")
        assert not bar.disable and not bar.leave
        bar.close()
    assert not progress_enabled()


def test_the_switch_does_not_leak_into_other_threads():
    seen = []
    with attack_progress(True):
        thread = threading.Thread(target=lambda: seen.append(progress_enabled()))
        thread.start()
        thread.join()
    assert seen == [False]


def test_a_shown_bar_writes_and_a_hidden_one_does_not(monkeypatch):
    import tqdm.auto
    out = io.StringIO()
    real = tqdm.auto.tqdm
    monkeypatch.setattr("leakbench.splitnn.progress.tqdm", lambda *a, **k: real(*a, file=out, **k))
    with progress_bar(2, "hidden") as bar:
        bar.update()
    assert out.getvalue() == ""
    with attack_progress(True), progress_bar(2, "shown") as bar:
        bar.update()
    assert "shown" in out.getvalue()


def test_the_lbfgs_bar_only_displays(monkeypatch):
    """attacks.box_lbfgs counts iterations on a bar: the iterates are bit-identical with it shown or hidden,
    and it ticks once per iteration."""
    import torch

    from leakbench.attacks.box_lbfgs import minimize_box
    from leakbench.splitnn import progress

    ticks = []
    real = progress.tqdm

    def counting(*args, **kwargs):
        bar = real(*args, file=io.StringIO(), **kwargs)
        update = bar.update
        bar.update = lambda n=1: (ticks.append(n), update(n))[1]
        return bar
    monkeypatch.setattr(progress, "tqdm", counting)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 6, 6, generator=g, dtype=torch.float64), torch.randn(3, 6, generator=g, dtype=torch.float64)

    def loss(x):
        return 0.5 * (torch.einsum("bij,bj->bi", a, x) - b).pow(2).sum(1)
    hidden = minimize_box(loss, torch.zeros(3, 6, dtype=torch.float64), lower=-0.5, upper=0.5, max_iter=40)
    ticks.clear()
    with attack_progress(True):
        shown = minimize_box(loss, torch.zeros(3, 6, dtype=torch.float64), lower=-0.5, upper=0.5, max_iter=40)
    assert torch.equal(hidden.x, shown.x) and torch.equal(hidden.evaluations, shown.evaluations)
    assert 0 < len(ticks) <= 40 and len(ticks) >= int(shown.iterations.max())
