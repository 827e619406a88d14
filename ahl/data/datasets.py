"""The built-in datasets of the AHL and DRA papers, one entry each: sources, checksums, raw layout, converter, licence.

Importing this module registers them; it re-exports the registry's look-up functions, so that a caller imports
``resolve``, ``get_dataset`` and ``get_source`` from here and is sure the built-in entries exist. URLs marked
``# unverified`` were taken from the papers' links and public code and could not be checked from an offline machine.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ahl.core.config import path_component
from ahl.core.errors import UserError
from ahl.data import converters, embedded, own
from ahl.data.mvtec import MAX_PIXELS
from ahl.data.protocol import ProtocolConfig
from ahl.data.registry import (
    DATASETS,
    Dataset,
    Selection,
    Source,
    get_dataset,
    get_source,
    known_classnames,
    register,
    resolve,
)

# The registry's look-up functions, re-exported: importing them from here guarantees the built-in entries exist.
__all__ = [
    "DATASETS", "Dataset", "Selection", "Source", "get_dataset", "get_source", "known_classnames", "resolve", "select",
    "selected_dataset",
]  # fmt: skip
log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------- embedded demo
# Built offline in seconds from scikit-image's texture photographs, already in MVTec layout.
register(
    Dataset(
        name="embedded",
        title="the embedded demo dataset",
        subsets=embedded.SUBSETS,
        licence="scikit-image sample images (public domain / CC0, see skimage.data); generated defects: ours",
        homepage="https://scikit-image.org/docs/stable/api/skimage.data.html",
        raw_layout="<subset>/train/good/*.png, <subset>/test/<defect>/*.png, <subset>/ground_truth/<defect>/"
        "*_mask.png, as built by the download stage",
        converter=converters.convert_mvtec,  # already in MVTec layout: linked and checked
        build=embedded.build_embedded,
    )
)


# ------------------------------------------------------------------------------------------------------- MVTec AD
MVTEC_CATEGORIES = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
)  # fmt: skip

# The full archive (one file, 4.9 GB) may be given as `data.local` for any category: only that one is extracted.
MVTEC_FULL_ARCHIVE = "mvtec_anomaly_detection.tar.xz"
MVTEC_FULL_ARCHIVE_SHA256 = "cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d"

# unverified: MVTec's per-category download links (mydrive.ch), as used across public code since 2021; MVTec's
# page now shows a licence form first, so these may stop working. pill is offered from a second share.
_MVTEC_SHARE = "https://www.mydrive.ch/shares/38536/3830184030e49fe74747669442f0f282/download"
_MVTEC_PILL_SHARE = "https://www.mydrive.ch/shares/43421/11a215a5749fcfb75e331ddd5f8e43ee/download"
_MVTEC_FILE_IDS = {
    "bottle": "420937370-1629951468",
    "cable": "420937413-1629951498",
    "capsule": "420937454-1629951595",
    "carpet": "420937484-1629951672",
    "grid": "420937487-1629951814",
    "hazelnut": "420937545-1629951845",
    "leather": "420937607-1629951964",
    "metal_nut": "420937637-1629952063",
    "pill": "420938129-1629953099",
    "screw": "420938130-1629953152",
    "tile": "420938133-1629953189",
    "toothbrush": "420938134-1629953256",
    "transistor": "420938166-1629953277",
    "wood": "420938383-1629953354",
    "zipper": "420938385-1629953449",
}
# The full archive lives in the same share.
MVTEC_FULL_ARCHIVE_URL = f"{_MVTEC_SHARE}/420938113-1629952094/{MVTEC_FULL_ARCHIVE}"


def _mvtec_source(category: str) -> Source:
    share = _MVTEC_PILL_SHARE if category == "pill" else _MVTEC_SHARE
    return Source(
        key=f"mvtec-{category}",
        url=f"{share}/{_MVTEC_FILE_IDS[category]}/{category}.tar.xz",
        sha256=None,  # not yet pinned: the first download logs the hash to pin here
        filename=f"{category}.tar.xz",
        members_under=f"{category}/",  # the per-category archive, and the full one, hold <category>/...
        other_archives={MVTEC_FULL_ARCHIVE: MVTEC_FULL_ARCHIVE_SHA256},
        instructions=(
            "MVTec AD (CC BY-NC-SA 4.0) is offered at https://www.mvtec.com/company/research/datasets/mvtec-ad "
            f"after a licence form; download {category}.tar.xz, or the whole {MVTEC_FULL_ARCHIVE} and give it "
            "as `data.local` (only this category is extracted)."
        ),
    )


register(
    Dataset(
        name="mvtec",
        title="MVTec AD",
        subsets=MVTEC_CATEGORIES,
        licence="CC BY-NC-SA 4.0",
        homepage="https://www.mvtec.com/company/research/datasets/mvtec-ad",
        raw_layout="<category>/train/good/*.png, <category>/test/<defect>/*.png, <category>/ground_truth/<defect>/"
        "*_mask.png, one folder per category (possibly inside mvtec_anomaly_detection/)",
        converter=converters.convert_mvtec,
        sources={category: _mvtec_source(category) for category in MVTEC_CATEGORIES},
    )
)


# ---------------------------------------------------------------------------------------------------------- AITEX
# The AITEX Fabric Image Database comes as three .7z archives, which Python's standard library cannot open,
# so the user extracts them into one folder and that folder is placed by hand.
_AITEX_URL = "https://www.aitex.es/wp-content/uploads/2019/07"  # unverified: from public download scripts
register(
    Dataset(
        name="aitex",
        title="the AITEX Fabric Image Database",
        subsets=("AITEX",),
        licence="AITEX Fabric Image Database terms (free for research; see the homepage)",  # unverified
        homepage="https://www.aitex.es/afid/",
        raw_layout="NODefect_images/<fabric>/*.png, Defect_images/Defect_images/NNNN_CCC_NN.png and "
        "Mask_images/Mask_images/NNNN_CCC_NN_mask.png",
        converter=converters.convert_aitex,
        sources={
            "AITEX": Source(
                key="aitex",
                filename="AITEX",  # a folder
                manual=True,
                marker="NODefect_images",
                instructions=(
                    f"download {_AITEX_URL}/Defect_images.7z, {_AITEX_URL}/NODefect_images.7z and "
                    f"{_AITEX_URL}/Mask_images.7z (homepage https://www.aitex.es/afid/) and extract all three with "
                    "`7z x` into one folder named AITEX, so that it holds NODefect_images/, Defect_images/ and "
                    "Mask_images/."
                ),
            )
        },
    )
)


# ------------------------------------------------------------------------------------------------ SDD (KolektorSDD)
register(
    Dataset(
        name="sdd",
        title="KolektorSDD",
        subsets=("SDD",),
        licence="CC BY-NC-SA 4.0",
        homepage="https://www.vicos.si/resources/kolektorsdd/",
        raw_layout="kosNN/PartK.jpg with its label kosNN/PartK_label.bmp next to it",
        converter=converters.convert_sdd,
        sources={
            "SDD": Source(
                key="sdd",
                url="https://go.vicos.si/kolektorsdd",  # unverified: ViCoS short link that redirects to the zip
                # unverified: the hash anomalib pins for this file (not checked here, no network)
                sha256="65dc621693418585de9c4467d1340ea7958a6181816f0dc2883a1e8b61f9d4dc",
                filename="KolektorSDD.zip",
                marker="kos01",
                instructions="KolektorSDD is on https://www.vicos.si/resources/kolektorsdd/ (KolektorSDD.zip).",
            )
        },
    )
)


# ----------------------------------------------------------------------------------------------------------- ELPV
register(
    Dataset(
        name="elpv",
        title="the ELPV dataset (`pip install elpv-dataset`)",
        subsets=("elpv",),
        licence="CC BY-NC-SA 4.0",
        homepage="https://github.com/zae-bayern/elpv-dataset",
        raw_layout="labels.csv (whitespace-separated: images/cellNNNN.png probability type) and images/",
        converter=converters.convert_elpv,
        sources={
            "elpv": Source(
                key="elpv",
                # unverified: the branch archive of the repository (its bytes change with each commit, hence no
                # sha256); the PyPI package elpv-dataset carries the same labels.csv and 2,624 images offline.
                url="https://github.com/zae-bayern/elpv-dataset/archive/refs/heads/master.zip",
                filename="elpv-dataset-master.zip",
                package="elpv-dataset",
                marker="labels.csv",
                instructions="`pip install elpv-dataset` provides the data without a download.",
            )
        },
    )
)


# ------------------------------------------------------------------------------------------- Optical (DAGM 2007)
register(
    Dataset(
        name="optical",
        title="the DAGM 2007 competition data set",
        subsets=("optical",),
        licence="DAGM 2007 competition terms (non-commercial research; licence form on the homepage)",  # unverified
        # unverified: the HCI Heidelberg page that hands out the data after a licence form
        homepage="https://hci.iwr.uni-heidelberg.de/content/weakly-supervised-learning-industrial-optical-inspection",
        raw_layout="Class1 .. Class10, each with .../Train/ and .../Test/ holding the images and Label/Labels.txt "
        "(DAGM 2007 label files)",
        converter=converters.convert_optical,
        sources={
            "optical": Source(
                key="optical",
                filename="dagm-2007-competition-dataset-optical-inspection.zip",
                manual=True,
                marker="Class1",
                instructions=(
                    "DAGM 2007 needs a licence form (https://hci.iwr.uni-heidelberg.de/content/"
                    "weakly-supervised-learning-industrial-optical-inspection) or a Kaggle login: "
                    "`kaggle datasets download mhskjelvareid/dagm-2007-competition-dataset-optical-inspection` "
                    "(unverified: Kaggle mirror; a copy is also on https://zenodo.org/records/12750201). "
                    "It must hold Class1/ ... Class10/ with Train/ and Test/ and their Label/Labels.txt."
                ),
            )
        },
    )
)


# -------------------------------------------------------------------------------------------------------- Mastcam
register(
    Dataset(
        name="mastcam",
        title="the Mastcam novelty-detection data set of Kerner et al.",
        subsets=("mastcam",),
        licence="CC BY 4.0",
        homepage="https://doi.org/10.5281/zenodo.3732485",
        raw_layout="train_typical/*, test_typical/* and test_novel/<class>/*",
        converter=converters.convert_mastcam,
        sources={
            "mastcam": Source(
                key="mastcam",
                filename="mastcam",  # a folder: the record holds one zip per split
                manual=True,
                marker="test_novel",
                instructions=(
                    "download train_typical.zip, test_typical.zip and test_novel.zip from "
                    "https://zenodo.org/records/3732485 (unverified: the Mastcam novelty detection record of "
                    "Kerner et al.) and unzip them into one folder named mastcam, so that it holds "
                    "train_typical/, test_typical/ and test_novel/<class>/."
                ),
            )
        },
    )
)


# ------------------------------------------------------------------------------------------------------- BrainMRI
register(
    Dataset(
        name="brainmri",
        title="the Kaggle data set 'Brain MRI Images for Brain Tumor Detection'",
        subsets=("brainmri",),
        licence="not stated by the Kaggle uploader (research use)",  # unverified
        homepage="https://www.kaggle.com/datasets/navoneel/brain-mri-images-for-brain-tumor-detection",
        raw_layout="no/* (normal scans) and yes/* (tumour scans)",
        converter=converters.convert_brainmri,
        sources={
            "brainmri": Source(
                key="brainmri",
                filename="brain-mri-images-for-brain-tumor-detection.zip",
                manual=True,
                marker="yes",
                instructions=(
                    "Kaggle needs a login: `kaggle datasets download navoneel/brain-mri-images-for-brain-tumor-"
                    "detection`, or the Download button of "
                    "https://www.kaggle.com/datasets/navoneel/brain-mri-images-for-brain-tumor-detection "
                    "(rename its archive.zip). It holds no/ and yes/."
                ),
            )
        },
    )
)


# --------------------------------------------------------------------------------------------------------- HeadCT
register(
    Dataset(
        name="headct",
        title="the Kaggle data set 'Head CT - hemorrhage'",
        subsets=("headct",),
        licence="as stated on the Kaggle page (reported as CC0 1.0)",  # unverified
        homepage="https://www.kaggle.com/datasets/felipekitamura/head-ct-hemorrhage",
        raw_layout="labels.csv (columns id, hemorrhage) and head_ct/head_ct/NNN.png",
        converter=converters.convert_headct,
        sources={
            "headct": Source(
                key="headct",
                filename="head-ct-hemorrhage.zip",
                manual=True,
                marker="labels.csv",
                instructions=(
                    "Kaggle needs a login: `kaggle datasets download felipekitamura/head-ct-hemorrhage`, or the "
                    "Download button of https://www.kaggle.com/datasets/felipekitamura/head-ct-hemorrhage "
                    "(rename its archive.zip). It holds labels.csv and head_ct/head_ct/000.png ... 199.png."
                ),
            )
        },
    )
)


# ---------------------------------------------------------------------------------------------------- Hyper-Kvasir
register(
    Dataset(
        name="hyperkvasir",
        title="Hyper-Kvasir's labelled images",
        subsets=("hyperkvasir",),
        licence="CC BY 4.0",
        homepage="https://datasets.simula.no/hyper-kvasir/",
        raw_layout="upper-gi-tract/anatomical-landmarks/<landmark>/*.jpg and "
        "upper-gi-tract/pathological-findings/<finding>/*.jpg (from labeled-images/)",
        converter=converters.convert_hyperkvasir,
        sources={
            "hyperkvasir": Source(
                key="hyperkvasir",
                # unverified: Simula's direct link to the labelled images (3.9 GB); also on OSF, https://osf.io/mh9sj/
                url="https://datasets.simula.no/downloads/hyper-kvasir/hyper-kvasir-labeled-images.zip",
                sha256=None,  # one public script pins c603449b1bc0be86948b11d9aea8b2002058a11e6f5499e2a384b9ae9c8dbd3f
                filename="hyper-kvasir-labeled-images.zip",
                marker="upper-gi-tract",
                instructions=(
                    "Hyper-Kvasir's labelled images are on https://datasets.simula.no/hyper-kvasir/ and "
                    "https://osf.io/mh9sj/ (hyper-kvasir-labeled-images.zip)."
                ),
            )
        },
    )
)


# ------------------------------------------------------------------------------------------ your own data (local)
def select(classname: str, local: Path | None, protocol: ProtocolConfig) -> dict:
    """What data/selection.json records: a registered subset, or your own dataset ``local/classname``.

    A registered classname wins unless ``local`` is a folder holding ``classname/``; an unregistered one needs
    ``local``. Your own folder is checked here (layout, anomalies, enough for M), before anything runs.
    """
    path_component(classname, "classname")
    registered = classname in known_classnames()
    folder = local / classname if local is not None and (local / classname).is_dir() else None
    if registered and folder is None:
        selection = resolve(classname)
        log.info("classname %r: the registered dataset %s", classname, get_dataset(selection.dataset).title)
        return {"dataset": selection.dataset, "source": selection.source}
    if local is None:
        try:
            resolve(classname)
        except UserError as err:
            raise UserError(f"{err} For your own data, also set `data.local` to the folder holding {classname}/ "
                            f"(docs/data.md, 'Your own data').") from None  # fmt: skip
    if folder is None and local.is_dir():
        raise UserError(
            f"data.local = {local} holds no folder {classname}/: put your dataset there ({own.LAYOUT}; docs/data.md, "
            "'Your own data'), or set classname to the folder's name"
        )
    if folder is not None:
        layout = own.inspect_folder(folder, local)
        if protocol.known_class is None:  # the hard setting's counts are checked by the split stage
            own.check_enough(layout, protocol.n_anomalies, protocol.test_set_m, local)
    if registered:
        log.warning("classname %r is also a registered subset; using your folder %s (data.local is set)", classname,
                    folder)  # fmt: skip
    log.info("classname %r: your own dataset in %s", classname, folder or local)
    return {"dataset": own.OWN, "source": own.OWN, "classname": classname}


def selected_dataset(selected: dict, max_pixels: int = MAX_PIXELS) -> Dataset:
    """The dataset entry data/selection.json names: a registered one, or your own (``own.OWN``, whose converter
    skips images above ``max_pixels`` with a warning; registered datasets have their published sizes)."""
    if selected["dataset"] == own.OWN:
        return own.own_dataset(selected["classname"], max_pixels)
    return get_dataset(selected["dataset"])
