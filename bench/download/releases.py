"""Where each real dataset's files are published, how to check them, and the layout they unpack to.

Every location and checksum here was read from the dataset's own source (named in ``origin``):

* Waterbirds: the tarball of the kohpangwei/group_DRO README (commit 2789944). Neither that README
  nor WILDS (whose ``waterbirds_dataset.py`` gives ``compressed_size: None``) publishes a checksum:
  the archive is checked by gzip's own CRC while it is unpacked, and the result by ``bench data
  check`` (the published group counts, every image decoded).
* CelebA: the official files are on Google Drive (the mmlab page links there), which serves large
  files through a confirmation page, not a plain URL. The MD5 of each file is torchvision's
  (``torchvision.datasets.CelebA.file_list``, torchvision 0.29.1). The user fetches the three files
  (or points ``--mirror`` at a copy) and the command verifies and unpacks them.
* Spawrious: the tarballs that aengusl/spawrious downloads in ``spawrious/torch.py`` (commit
  fb24635; the many-to-many challenges use the entire dataset there). No checksum is published:
  gzip's CRC and ``bench data check`` as for Waterbirds.
* UrbanCars is not distributed: :data:`URBANCARS_STEPS` are the generation steps of
  facebookresearch/Whac-A-Mole (``scripts/prepare_dataset_models/create_urbancars.sh``, commit 1094624).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ReleaseFile:
    """One published file: ``name`` in the downloads folder, ``url`` (None: no plain download), its
    checksum (None: none is published) and ``dest``: where its content goes, relative to the data root
    (an archive is unpacked into that folder; another file is placed at that path)."""

    name: str
    url: str | None
    dest: str
    md5: str | None = None

    @property
    def is_archive(self) -> bool:
        return self.name.endswith((".tar.gz", ".tgz", ".tar", ".zip"))


@dataclass(frozen=True)
class Release:
    """How a dataset is obtained: its files, the folder they make under the data root (``target``,
    the loader's first folder name), and whether archives of several datasets share that folder
    (``shared``: Spawrious' challenges unpack into one ``spawrious224/`` tree)."""

    dataset: str
    files: tuple[ReleaseFile, ...]
    target: str
    origin: str
    checksum_origin: str = ""
    shared: bool = False
    manual_steps: tuple[str, ...] = ()  # for files without a plain URL

    @property
    def kind_text(self) -> str:
        return "downloads and checks the files" if all(f.url for f in self.files) else \
            "checks and unpacks the files you fetch (no plain download)"


GROUP_DRO_README = "kohpangwei/group_DRO README.md @ 2789944ff3a83537fa232d5377f4b093a06ea0c0"
SPAWRIOUS_TORCH = "aengusl/spawrious spawrious/torch.py @ fb24635ce900d63ec54b8dc5b87a1ad3778253dc"
SPAWRIOUS_URLS = {
    "entire_dataset": "https://www.dropbox.com/s/hofkueo8qvaqlp3/spawrious224__entire_dataset.tar.gz?dl=1",
    "o2o_easy": "https://www.dropbox.com/s/kwhiv60ihxe3owy/spawrious224__o2o_easy.tar.gz?dl=1",
    "o2o_medium": "https://www.dropbox.com/s/x03gkhdwar5kht4/spawrious224__o2o_medium.tar.gz?dl=1",
    "o2o_hard": "https://www.dropbox.com/s/p1ry121m2gjj158/spawrious224__o2o_hard.tar.gz?dl=1",
}
CELEBA_CHECKSUMS = "torchvision.datasets.CelebA.file_list (torchvision 0.29.1)"
CELEBA_STEPS = (
    "CelebA's official files are on Google Drive (linked from https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html), "
    "which has no plain download URL to resume and verify, so fetch these three files yourself:",
    "  Img/img_align_celeba.zip, Anno/list_attr_celeba.txt, Eval/list_eval_partition.txt",
    "  (or let torchvision do it: pip install gdown; python -c \"from torchvision.datasets import CelebA; "
    "CelebA('DIR', download=True)\" makes DIR/celeba/, which bench reads as it is: --data-root DIR),",
    "put them into the downloads folder named below and run the same command again: it checks their MD5 "
    f"({CELEBA_CHECKSUMS}), unpacks them into DIR/celeba/ and runs bench data check celeba.",
)
URBANCARS_SOURCE = ("facebookresearch/Whac-A-Mole scripts/prepare_dataset_models/create_urbancars.sh "
                    "@ 10946249d30ff0226775bc10b7e31429c279ed3e")
URBANCARS_STEPS = (
    "UrbanCars is not distributed as images: it is generated from Stanford Cars, LVIS/COCO objects and "
    f"Places365 backgrounds by the Whac-A-Mole scripts ({URBANCARS_SOURCE}):",
    "  1. git clone https://github.com/facebookresearch/Whac-A-Mole && cd Whac-A-Mole && "
    "pip install -r requirements.txt (it installs detectron2 and CLIP from GitHub)",
    "  2. bash scripts/prepare_dataset_models/create_urbancars.sh: it downloads Stanford Cars, the MaskFormer "
    "weights (and clones MaskFormer over SSH: use https://github.com/facebookresearch/MaskFormer.git without "
    "SSH keys), predicts the car masks, downloads LVIS annotations, COCO train2017/val2017 and Places365-standard "
    "(small images), then runs create_datasets/urbancars/gen_urbancars.py for train, val and test",
    "     (the script downloads Places to data/places365standard_easyformat.tar but unpacks "
    "data/places/places365standard_easyformat.tar: move the file there first)",
    "  3. the result is data/urbancars/ with bg-0.95_co_occur_obj-0.95/train and bg-0.5_co_occur_obj-0.5/{val,test}, "
    "8 group folders each: pass --data-root Whac-A-Mole/data, or move urbancars/ into your data root",
    "  4. bench data check urbancars --data-root DIR compares the 8 groups' counts with the generator's "
    "(3610/190/190/10 per class in train, 125 per group in val and test) and decodes every image",
)


def _spawrious(challenge: str) -> Release:
    kind = challenge.split("_")[0]
    archive = challenge if kind == "o2o" else "entire_dataset"
    return Release(
        dataset=f"spawrious-{challenge.replace('_', '-')}",
        files=(ReleaseFile(f"spawrious224__{archive}.tar.gz", SPAWRIOUS_URLS[archive], "."),),
        target="spawrious224",
        origin=SPAWRIOUS_TORCH + (" (the many-to-many challenges read the entire dataset there)"
                                  if kind == "m2m" else ""),
        checksum_origin="none published; gzip's CRC while unpacking, then bench data check",
        shared=True,
    )


RELEASES: dict[str, Release] = {
    release.dataset: release
    for release in (
        Release(
            dataset="waterbirds",
            files=(ReleaseFile("waterbird_complete95_forest2water2.tar.gz",
                               "https://nlp.stanford.edu/data/dro/waterbird_complete95_forest2water2.tar.gz", "."),),
            target="waterbird_complete95_forest2water2",
            origin=GROUP_DRO_README,
            checksum_origin="none published (nor by WILDS); gzip's CRC while unpacking, then bench data check",
        ),
        Release(
            dataset="celeba",
            files=(
                ReleaseFile("img_align_celeba.zip", None, "celeba", md5="00d2c5bc6d35e252742224ab0c1e8fcb"),
                ReleaseFile("list_attr_celeba.txt", None, "celeba/list_attr_celeba.txt",
                            md5="75e246fa4810816ffd6ee81facbd244c"),
                ReleaseFile("list_eval_partition.txt", None, "celeba/list_eval_partition.txt",
                            md5="d32c9cbf5e040fd4025c592c306e6668"),
            ),
            target="celeba",
            origin="https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html (Google Drive)",
            checksum_origin=CELEBA_CHECKSUMS,
            manual_steps=CELEBA_STEPS,
        ),
        *(_spawrious(f"{kind}_{level}") for kind in ("o2o", "m2m") for level in ("easy", "medium", "hard")),
    )
}


def release_for(dataset: str) -> Release | None:
    """The release of a downloadable dataset; None for the others (twins, custom, UrbanCars)."""
    return RELEASES.get(dataset)
