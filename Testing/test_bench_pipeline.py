"""benchmarks/bench_pipeline.py's cases are what its docstring says: ``noisy256`` is grainier than the shipped
model's training CTs, so the grain matching acts on it (the path the benchmark is there to time), and
``volume256``, the same CT without the noise, is left alone (the Visible Human's frozen-cadaver CT has too little
tissue within the brain window for a grain to be measured at all); a case's line names what the grain matching did."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from conftest import REPO, data_root, require

from CTtoMRISynthesisLib.grain import KEY, grain
from CTtoMRISynthesisLib.weights import default_weights_path, read_config


def _bench():
    spec = importlib.util.spec_from_file_location("bench_pipeline", REPO / "benchmarks" / "bench_pipeline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("case, filtered", [("volume256", False), ("noisy256", True)])
def test_only_the_noisy_case_is_grainier_than_the_training_cts(tmp_path: Path, case: str, filtered: bool) -> None:
    import SimpleITK as sitk

    from CTtoMRISynthesisLib.intensity import CTWindow
    from CTtoMRISynthesisLib.training.unpaired import on_model_grid

    require(data_root() / "visible_human_head_ct_mr" / "vm_head_ct.mha")
    ct_path, mri_path = _bench().make_inputs(case, tmp_path)
    assert mri_path is None
    pre = read_config(default_weights_path())["preprocessing"]
    window = pre["ct_window"]
    measured = grain(on_model_grid(sitk.ReadImage(str(ct_path)), CTWindow(window["level"], window["width"]), 256))
    assert (measured is not None and measured > pre[KEY]) is filtered, (case, measured, pre[KEY])


def test_a_case_line_names_what_the_grain_matching_did() -> None:
    result = {"case": "noisy256", "size": [256, 256, 256], "device": "cpu", "total": 42.25, "gpu_peak_mb": None,
              "stages": {"synthesise": 31.39, "write": 2.66}, "peak_rss_mb": 1451.0,
              "grain": {"ct_grain": 13.08, "ct_grain_target": 8.268, "ct_grain_filter": "median35",
                        "ct_grain_median_share": 1.0, "ct_grain_median5_share": 1.0}}
    bench = _bench()
    line = bench.case_line(result)
    assert line == ("noisy256 256×256×256 (cpu): 42.25 s, slowest stage synthesise 31.39 s, peak RSS 1451 MB, "
                    "CT grain 13.08 (target 8.27; median 3×3 1, 5×5 1)")
    assert "CT grain" not in bench.case_line({**result, "grain": {}})
