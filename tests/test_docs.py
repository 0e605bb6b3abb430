"""The README's parameter table is generated from AlignParams: keep it in step."""

import runpy
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_parameter_table_matches_alignparams():
    table = runpy.run_path(str(ROOT / "docs" / "gen_params_table.py"))["table"]()
    readme = (ROOT / "README.md").read_text()
    assert table.strip() in readme, (
        "README.md's parameter table is out of date: paste `python docs/gen_params_table.py`")
