#!/usr/bin/env bash
# Wheel install check (issue 13, item 4): build the wheel from the source tree, install it into a fresh venv
# OUTSIDE the repository, and from a directory outside the repository run the cohort CLI, one bundle
# inference from the installed configs (thickness: no checkpoint needed), the transforms and the README's
# transforms example. Run alone: `.ci/wheel_check.sh` (KEEP=1 keeps the work folder; PYTHON=... picks the
# interpreter that builds the wheel and bases the venv, default .venv/bin/python).
# About 1-2 min with pip's cache warm (the pinned torch comes from the cache).
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-$REPO/.venv/bin/python}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/kneeoa-wheel.XXXXXX")"
T0=$(date +%s)
step() { echo "--- wheel install check: $* ($(( $(date +%s) - T0 )) s)"; }
cleanup() { rm -rf "$WORK"; echo "--- wheel install check: work folder removed ($(( $(date +%s) - T0 )) s)"; }
if [ "${KEEP:-0}" = 1 ]; then echo "work folder kept: $WORK"; else trap cleanup EXIT; fi

step "build the wheel"
# Build from a copy of the tracked + untracked-not-ignored files, as a fresh clone would: a build in the
# checkout would leave build/ behind, and a stale build/lib could put deleted modules into the wheel.
mkdir -p "$WORK/src"
if git -C "$REPO" rev-parse --git-dir >/dev/null 2>&1; then
    (cd "$REPO" && git ls-files -z -co --exclude-standard | tar --null -T - --ignore-failed-read -cf - 2>/dev/null) \
        | tar -xf - -C "$WORK/src"
else
    cp -r "$REPO/." "$WORK/src/" && rm -rf "$WORK/src/.venv" "$WORK/src/build"
fi
"$PY" -m pip wheel --quiet --no-deps -w "$WORK/dist" "$WORK/src"
WHEEL="$(ls "$WORK"/dist/kneeoa_pipeline-*.whl)"
"$PY" - "$WHEEL" <<'EOF'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
data = [n for n in names if ".data/data/share/kneeoa-pipeline/" in n]
mods = [n for n in names if n.endswith(".py")]
print(f"{sys.argv[1].rsplit('/', 1)[-1]}: {len(names)} files, {len(mods)} modules, {len(data)} data files "
      f"(bundles {sum('/bundles/' in n for n in data)}, data_manifests {sum('/data_manifests/' in n for n in data)})")
assert "pipeline/cohort/generate.py" in names and "pipeline/cohort/__init__.py" in names
assert not any(n.endswith("transforms/testing.py") or n.startswith("tests/") for n in names)
EOF

step "fresh venv outside the repository ($WORK/venv), pinned torch first"
"$PY" -m venv "$WORK/venv"
V="$WORK/venv/bin/python"
# -qq: errors only (pip's warnings about unused local index folders would drown the log); --no-compile: no
# .pyc for the whole of torch & co. up front (half the install time on 2 cores; imports compile what they use)
"$V" -m pip install -qq --no-compile torch==2.13.0   # first and pinned: the local CPU build on a CPU-only machine
step "install the wheel (its dependencies come from the package index)"
"$V" -m pip install -qq --no-compile "$WHEEL"

mkdir -p "$WORK/run"
cd "$WORK/run"
step "python -m pipeline cohort --tiny from $PWD"
"$V" -m pipeline cohort --out cohort --tiny -n 2 --workers 1
test -f cohort/manifest.csv

step "bundle configs of the installed package"
"$V" -m pipeline bundles
CONFIGS="$("$V" -m pipeline bundles --configs thickness)"
test "$CONFIGS" = "$WORK/venv/share/kneeoa-pipeline/bundles/thickness/configs"

step "thickness bundle inference from the installed configs"
SHARE_FILES_BEFORE=$(find "$WORK/venv/share/kneeoa-pipeline" | wc -l)
# default output folder: bundle_root = ./bundles/thickness for an installed package, never the install itself
"$V" -m monai.bundle run inference --config_file "$CONFIGS/inference.json" --input cohort/manifest.csv --png False
N_MAPS=$(find bundles/thickness/maps -name "*.npy" | wc -l)
echo "maps: $N_MAPS .npy files in bundles/thickness/maps/"
test "$N_MAPS" -gt 0

step "transforms, manifest schema, demo configs, README transforms example"
"$V" - "$WORK" <<'EOF'
import sys
from pathlib import Path

import pipeline
import transforms
from pipeline.bundle_paths import bundle_configs, bundle_names, bundle_root, manifest_schema_path
from pipeline.compare.config import DS_CONFIG_DIR, MRIS_CONFIG_DIR
from pipeline.io.manifest import load_manifest
from pipeline.landmarks.demo import CONFIGS as KNEEL_DEMO
from pipeline.mris.demo import CONFIGS as MRIS_DEMO

work = Path(sys.argv[1]).resolve()
assert Path(pipeline.__file__).resolve().is_relative_to(work / "venv"), pipeline.__file__
assert transforms.LoadKneeRadiographd is not None
df = load_manifest("cohort/manifest.csv")
assert manifest_schema_path().is_relative_to(work / "venv") and len(df) > 0
for d in (MRIS_DEMO, KNEEL_DEMO, MRIS_CONFIG_DIR, DS_CONFIG_DIR):
    assert (d / "train.json").is_file(), d
assert set(bundle_names()) == {"dess_seg", "direct_synthesis", "kneel", "mris", "progression_mr", "segreg",
                             "thickness"}, bundle_names()
assert all((bundle_configs(n) / "inference.json").is_file() for n in bundle_names())
assert bundle_root("mris") == str(Path.cwd() / "bundles" / "mris")  # outputs: here, not in the venv
print(f"ok: pipeline from {Path(pipeline.__file__).parent}, {len(df)} manifest rows, schema {manifest_schema_path()}")
EOF
"$V" "$REPO/.ci/readme_example.py" "$REPO/README.md"
if [ "$(find "$WORK/venv/share/kneeoa-pipeline" | wc -l)" != "$SHARE_FILES_BEFORE" ]; then
    echo "error: the bundle wrote into the installed package"; exit 1
fi
step "passed"
