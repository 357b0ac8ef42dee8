"""Bundle ``large_files.yml`` (model-zoo format) and ``LICENSE`` files: the committed files parse and list the
weights each bundle's configs load; pipeline.bundle_files writes real sha256 values that MONAI's
``download_large_files`` verifies."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
import yaml

from pipeline.bundle_files import LARGE_FILES_NAME, large_files_manifest, listed_paths, write_large_files

BUNDLES = Path(__file__).resolve().parents[1] / "bundles"
#: The weights each bundle's configs load (checkpoint / global_ckpt / local_ckpt under bundle_root).
MODEL_FILES = {
    "dess_seg": ["models/model.pt"],
    "direct_synthesis": ["models/model.pt"],
    "kneel": ["models/global/model.pt", "models/local/model.pt"],
    "mris": ["models/model.pt"],
    "segreg": ["models/segmenter_dxa.pt", "models/segmenter_xray.pt", "models/stage3.pt"],
    "progression_mr": [f"models/fold{k}/model.pt" for k in range(5)],
}


@pytest.mark.parametrize("name", sorted(MODEL_FILES))
def test_committed_large_files_parse_and_list_the_config_weights(name):
    bundle = BUNDLES / name
    data = yaml.safe_load((bundle / LARGE_FILES_NAME).read_text())
    entries = data["large_files"]
    assert [e["path"] for e in entries] == MODEL_FILES[name]
    for e in entries:
        assert set(e) == {"path", "url", "hash_val", "hash_type"}
        assert e["url"] == "" and e["hash_type"] == "sha256"
        assert e["hash_val"] == "" or re.fullmatch(r"[0-9a-f]{64}", e["hash_val"])
    configs = " ".join(p.read_text() for p in (bundle / "configs").glob("*.json"))
    for p in MODEL_FILES[name]:  # every component of the path is named by the configs (fold<k>: "'/models/fold' + str(@fold)")
        assert all(part in configs or part.rstrip("0123456789") in configs for part in Path(p).parts), (name, p)
    if not (bundle / "models").exists():  # the committed text is what write_large_files writes
        assert (bundle / LARGE_FILES_NAME).read_text() == large_files_manifest(bundle)


@pytest.mark.parametrize("name", ["dess_seg", "direct_synthesis", "kneel", "mris", "progression_mr", "segreg", "thickness"])
def test_bundle_license(name):
    text = (BUNDLES / name / "LICENSE").read_text()
    assert "Apache License, Version 2.0" in text and "kneeoa-pipeline" in text
    assert "http://www.apache.org/licenses/LICENSE-2.0" in text and "no patient data" in text.lower()


def test_write_large_files_hashes_and_monai_verifies(tmp_path):
    from monai.apps.utils import HashCheckError
    from monai.bundle import download_large_files

    bundle = tmp_path / "kneel"
    (bundle / "models" / "global").mkdir(parents=True)
    (bundle / LARGE_FILES_NAME).write_text((BUNDLES / "kneel" / LARGE_FILES_NAME).read_text())
    (bundle / "models" / "global" / "model.pt").write_bytes(b"global weights")
    (bundle / "models" / "global" / "checkpoint_final.pt").write_bytes(b"resume state")  # not a large file
    (bundle / "models" / "extra.pt").write_bytes(b"extra")  # found under models/: listed
    write_large_files(bundle)
    entries = {e["path"]: e for e in yaml.safe_load((bundle / LARGE_FILES_NAME).read_text())["large_files"]}
    assert list(entries) == ["models/extra.pt", "models/global/model.pt", "models/local/model.pt"]
    assert entries["models/global/model.pt"]["hash_val"] == hashlib.sha256(b"global weights").hexdigest()
    assert entries["models/local/model.pt"]["hash_val"] == ""  # not trained yet
    assert listed_paths(bundle) == list(entries)

    (bundle / "models" / "local").mkdir()
    (bundle / "models" / "local" / "model.pt").write_bytes(b"local weights")
    write_large_files(bundle)
    download_large_files(str(bundle))  # every file exists and matches its sha256
    (bundle / "models" / "local" / "model.pt").write_bytes(b"tampered")
    with pytest.raises(HashCheckError):
        download_large_files(str(bundle))
