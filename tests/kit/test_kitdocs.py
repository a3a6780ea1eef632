"""docs/vendors/ pages generated from the code are current, and the diagrams are well-formed
SVG that a renderer draws (rsvg-convert, when installed, turns each into a PNG)."""

import os
import shutil
import subprocess
import xml.etree.ElementTree as ET

import pytest

from xapi_storage import kitdocs
from xapi_storage.toolstack import diagrams, sequences

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                    "docs", "vendors")


def test_generated_pages_are_current():
    stale = []
    for rel, text in kitdocs.generate().items():
        path = os.path.join(DOCS, rel)
        if not os.path.exists(path) or open(path, encoding="utf-8").read() != text:
            stale.append(rel)
    assert not stale, f"run: python -m xapi_storage.kitdocs docs/vendors (stale: {stale})"


@pytest.mark.parametrize("op", list(sequences.SEQUENCES))
def test_each_diagram_draws_every_call_of_the_table(op, tmp_path):
    root = ET.fromstring(diagrams.svg(op))
    texts = [t.text for t in root.iter("{http://www.w3.org/2000/svg}text")]
    drawn = []
    for a, b, label in diagrams.messages(op):
        assert label in texts
        if b in (diagrams.VOLUME, diagrams.DATAPATH):
            name, _, rest = label.partition(" ")
            drawn += [name] * (int(rest.split("×")[1].split()[0]) if "×" in rest else 1)
    assert drawn == sequences.plugin_calls(op, nonpersistent=True)
    if shutil.which("rsvg-convert"):
        src, png = tmp_path / "d.svg", tmp_path / "d.png"
        src.write_text(diagrams.svg(op), encoding="utf-8")
        subprocess.run(["rsvg-convert", str(src), "-o", str(png)], check=True, timeout=60)
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
