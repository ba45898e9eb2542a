"""What separates the sites (fedharmony.study.shift, tools/measure_shift.py) on tiny phantom sites."""

import json

import pytest

from fedharmony.study.shift import wilson_interval


def test_wilson_interval_by_hand():
    # p = 0.8, n = 10, z = 1.96: centre (0.8 + 0.19208) / 1.38416 = 0.71674, half-width
    # 1.96 sqrt(0.016 + 0.009604) / 1.38416 = 0.22658
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-3) and hi == pytest.approx(0.9433, abs=1e-3)
    assert wilson_interval(10, 10)[1] == pytest.approx(1.0) and wilson_interval(0, 10)[0] == pytest.approx(0.0)


def test_measure_shift_on_three_phantom_sites_reports_both_stages(tmp_path):
    import subprocess
    import sys

    import measure_shift  # tools/ is on sys.path (conftest)
    from conftest import REPO

    data = tmp_path / "data"
    subprocess.run([sys.executable, str(REPO / "tools" / "make_phantom_sites.py"), "--out", str(data), "--sites",
                    "BIDMC", "HK", "I2CVB", "--cases", "4", "--size", "32", "--slices", "8"], check=True,
                   capture_output=True)
    assert measure_shift.main(["--data", str(data), "--out", str(tmp_path / "out"),
                               "--override", json.dumps({"image_size": 32})]) == 0
    result = json.loads((tmp_path / "out" / "shift.json").read_text())
    assert result["sites"] == ["BIDMC", "HK", "I2CVB"] and result["chance"] == pytest.approx(1 / 3)
    stored, pre = result["stored"], result["preprocessed"]
    assert stored["cases"] == pre["cases"] == {"BIDMC": 4, "HK": 4, "I2CVB": 4}  # every split of each datalist
    # the bundle's z-scoring brings the sites' intensity distributions together (scale and offset differ a lot)
    assert pre["intensity_w1_sd"] < stored["intensity_w1_sd"]
    for r in (stored, pre):
        lo, hi = r["classifier_ci"]
        assert lo <= r["classifier_accuracy"] <= hi and 0 <= r["amplitude_between_share"] <= 1
    report = (tmp_path / "out" / "shift.md").read_text()
    assert "| stored | 12 |" in report and "| preprocessed | 12 |" in report
    assert (tmp_path / "out" / "shift.png").stat().st_size > 0


def test_measure_shift_names_a_site_without_a_datalist(tmp_path, capsys):
    import measure_shift

    (tmp_path / "A").mkdir()
    with pytest.raises(SystemExit):
        measure_shift.main(["--data", str(tmp_path), "--out", str(tmp_path / "out"), "--sites", "A"])
    assert "no datalist.json for site(s) ['A']" in capsys.readouterr().err
