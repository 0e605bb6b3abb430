"""Print the README's parameter table (Markdown) from AlignParams metadata.

    python docs/gen_params_table.py

Paste the output into README.md under "Parameters" whenever a parameter changes, so the
README keeps the same names and defaults as the API, the CLI and the widget.
"""

from __future__ import annotations

from napari_ssemnet.cli import option_name
from napari_ssemnet.core.params import knobs


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def table() -> str:
    rows = ["| parameter (API / CLI) | default | allowed | what it does |",
            "|---|---|---|---|"]
    for f in knobs():
        meta = f.metadata
        if meta.get("choices"):
            allowed = ", ".join(f"`{c}`" for c in meta["choices"])
        elif meta.get("min") is not None or meta.get("max") is not None:
            lo, hi = meta.get("min"), meta.get("max")
            if lo is not None and hi is not None:
                allowed = f"{lo} to {hi}"
            else:
                allowed = f">= {lo}" if lo is not None else f"<= {hi}"
        else:
            allowed = "path" if f.name == "weights" else type(f.default).__name__
        default = f"`{f.default!r}`" if isinstance(f.default, str) else f"`{f.default}`"
        rows.append(f"| `{f.name}` / `{option_name(f.name)}` | {default} | {_cell(allowed)} | "
                    f"{_cell(meta.get('help', ''))} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
