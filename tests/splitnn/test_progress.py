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
