"""Compare two `actstore run` output folders (e.g. made before and after a refactor):
report.md with paths and wall time masked, every store file byte for byte (the group header
aside: it records creation time and version), results.json, neurons.json and experiment JSONs.

    python -m bench.compare_runs OUT_BEFORE OUT_AFTER
"""
import json
import re
import sys
from pathlib import Path

a, b = Path(sys.argv[1]), Path(sys.argv[2])


def norm(text, root):
    text = text.replace(str(root), "OUT")
    return re.sub(r"wall time of this run \d+ s", "wall time", text)


ra, rb = norm((a / "report.md").read_text(), a), norm((b / "report.md").read_text(), b)
print("report.md identical (paths, wall time masked):", ra == rb)
if ra != rb:
    import difflib
    print("".join(list(difflib.unified_diff(ra.splitlines(True), rb.splitlines(True)))[:80]))
diff_files = []
for f in sorted(p for p in (a / "stores").rglob("*") if p.is_file()):
    rel = f.relative_to(a)
    g = b / rel
    if rel.name == "zarr.json" and len(rel.parts) == 3:
        continue   # the group header: creation time and package version differ
    if not g.exists() or f.read_bytes() != g.read_bytes():
        diff_files.append(str(rel))
print("store files differing (group zarr.json excluded):", diff_files[:10], len(diff_files))

VOL = {"seconds", "store", "finished", "dir", "device"}


def strip(o):
    if isinstance(o, dict):
        return {k: strip(v) for k, v in o.items() if k not in VOL}
    if isinstance(o, list):
        return [strip(v) for v in o]
    if isinstance(o, str):
        return o.replace(str(a), "OUT").replace(str(b), "OUT")
    return o


for pat in ("probes/*/results.json", "neurons/*/neurons.json", "experiments/*/*.json"):
    for f in sorted(a.glob(pat)):
        if f.name.endswith(".source.json"):
            continue
        g = b / f.relative_to(a)
        x, y = strip(json.loads(f.read_text())), strip(json.loads(g.read_text()))
        if "store_identity" in x:
            x["store_identity"].pop("created", None), y["store_identity"].pop("created", None)
        print(f.relative_to(a), "same" if x == y else "DIFFERENT")
