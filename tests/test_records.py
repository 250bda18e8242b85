"""The typed records that cross module boundaries load what was written before them, and write it back unchanged:
the device's frame records (`--json`, `--records`) and the sweep's rows (sweep.json, sweep.csv, the shipped docs)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from splitleak import cli
from splitleak.core import metrics
from splitleak.core.records import ANSWER, NETWORK_CLOUD, STAGES, FrameRecord
from splitleak.study import rows, sweep

DOCS = Path(__file__).resolve().parents[1] / "docs" / "sweep"

SENT = dict(
    frame=7,
    label=3,
    split="layer1",
    link="wifi",
    defence="gaussian",
    strength=0.5,
    start_ns=1_700_000_000_000_000_000,
    preprocess_ms=0.1,
    head_ms=0.4,
    defence_ms=0.05,
    encode_ms=0.02,
    bytes_up=65_714,
    device_send_ns=1_700_000_000_001_000_000,
)


def test_an_answered_frame_has_every_stage_and_a_refused_one_only_the_device_s():
    answered = FrameRecord(
        **SENT, prediction=3, bytes_down=120, end_ns=1_700_000_000_040_000_000, uplink_ms=33.0, cloud_ms=0.9,
        downlink_ms=5.2, total_ms=40.0,
    )  # fmt: skip
    assert list(answered.stages_ms()) == list(STAGES)
    refused = FrameRecord(**SENT, error="unknown model")
    assert list(refused.stages_ms()) == ["preprocess", "head", "defence", "encode"]
    assert not set(ANSWER) & set(refused.to_json())  # as the device has always written a refused frame
    assert FrameRecord.from_json(refused.to_json()) == refused


def test_a_frame_from_a_cloud_that_reports_no_times_has_one_network_and_cloud_stage_in_its_summary():
    answered = dict(prediction=3, bytes_down=120, end_ns=1_700_000_000_040_000_000, total_ms=40.0)
    stock = FrameRecord(**SENT, **answered, network_cloud_ms=39.0)
    assert list(stock.stages_ms()) == ["preprocess", "head", "defence", "encode", NETWORK_CLOUD, "total"]
    assert FrameRecord.from_json(stock.to_json()) == stock
    timed = FrameRecord(**SENT, **answered, uplink_ms=33.0, cloud_ms=0.9, downlink_ms=5.2)
    assert "network_cloud_ms" not in timed.to_json()  # what the device always wrote for splitleak's cloud
    table = metrics.format_summary(metrics.summarize([stock, stock]))
    assert f"{NETWORK_CLOUD}      39.00     39.00" in table and "uplink" not in table


def test_a_frame_sent_again_or_never_answered_says_so_and_a_plain_one_writes_what_it_always_did():
    plain = FrameRecord(**SENT, error="unknown model")
    assert not {"resent", "unanswered"} & set(plain.to_json())
    lost = FrameRecord(**SENT, resent=2, unanswered=True)
    assert lost.to_json()["resent"] == 2 and lost.to_json()["unanswered"] is True
    assert not set(ANSWER) & set(lost.to_json()) and FrameRecord.from_json(lost.to_json()) == lost
    summary = metrics.summarize([plain, lost])
    assert (summary["frames"], summary["errors"], summary["unanswered"], summary["resent"]) == (2, 1, 1, 2)
    assert summary["accuracy"] is None and summary["stages_ms"] == {}  # neither has an answer to time


def test_a_device_s_json_file_and_records_lines_load_into_frame_records_with_every_field(
    shipped_cloud, shipped_model_dir, tmp_path
):
    out, lines = tmp_path / "device.json", tmp_path / "records.jsonl"
    cmd = [sys.executable, "-m", "splitleak.cli", "device", "--cloud", f"127.0.0.1:{shipped_cloud}"]
    cmd += ["--dataset", "embedded", "--model-dir", str(shipped_model_dir), "--limit", "5"]
    cmd += ["--json", str(out), "--records", str(lines)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    frames = json.loads(out.read_text())["frames"]
    assert [json.loads(line) for line in lines.read_text().splitlines()] == frames
    for frame in frames:
        record = FrameRecord.from_json(frame)
        assert list(record.to_json().items()) == list(frame.items())  # every field, by the same names, in order
        assert record.error is None and list(record.stages_ms()) == list(STAGES)


def test_the_shipped_sweep_table_loads_into_rows_and_writes_back_byte_for_byte(tmp_path):
    table = rows.read_csv(DOCS / "sweep.csv")
    assert len(table) == 180 and set(table[0].attacks) == {"decoder", "rmle"}
    rows.write_csv(table, tmp_path / "sweep.csv")
    assert (tmp_path / "sweep.csv").read_bytes() == (DOCS / "sweep.csv").read_bytes()
    rows.write_json(table, tmp_path / "sweep.json")
    assert rows.read_json(tmp_path / "sweep.json") == table


def test_the_shipped_sweep_table_renders_as_its_shipped_markdown():
    assert sweep.markdown(rows.read_csv(DOCS / "sweep.csv")) == (DOCS / "sweep.md").read_text()


def test_recommend_on_the_shipped_sweep_picks_what_the_readme_reports(tmp_path, capsys):
    rows.write_json(rows.read_csv(DOCS / "sweep.csv"), tmp_path / "sweep.json")
    assert cli.main(["recommend", "--sweep", str(tmp_path), "--link", "4g", "--json", str(tmp_path / "best.json")]) == 0
    printed = capsys.readouterr().out
    assert "on 4g): resnet20-cifar10 split layer3, quantise 2\n  54.9 ms per frame (total_ms_median)" in printed
    shipped = {(r.split, r.defence, r.strength, r.link): r for r in rows.read_csv(DOCS / "sweep.csv")}
    best = json.loads((tmp_path / "best.json").read_text())["best"]
    assert best == shipped["layer3", "quantise", 2.0, "4g"].to_flat()  # the row, by the columns of the table
