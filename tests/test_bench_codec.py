"""The codec benchmark on tiny fields: records complete, bounded codecs within tol, files written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tierscope.bench.codec import measure, run_codec_bench, smooth, turbulence
from tierscope.cli import main


def test_bench_records_and_bound(tmp_path: Path) -> None:
    fields = {"turbulence": turbulence(12), "smooth": smooth(12)}
    codecs = ("lorenzo", "interp", "bounded", "zstd", "fp16", "zfp", "sz3")
    results = run_codec_bench(tmp_path, rels=(1e-3, 1e-1), codecs=codecs, repeats=1, fields=fields)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["records"] == json.loads(json.dumps(results["records"]))
    assert (tmp_path / "ratio_vs_tol.png").stat().st_size > 0
    assert (tmp_path / "decode_speed.png").stat().st_size > 0
    run = results["codecs"]
    assert len(results["records"]) == 2 * 2 * len(run)
    for r in results["records"]:
        assert r["ratio"] > 0 and r["encode_mb_s"] > 0 and r["decode_mb_s"] > 0
        if r["codec"] in ("lorenzo", "interp", "bounded", "zfp", "sz3", "zstd"):
            assert r["bounded"] and r["max_err_over_tol"] <= 1.0, r
    lossy = {r["codec"]: r for r in results["records"] if r["field"] == "smooth" and r["rel_tol"] == 0.1}
    assert lossy["zstd"]["max_err"] == 0.0 and lossy["zstd"]["psnr_db"] is None
    assert lossy["bounded"]["ratio"] >= lossy["lorenzo"]["ratio"]


def test_bench_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "o"
    assert main(["bench", "codec", "--out", str(out), "--n", "8", "--rels", "0.01",
                 "--codecs", "bounded,zstd", "--repeats", "1", "--no-plots"]) == 0
    text = capsys.readouterr().out
    assert "| turbulence | 0.01 | bounded |" in text
    records = json.loads((out / "results.json").read_text())["records"]
    assert {r["codec"] for r in records} == {"bounded", "zstd"}
    assert all(np.isfinite(r["ratio"]) for r in records)
    assert main(["bench", "codec", "--out", str(out), "--codecs", "nope"]) == 2
    assert "none of the codecs" in capsys.readouterr().err


def test_psnr_of_an_inexact_constant_field_is_undefined_not_a_crash():
    record = measure(np.full((8, 8), 1000.1, dtype=np.float32), "fp16", 0.5, repeats=1)
    assert record["psnr_db"] is None and 0 < record["max_err"] <= 0.5

