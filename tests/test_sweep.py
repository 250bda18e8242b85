"""`splitleak sweep` and `splitleak recommend` on the tiny model: real cloud and device processes per configuration."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest

from splitleak import cli
from splitleak.core import data, link
from splitleak.study import plots, recommend, rows, sweep

SPLITS = ("layer1", "layer3")
DEFENCES = ("quantise:4", "gaussian:2")
LINKS = ("3g", "wifi")
FAST_KNOBS = ("decoder.epochs=2", "decoder.width=32", "rmle.steps=20")


def run_sweep(model_dir, out) -> int:
    splits = [a for s in SPLITS for a in ("--split", s)]
    defences = [a for d in DEFENCES for a in ("--defence", d)]
    links = [a for name in LINKS for a in ("--link", name)]
    knobs = [a for k in FAST_KNOBS for a in ("--knob", k)]
    return cli.main(
        ["sweep", "--model-dir", str(model_dir), *splits, *defences, *links, *knobs]
        + ["--dataset", "cifar10", "--frames", "40", "--attack-frames", "8", "--aux-images", "200", "--out", str(out)]
    )


@pytest.fixture(scope="module")
def swept(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    assert run_sweep(tiny_model_dir, out) == 0
    return out, rows.read_json(out / "sweep.json")


@pytest.mark.slow
def test_one_row_per_configuration_and_link_in_csv_and_json(swept):
    out, table = swept
    with open(out / "sweep.csv") as f:
        from_csv = list(csv.DictReader(f))
    assert len(table) == len(from_csv) == len(SPLITS) * (1 + len(DEFENCES)) * len(LINKS)
    keys = {(r.split, r.defence, r.strength, r.link) for r in table}
    assert len(keys) == len(table)
    lines = (out / "sweep.md").read_text().splitlines()  # for people: a line per configuration, links side by side
    assert len(lines) == 2 + len(SPLITS) * (1 + len(DEFENCES)) and lines[0].endswith("| 3g ms | wifi ms |")
    assert rows.read_csv(out / "sweep.csv") == table  # the same rows, read back from either
    for row in table:
        assert row.frames == 40
        assert 0 <= row.accuracy <= 1
        assert list(row.attacks) == list(sweep.DEFAULT_ATTACKS)
        for scores in row.attacks.values():
            assert 0 <= scores.ssim <= 1 and math.isfinite(scores.psnr)
            assert 0 <= scores.recognisable <= 1 and 0 <= scores.label_leakage <= 1
        assert row.max_ssim == max(row.attacks["decoder"].ssim, row.attacks["rmle"].ssim)
        assert row.total_ms("median") > 0 and row.total_ms("p95") >= row.total_ms("median")


def by(table, **match) -> rows.SweepRow:
    (row,) = [r for r in table if all(getattr(r, k) == v for k, v in match.items())]
    return row


@pytest.mark.slow
def test_the_link_adds_the_link_models_delay_for_the_bytes_measured(swept):
    _, table = swept
    for row in table:
        profile = link.profile(row.link)
        expected = profile.transmit_s(row.bytes_up) * 1e3 + profile.rtt_ms / 2
        assert row.latency_ms["uplink"].median == pytest.approx(expected, rel=0.05, abs=profile.jitter_ms)
    slow, fast = (
        by(table, split="layer1", defence="none", link="3g"),
        by(table, split="layer1", defence="none", link="wifi"),
    )
    assert slow.latency_ms["device"] == fast.latency_ms["device"]  # one run: only the link differs
    assert slow.total_ms() > fast.total_ms() + 50


@pytest.mark.slow
def test_quantising_shrinks_the_bytes_and_keeps_the_accuracy(swept):
    _, table = swept
    plain = by(table, split="layer1", defence="none", link="wifi")
    four_bits = by(table, split="layer1", defence="quantise", link="wifi")
    assert four_bits.bytes_up < plain.bytes_up / 6  # 4 bits for 32, plus scale, zero point and framing
    assert abs(four_bits.accuracy_drop) <= 10  # 40 frames: a few may change


@pytest.mark.slow
def test_undefended_decoder_leaks_more_at_the_first_split_than_the_last(swept):
    _, table = swept
    first = by(table, split="layer1", defence="none", link="wifi")
    last = by(table, split="layer3", defence="none", link="wifi")
    assert first.attacks["decoder"].ssim > last.attacks["decoder"].ssim
    assert first.accuracy_drop == 0


@pytest.mark.slow
def test_plots_are_written_as_png_and_svg(swept):
    out, _ = swept
    for name in ("latency", "leakage", "tradeoff"):
        for suffix in ("png", "svg"):
            assert (out / f"{name}.{suffix}").stat().st_size > 5_000


@pytest.mark.slow
def test_a_warm_rerun_runs_nothing(swept, tiny_model_dir, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a warm re-run started a device")

    monkeypatch.setattr(sweep, "run_device", fail)
    assert run_sweep(tiny_model_dir, tmp_path) == 0
    assert (tmp_path / "sweep.json").read_text() == (swept[0] / "sweep.json").read_text()


@pytest.mark.slow
def test_recommend_picks_the_fastest_configuration_within_the_bounds(swept, capsys):
    out, table = swept
    result = recommend.recommend(table, link_name="3g", max_ssim=0.9, max_drop=100.0)
    eligible = [r for r in table if r.link == "3g" and r.max_ssim <= 0.9]
    assert result.best.total_ms() == min(r.total_ms() for r in eligible)
    assert len(result.verdicts) == len(SPLITS) * (1 + len(DEFENCES)) - 1
    assert (
        cli.main(["recommend", "--sweep", str(out), "--link", "3g", "--max-ssim", "0.9", "--max-accuracy-drop", "100"])
        == 0
    )
    printed = capsys.readouterr().out
    assert "Recommended" in printed and "Why the others lost" in printed

    assert cli.main(["recommend", "--sweep", str(out), "--link", "3g", "--max-ssim", "0"]) == 1
    printed = capsys.readouterr().out
    assert "No configuration meets the bounds" in printed and "recovers SSIM" in printed


@pytest.mark.slow
def test_recommend_says_what_the_sweep_lacks(swept, capsys, tmp_path):
    out, _ = swept
    assert cli.main(["recommend", "--sweep", str(out), "--link", "5g"]) == 2
    assert "no rows for link '5g'" in capsys.readouterr().err
    assert cli.main(["recommend", "--sweep", str(tmp_path)]) == 2
    assert "run `splitleak sweep" in capsys.readouterr().err


def test_bad_sweep_options_get_a_clear_error(shipped_model_dir, capsys):
    assert cli.main(["sweep", "--model-dir", str(shipped_model_dir), "--defence", "gaussian"]) == 2
    assert "gaussian needs strengths" in capsys.readouterr().err
    assert cli.main(["sweep", "--model-dir", str(shipped_model_dir), "--knob", "decoder.nope=1"]) == 2
    assert "decoder has no knob 'nope'" in capsys.readouterr().err
    assert cli.main(["sweep", "--model-dir", str(shipped_model_dir), "--split", "nope"]) == 1
    assert "has no split point 'nope'; it has stem, layer1, layer2, layer3" in capsys.readouterr().err


def test_pareto_front_keeps_only_the_undominated_points():
    points = [(0.9, 90.0), (0.5, 85.0), (0.6, 80.0), (0.2, 60.0), (0.2, 70.0), (0.95, 89.0)]
    assert plots.pareto_front(points) == [4, 1, 0]


@pytest.mark.slow
def test_the_adaptive_decoder_beats_the_plain_one_on_noised_activations(tiny_model_dir):
    from splitleak.attacker import scoring
    from splitleak.attacker.attacks import build
    from splitleak.attacker.attacks.base import query, session
    from splitleak.attacker.replay import auxiliary_images
    from splitleak.core import defences, manifest

    m = manifest.load(tiny_model_dir)
    aux = auxiliary_images("cifar10", m, 400)
    victims = aux[:64]  # scored on images the decoders trained on; only their difference matters here
    knobs = dict(manifest=m, split="layer1", auxiliary=aux[64:], epochs=3, width=32)
    noise = defences.build("gaussian", strength=2.0, split=m.split("layer1"))
    tensors, _ = noise.apply(query(session(m.split("layer1").head), m, victims), np.random.default_rng(7))
    plain = build("decoder", **knobs).invert(tensors["activation"])
    adaptive = build("decoder", **knobs, defence="gaussian", strength=2.0, adapt_epochs=2).invert(tensors["activation"])
    assert scoring.psnr(victims, adaptive).mean() > scoring.psnr(victims, plain).mean() + 0.5


@pytest.mark.slow
def test_rmle_that_knows_the_dropout_beats_rmle_that_does_not(tiny_model_dir):
    from splitleak.attacker import scoring
    from splitleak.attacker.attacks import build
    from splitleak.attacker.attacks.base import query, session
    from splitleak.attacker.replay import auxiliary_images
    from splitleak.core import defences, manifest

    m = manifest.load(tiny_model_dir)
    victims = auxiliary_images("cifar10", m, 8, seed=3)
    dropout = defences.build("dropout", strength=0.5, split=m.split("stem"))
    tensors, _ = dropout.apply(query(session(m.split("stem").head), m, victims), np.random.default_rng(1))
    plain = build("rmle", manifest=m, split="stem", steps=60).invert(tensors["activation"])
    aware = build("rmle", manifest=m, split="stem", steps=60, defence="dropout", strength=0.5)
    assert scoring.psnr(victims, aware.invert(tensors["activation"])).mean() > scoring.psnr(victims, plain).mean() + 3


@pytest.mark.slow
def test_a_sweep_over_mutual_tls_measures_the_same_frames_with_the_wire_encrypted(shipped_model_dir, tmp_path):
    def one(*extra: str) -> rows.SweepRow:
        out = tmp_path / ("tls" if extra else "plain")
        options = ["--split", "layer3", "--defence", "none", "--attack", "rmle", "--knob", "rmle.steps=5"]
        options += ["--dataset", "cifar10", "--frames", "20", "--attack-frames", "4", "--no-plots", "--out", str(out)]
        assert cli.main(["sweep", "--model-dir", str(shipped_model_dir), *options, "--link", "loopback", *extra]) == 0
        (row,) = rows.read_json(out / "sweep.json")
        return row

    plain, over_tls = one(), one("--tls")
    assert (over_tls.accuracy, over_tls.bytes_up) == (plain.accuracy, plain.bytes_up)
    assert over_tls.attacks["rmle"] == plain.attacks["rmle"]  # the cloud decrypts: the attacker there loses nothing
    assert (data.cache_dir() / "tls" / "ca.pem").exists()
