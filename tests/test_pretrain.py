"""The shipped starting model's recipe: simulated scans of many kinds, chained warm starts."""

import dataclasses
import json

import pytest

from bench.pretrain import STAGE_KINDS, PretrainPlan, stage_scan


def test_stage_scans_span_kinds_probes_and_doses_and_are_reproducible():
    plan = PretrainPlan()
    scans = [stage_scan(stage, plan) for stage in range(16)]
    assert [s.object_kind for s in scans[:4]] == list(STAGE_KINDS)
    assert {s.probe_kind for s in scans} == {"disc", "focused"}
    photons = [s.photons_per_pattern for s in scans]
    assert min(photons) >= 1e5 and max(photons) <= 1e7 and max(photons) > 10 * min(photons)
    assert all(16 <= s.probe_diameter_px <= 32 for s in scans)
    assert all(0.15 <= s.max_phase <= 2.5 and 0.3 <= s.min_amplitude <= 0.8 for s in scans)
    assert len({s.seed for s in scans}) == 16
    assert stage_scan(3, plan) == scans[3]
    assert stage_scan(3, dataclasses.replace(plan, seed=1)) != scans[3]


def test_each_stage_starts_from_the_last_and_the_record_lists_them(tmp_path):
    pytest.importorskip("lightning")
    from bench.pretrain import pretrain
    from ptycho_export.bundle import read_bundle

    plan = PretrainPlan(stages=2, steps_per_stage=3, preset="unet-tiny", patch_size=32,
                        grid=5)
    record = pretrain(tmp_path / "start.zip", plan, log=lambda _: None)
    bundle = read_bundle(tmp_path / "start.zip")
    assert bundle.training["init_from"]["bundle"] == "stage00.zip"
    assert bundle.training["steps_run"] == 3
    assert bundle.config.patch_size == 32 and bundle.config.widths == (4, 8, 16)
    saved = json.loads((tmp_path / "start.json").read_text())
    assert saved == json.loads(json.dumps(record))
    assert [row["stage"] for row in saved["stages"]] == [0, 1]
    assert [row["scan"]["object_kind"] for row in saved["stages"]] == list(STAGE_KINDS[:2])
    assert all(row["steps"] == 3 for row in saved["stages"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["start.json", "start.zip"]
