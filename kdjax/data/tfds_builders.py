"""TensorFlow Datasets builders: ``mvtec_ad``, ``mvtec_loco``, ``visa`` and ``mvtec_ad2``, one
builder config per category (``mvtec_ad/bottle``), manual download only (none of these
archives may be fetched by a program; each builder's MANUAL_DOWNLOAD_INSTRUCTIONS say
where to get it and where to put it)::

    import tensorflow_datasets as tfds
    import kdjax.data.tfds_builders  # registers the builders
    ds = tfds.load("mvtec_ad/bottle", split="test", data_dir="~/tensorflow_datasets",
                   download_and_prepare_kwargs={"download_config": tfds.download.DownloadConfig(
                       manual_dir="/path/to/mvtec_anomaly_detection")})

``manual_dir`` holds the extracted dataset (its category folders, directly or one folder
down) or the downloaded archive(s), which are extracted. The examples are listed by
kdjax's readers (kdjax.data.readers), so the builders accept and refuse exactly what
``data.source=files`` does, and ``data.source=tfds`` gives the engine the same records
and arrays. Features of every example:

* ``image``: uint8 (H, W, 3) at the original resolution, decoded as
  ``kdjax.data.read_image`` decodes the file (grayscale, 16-bit, ... become 8-bit RGB),
  stored as PNG (lossless; VisA's JPEGs grow about fivefold);
* ``label``: 0 good, 1 anomalous, -1 unknown (MVTec AD 2's private splits);
* ``defect_type``: the defect folder ("good", "crack", ...; VisA: image_anno.csv's label);
* ``filename``: the image's path relative to the dataset root; ``index``: its position in
  the reader's listing (sort by it for the reader's order);
* masks datasets: ``mask`` uint8 (H, W, 1), 255 where the mask file marks a defect (VisA:
  a non-zero class id), else 0 (zeros for images without one), and ``mask_filename``
  (relative path, "" for none);
* ``mvtec_loco``: ``anomaly_kind`` ("logical" | "structural" | ""), and ``regions``, one
  entry per ground-truth region PNG: ``mask`` (H, W, 1) holding its pixel values as in
  the PNG, ``filename``, and its defects_config.json entry (``pixel_value``,
  ``defect_name``, ``saturation_threshold``, ``relative_saturation``). The category's
  whole defects_config.json is also in ``info.metadata["defects_config"]``.

Splits: the dataset's own names (train, test; LOCO: train, validation, test; VisA: train,
test from split_csv/1cls.csv; MVTec AD 2: train, validation, test_public, test_private,
test_private_mixed). Importing this module imports TensorFlow (its GPUs hidden).
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Tuple

import numpy as np

from kdjax.data.pipeline import import_tf

import_tf()

import tensorflow_datasets as tfds  # noqa: E402

from kdjax.data import masks as masks_lib  # noqa: E402
from kdjax.data import readers  # noqa: E402
from kdjax.data.files import DatasetError, archives, folders_below  # noqa: E402
from kdjax.data.images import read_image  # noqa: E402
from kdjax.data.types import DATASET_SPECS, Record, RegionSpec  # noqa: E402

_WHERE = {
    "mvtec_ad": ("the MVTec AD archive (mvtec_anomaly_detection.tar.xz, or one archive per "
                 "category)"),
    "mvtec_loco": "the MVTec LOCO AD archive (mvtec_loco_anomaly_detection.tar.xz)",
    "visa": "the VisA archive (VisA_20220922.tar, linked from the README)",
    "mvtec_ad2": "the MVTec AD 2 archive(s)",
}


def _instructions(dataset: str) -> str:
    spec = DATASET_SPECS[dataset]
    return (f"Download {_WHERE[dataset]} from {spec.url} (a person accepts the licence there; "
            f"it cannot be downloaded by a program). Put the archive, or the extracted folder "
            f"holding the category folders ({', '.join(spec.categories[:3])}, ...), in the "
            f"manual_dir: tfds.download.DownloadConfig(manual_dir=...) (kdjax: "
            f"--config.data.root=<that folder> --config.data.source=tfds).")


def _rel(path: str, root: str) -> str:
    return os.path.relpath(path, root).replace(os.sep, "/")


class _KdjaxBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A builder over one kdjax dataset (``DATASET``), one config per category."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release (kdjax)."}
    DATASET = ""

    @property
    def kd_spec(self):
        return DATASET_SPECS[self.DATASET]

    def _info(self) -> tfds.core.DatasetInfo:
        spec = self.kd_spec
        feats = {"image": tfds.features.Image(shape=(None, None, 3), dtype=np.uint8),
                 "label": np.int64, "defect_type": tfds.features.Text(),
                 "filename": tfds.features.Text(), "index": np.int64}
        if spec.ground_truth == "masks":
            feats["mask"] = tfds.features.Image(shape=(None, None, 1), dtype=np.uint8)
            feats["mask_filename"] = tfds.features.Text()
        else:
            feats["anomaly_kind"] = tfds.features.Text()
            feats["regions"] = tfds.features.Sequence({
                "mask": tfds.features.Image(shape=(None, None, 1), dtype=np.uint8),
                "filename": tfds.features.Text(), "pixel_value": np.int64,
                "defect_name": tfds.features.Text(), "saturation_threshold": np.float64,
                "relative_saturation": np.bool_})
        return tfds.core.DatasetInfo(
            builder=self, description=f"{spec.title}, read by kdjax ({spec.url}).",
            features=tfds.features.FeaturesDict(feats), homepage=spec.url,
            metadata=tfds.core.MetadataDict())

    def _split_generators(self, dl_manager):
        spec, category = self.kd_spec, self.builder_config.name
        root = find_root(dl_manager, spec.name, category)
        if spec.layout == "mvtec_loco":
            cfg = masks_lib.read_defects_config(os.path.join(root, category))
            self.info.metadata["defects_config"] = json.dumps(
                [dict(pixel_value=v, **e) for v, e in sorted(cfg.items())])
        return {s: self._generate_examples(root, s) for s in spec.folder_splits}

    def _generate_examples(self, root: str, split: str):
        spec, category = self.kd_spec, self.builder_config.name
        kd_split = "test" if split == spec.test_split else split
        for i, r in enumerate(readers.list_records(spec.name, root, category, kd_split)):
            rel = _rel(r.image_path, root)
            image = read_image(r.image_path)
            ex = {"image": image, "label": int(r.label), "defect_type": r.defect_type,
                  "filename": rel, "index": i}
            if spec.ground_truth == "masks":
                mask = (masks_lib.binary_mask(r) * 255 if r.mask_paths
                        else np.zeros(image.shape[:2], np.uint8))
                ex["mask"] = mask[..., None]
                ex["mask_filename"] = _rel(r.mask_paths[0], root) if r.mask_paths else ""
            else:
                ex["anomaly_kind"] = r.anomaly_kind or ""
                ex["regions"] = [{
                    "mask": masks_lib._read_mask_array(g.mask_path).astype(np.uint8)[..., None],
                    "filename": _rel(g.mask_path, root), "pixel_value": g.pixel_value,
                    "defect_name": g.defect_name,
                    "saturation_threshold": float(g.saturation_threshold),
                    "relative_saturation": bool(g.relative_saturation)} for g in r.regions]
            yield rel, ex


def _configs(dataset: str):
    spec = DATASET_SPECS[dataset]
    return [tfds.core.BuilderConfig(name=c, description=f"{spec.title}, category {c}.")
            for c in spec.categories]


class MvtecAd(_KdjaxBuilder):
    """MVTec AD (Bergmann et al., CVPR 2019), one config per category."""

    name = "mvtec_ad"
    DATASET = "mvtec_ad"
    BUILDER_CONFIGS = _configs("mvtec_ad")
    MANUAL_DOWNLOAD_INSTRUCTIONS = _instructions("mvtec_ad")


class MvtecLoco(_KdjaxBuilder):
    """MVTec LOCO AD (Bergmann et al., IJCV 2022), one config per category."""

    name = "mvtec_loco"
    DATASET = "mvtec_loco"
    BUILDER_CONFIGS = _configs("mvtec_loco")
    MANUAL_DOWNLOAD_INSTRUCTIONS = _instructions("mvtec_loco")


class Visa(_KdjaxBuilder):
    """VisA (Zou et al., ECCV 2022) with its one-class split, one config per category."""

    name = "visa"
    DATASET = "visa"
    BUILDER_CONFIGS = _configs("visa")
    MANUAL_DOWNLOAD_INSTRUCTIONS = _instructions("visa")


class MvtecAd2(_KdjaxBuilder):
    """MVTec AD 2 (Heckler-Kram et al., 2025), one config per category."""

    name = "mvtec_ad2"
    DATASET = "mvtec_ad2"
    BUILDER_CONFIGS = _configs("mvtec_ad2")
    MANUAL_DOWNLOAD_INSTRUCTIONS = _instructions("mvtec_ad2")


BUILDERS = {b.name: b for b in (MvtecAd, MvtecLoco, Visa, MvtecAd2)}


# ---------------------------------------------------------------------------
# The manual directory.

def _is_root(path: str, dataset: str, category: str) -> bool:
    spec = DATASET_SPECS[dataset]
    if spec.layout == "visa" and not os.path.isfile(os.path.join(path, "split_csv", "1cls.csv")):
        return False
    return readers.looks_like_category(os.path.join(path, category), spec)


def extract(archive: str, into: str) -> str:
    """Extract ``archive`` (.tar, .tar.gz, .tgz, .tar.xz: MVTec's; .zip) into a folder of
    ``into`` named after it, once; return that folder. (TFDS's own extractor does not
    read .tar.xz.) Members that would land outside the folder are refused."""
    import shutil
    import tarfile
    import zipfile

    out = os.path.join(into, os.path.basename(archive))
    if os.path.isfile(os.path.join(out, ".kdjax_extracted")):
        return out
    tmp = out + ".incomplete"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        if archive.lower().endswith(".zip"):
            with zipfile.ZipFile(archive) as z:
                z.extractall(tmp)
        else:
            with tarfile.open(archive, "r:*") as t:
                if hasattr(tarfile, "data_filter"):
                    t.extractall(tmp, filter="data")
                else:  # Python < 3.10.12 / 3.11.4: check the member paths ourselves
                    bad = [m.name for m in t.getmembers() if m.name.startswith(("/", "..")) or
                           ".." in m.name.split("/") or m.issym() or m.islnk()]
                    if bad:
                        raise DatasetError(f"{archive}: refusing members {bad[:3]} (absolute "
                                           f"paths, '..' or links).")
                    t.extractall(tmp)
    except (OSError, tarfile.TarError, zipfile.BadZipFile) as e:
        raise DatasetError(f"Cannot extract {archive}: {e}. Download it again.") from None
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    open(os.path.join(out, ".kdjax_extracted"), "w").close()
    return out


def find_root(dl_manager, dataset: str, category: str) -> str:
    """The dataset root in the manual directory: the directory itself or a folder up to two
    levels down that holds ``category``; else the archives there, extracted."""
    manual = str(dl_manager.manual_dir)
    for cand in folders_below(manual):
        if _is_root(cand, dataset, category):
            return cand
    for a in archives(manual):
        out = extract(a, os.path.join(str(dl_manager.download_dir), "kdjax_extracted"))
        for cand in folders_below(out):
            if _is_root(cand, dataset, category):
                return cand
    raise DatasetError(
        f"The manual directory {manual} holds no {DATASET_SPECS[dataset].title} category "
        f"{category!r} (nor an archive holding it). {_instructions(dataset)}")


# ---------------------------------------------------------------------------
# The engine's reader (data.source=tfds; kdjax.data.source.TfdsSource).

def prepare(dataset: str, category: str, root: str = "", data_dir=None):
    """The TFDS builder of ``dataset/category``, prepared in ``data_dir`` (from the manual
    download in ``root`` when it is not prepared yet)."""
    spec = DATASET_SPECS[dataset]
    builder = tfds.builder(f"{spec.tfds_name}/{category}", data_dir=data_dir)
    try:
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
            manual_dir=root if root and os.path.isdir(root) else None))
    except AssertionError as e:  # TFDS: the manual directory is missing or empty
        raise DatasetError(f"TFDS dataset {spec.tfds_name}/{category} is not prepared in "
                           f"{builder.data_dir} and cannot be: "
                           f"{str(e).splitlines()[0]} {_instructions(dataset)}") from None
    return builder


def load_split(dataset: str, category: str, split: str, root: str = "",
               data_dir=None) -> Tuple[List[Record], Dict[str, bytes]]:
    """(records, {path: encoded bytes}) of one split of a prepared TFDS dataset: the
    records the files reader lists for ``root`` (``root`` or "tfds:<name>" prefixes the
    relative paths), and the image, mask and region files they name, as PNG bytes."""
    spec = DATASET_SPECS[dataset]
    builder = prepare(dataset, category, root, data_dir)
    tsplit = spec.test_split if split == "test" else split
    base = root or f"tfds:{spec.tfds_name}"
    skip = tfds.decode.SkipDecoding()
    decoders = ({"image": skip, "mask": skip} if spec.ground_truth == "masks"
                else {"image": skip, "regions": {"mask": skip}})
    ds = builder.as_dataset(split=tsplit, shuffle_files=False, decoders=decoders)
    rows, blobs = [], {}

    def path(rel) -> str:
        return os.path.join(base, *rel.decode().split("/"))

    for ex in tfds.as_numpy(ds):
        image = path(ex["filename"])
        blobs[image] = ex["image"]
        kw = {}
        if spec.ground_truth == "masks":
            if ex["mask_filename"]:
                kw["mask_paths"] = (path(ex["mask_filename"]),)
                blobs[kw["mask_paths"][0]] = ex["mask"]
            kw["mask_threshold"] = spec.mask_threshold
        else:
            regs = ex["regions"]
            specs = []
            for k in range(len(regs["filename"])):
                p = path(regs["filename"][k])
                blobs[p] = regs["mask"][k]
                rel_sat = bool(regs["relative_saturation"][k])
                sat = float(regs["saturation_threshold"][k])
                specs.append(RegionSpec(p, int(regs["pixel_value"][k]),
                                        regs["defect_name"][k].decode(),
                                        sat if rel_sat else int(round(sat)), rel_sat))
            kw.update(mask_paths=tuple(s.mask_path for s in specs), regions=tuple(specs),
                      anomaly_kind=ex["anomaly_kind"].decode() or None)
        rec_split = tsplit if spec.layout == "mvtec_ad2" else split
        rows.append((int(ex["index"]), Record(image, category, rec_split,
                                              ex["defect_type"].decode(), int(ex["label"]),
                                              **kw)))
    return [r for _, r in sorted(rows, key=lambda t: t[0])], blobs
