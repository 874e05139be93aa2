"""``bench data download``: against a local HTTP server on 127.0.0.1 serving small archives in the
published formats (a Waterbirds tarball, CelebA's zip and text files, Spawrious tarballs).

The server (Python's http.server in a thread) answers HTTP Range requests the way a file server
does, can cut a response short (an interrupted download) and can ignore Range (a server without
resume support). Nothing leaves the machine.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import io
import json
import re
import shutil
import socket
import tarfile
import threading
import zipfile
from pathlib import Path

import pytest
from test_real_datasets import write_celeba, write_spawrious, write_waterbirds

import datasets.celeba as celeba_module
import datasets.waterbirds as waterbirds_module
from bench.cli import main
from bench.download import releases
from bench.download.fetch import download
from bench.download.install import MARKER, STAGING_PREFIX
from datasets import get_dataset
from datasets.spawrious import SpawriousChallenge

WATERBIRDS_COUNTS = {"train": [4, 2, 2, 4], "val": [2, 2, 2, 2], "test": [2, 2, 2, 2]}
CELEBA_COUNTS = {"train": [5, 4, 3, 2], "val": [2, 2, 2, 1], "test": [2, 2, 1, 1]}


class FileServer:
    """Serves ``files[name]`` at ``/name``; ``cut[name]``: bytes sent before the connection is dropped
    (once); ``no_range``: names served whole whatever the Range header. Records every request."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.cut: dict[str, int] = {}
        self.no_range: set[str] = set()
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 (the http.server hook)
                name = self.path.lstrip("/").split("?")[0]
                requested = self.headers.get("Range")
                server.requests.append((name, requested))
                if name not in server.files:
                    self.send_error(404)
                    return
                data = server.files[name]
                start = 0
                match = re.fullmatch(r"bytes=(\d+)-", requested or "")
                if match and name not in server.no_range:
                    start = int(match.group(1))
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if name in server.cut:
                    self.wfile.write(body[: server.cut.pop(name)])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def server():  # type: ignore[no-untyped-def]
    running = FileServer()
    yield running
    running.close()


def tar_gz(folder: Path, arcname: str) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(folder, arcname=arcname)
    return buffer.getvalue()


@pytest.fixture()
def waterbirds_archive(tmp_path: Path, monkeypatch) -> bytes:  # type: ignore[no-untyped-def]
    # The check compares with the published counts: the miniature's own counts stand in for them.
    monkeypatch.setattr(waterbirds_module, "PUBLISHED_COUNTS", WATERBIRDS_COUNTS)
    made = write_waterbirds(tmp_path / "made", WATERBIRDS_COUNTS)
    return tar_gz(made, "waterbird_complete95_forest2water2")


def _download(root: Path, name: str, *extra: str) -> list[str]:
    return ["data", "download", name, "--data-root", str(root), "--quiet", *extra]


def _one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def _nothing_half_extracted(root: Path) -> None:
    assert not list(root.glob(f"{STAGING_PREFIX}*")), "a staging folder was left behind"


def test_interrupted_download_resumes_and_ends_with_the_check(tmp_path, server, waterbirds_archive, capsys):
    name = "waterbird_complete95_forest2water2.tar.gz"
    server.files[name] = waterbirds_archive
    server.cut[name] = len(waterbirds_archive) // 3
    root = tmp_path / "data"
    assert main(_download(root, "waterbirds", "--mirror", server.url)) == 2
    error = _one_line_error(capsys.readouterr().err)
    assert "interrupted after" in error and "rerun the same command to resume" in error
    part = root / ".bench-downloads" / f"{name}.part"
    assert part.stat().st_size == len(waterbirds_archive) // 3
    assert not (root / "waterbird_complete95_forest2water2").exists()

    assert main(_download(root, "waterbirds", "--mirror", server.url)) == 0
    out = capsys.readouterr().out
    assert server.requests[-1] == (name, f"bytes={len(waterbirds_archive) // 3}-")  # resumed, not restarted
    assert "no published checksum" in out and "Group counts match the published counts." in out
    folder = root / "waterbird_complete95_forest2water2"
    assert get_dataset("waterbirds").locate(root) == folder  # exactly the layout the loader reads
    marker = json.loads((folder / MARKER).read_text())
    assert marker["files"][name]["sha256"] == hashlib.sha256(waterbirds_archive).hexdigest()
    assert not (root / ".bench-downloads").exists()  # the archive is deleted once unpacked (no --keep)
    _nothing_half_extracted(root)
    # Again: nothing is downloaded, the check runs.
    requests = len(server.requests)
    assert main(_download(root, "waterbirds", "--mirror", server.url)) == 0
    assert len(server.requests) == requests and "is already in" in capsys.readouterr().out


def test_a_server_without_range_support_is_read_from_the_start(tmp_path, server):
    data = bytes(range(256)) * 100
    server.files["blob.bin"] = data
    server.no_range.add("blob.bin")
    target = tmp_path / "blob.bin"
    (tmp_path / "blob.bin.part").write_bytes(data[:1000])
    download(f"{server.url}/blob.bin", target)
    assert target.read_bytes() == data and not (tmp_path / "blob.bin.part").exists()
    # A .part that is already whole (killed before its rename): the server answers 416, the file is kept.
    server.no_range.clear()
    other = tmp_path / "other.bin"
    (tmp_path / "other.bin.part").write_bytes(data)
    server.files["other.bin"] = data
    download(f"{server.url}/other.bin", other)
    assert other.read_bytes() == data


@pytest.mark.parametrize("damage", ["flipped", "truncated"])
def test_a_damaged_archive_is_refused_and_nothing_is_left(tmp_path, server, waterbirds_archive, capsys, damage):
    name = "waterbird_complete95_forest2water2.tar.gz"
    data = bytearray(waterbirds_archive)
    if damage == "flipped":
        middle = len(data) // 2
        data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    else:
        data = data[: len(data) - 200]
    server.files[name] = bytes(data)
    root = tmp_path / "data"
    assert main(_download(root, "waterbirds", "--mirror", server.url)) == 2
    error = _one_line_error(capsys.readouterr().err)
    assert f"{name} is damaged" in error and "rerun to download it again" in error
    assert not (root / ".bench-downloads" / name).exists()  # deleted: a rerun fetches it again
    assert not (root / "waterbird_complete95_forest2water2").exists()
    _nothing_half_extracted(root)


def test_an_archive_escaping_its_folder_is_refused(tmp_path, server, monkeypatch, capsys):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        info = tarfile.TarInfo("../escaped.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    server.files["waterbird_complete95_forest2water2.tar.gz"] = buffer.getvalue()
    root = tmp_path / "data"
    assert main(_download(root, "waterbirds", "--mirror", server.url)) == 2
    _one_line_error(capsys.readouterr().err)
    assert not (tmp_path / "escaped.txt").exists() and not (root / "escaped.txt").exists()
    _nothing_half_extracted(root)


def test_offline_says_what_it_tried_and_what_to_do(tmp_path, capsys):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    root = tmp_path / "data"
    assert main(_download(root, "spawrious-o2o-easy", "--mirror", f"http://127.0.0.1:{port}")) == 2
    error = _one_line_error(capsys.readouterr().err)
    assert f"cannot reach http://127.0.0.1:{port}/spawrious224__o2o_easy.tar.gz" in error
    assert "check the network" in error and ".bench-downloads" in error


def test_an_interruption_while_unpacking_leaves_nothing_behind(tmp_path, server, waterbirds_archive, monkeypatch):
    import bench.download.install as install_module

    server.files["waterbird_complete95_forest2water2.tar.gz"] = waterbirds_archive
    root = tmp_path / "data"
    (root / f"{STAGING_PREFIX}waterbirds-999999999").mkdir(parents=True)  # left by a killed run

    def killed(archive: Path, into: Path) -> None:
        (into / "waterbird_complete95_forest2water2").mkdir()
        (into / "waterbird_complete95_forest2water2" / "metadata.csv").write_text("half")
        raise KeyboardInterrupt

    monkeypatch.setattr(install_module, "unpack", killed)
    assert main(_download(root, "waterbirds", "--mirror", server.url)) == 130
    assert not (root / "waterbird_complete95_forest2water2").exists()
    _nothing_half_extracted(root)


def _celeba_files(tmp_path: Path, monkeypatch) -> dict[str, bytes]:  # type: ignore[no-untyped-def]
    """The three published files of a miniature CelebA, and the release's MD5s set to theirs."""
    monkeypatch.setattr(celeba_module, "PUBLISHED_COUNTS", CELEBA_COUNTS)
    made = write_celeba(tmp_path / "made", "txt", CELEBA_COUNTS)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zipped:
        for image in sorted((made / "img_align_celeba").iterdir()):
            zipped.write(image, f"img_align_celeba/{image.name}")
    files = {"img_align_celeba.zip": buffer.getvalue(),
             "list_attr_celeba.txt": (made / "list_attr_celeba.txt").read_bytes(),
             "list_eval_partition.txt": (made / "list_eval_partition.txt").read_bytes()}
    release = releases.RELEASES["celeba"]
    patched = tuple(dataclasses.replace(f, md5=hashlib.md5(files[f.name]).hexdigest()) for f in release.files)
    monkeypatch.setitem(releases.RELEASES, "celeba", dataclasses.replace(release, files=patched))
    return files


def test_celeba_has_no_plain_download_the_steps_then_the_files(tmp_path, monkeypatch, capsys):
    files = _celeba_files(tmp_path, monkeypatch)
    root = tmp_path / "data"
    assert main(_download(root, "celeba")) == 2
    printed = capsys.readouterr()
    assert "Google Drive" in printed.out and "img_align_celeba.zip" in _one_line_error(printed.err)
    for name, data in files.items():  # fetched by hand into the downloads folder
        (root / ".bench-downloads" / name).write_bytes(data)
    assert main(_download(root, "celeba", "--keep")) == 0
    out = capsys.readouterr().out
    assert out.count("MD5 as published") == 3 and "Group counts match the published counts." in out
    assert get_dataset("celeba").locate(root) == root / "celeba"
    assert (root / ".bench-downloads" / "img_align_celeba.zip").exists()  # --keep


def test_a_file_that_does_not_match_its_md5_is_refused(tmp_path, monkeypatch, capsys):
    files = _celeba_files(tmp_path, monkeypatch)
    root = tmp_path / "data"
    (root / ".bench-downloads").mkdir(parents=True)
    for name, data in files.items():
        (root / ".bench-downloads" / name).write_bytes(data)
    (root / ".bench-downloads" / "list_attr_celeba.txt").write_bytes(b"another version\n")
    assert main(_download(root, "celeba")) == 2
    error = _one_line_error(capsys.readouterr().err)
    assert "list_attr_celeba.txt: MD5" in error and "was deleted" in error
    assert not (root / ".bench-downloads" / "list_attr_celeba.txt").exists() and not (root / "celeba").exists()


def test_spawrious_challenges_share_one_folder(tmp_path, server, monkeypatch, capsys):
    monkeypatch.setattr(SpawriousChallenge, "published_counts", classmethod(lambda cls, options: None))
    easy = write_spawrious(tmp_path / "easy", per_folder=2, environments=("0", "1"))
    for env in ("0", "1"):  # O2O-easy does not read mountain; O2O-hard does (datasets.spawrious.COMBINATIONS)
        shutil.rmtree(easy / env / "mountain")
    hard = write_spawrious(tmp_path / "hard", per_folder=2, environments=("0", "1", "domain_adaptation_ds"))
    server.files["spawrious224__o2o_easy.tar.gz"] = tar_gz(easy, "spawrious224")
    server.files["spawrious224__o2o_hard.tar.gz"] = tar_gz(hard, "spawrious224")
    root = tmp_path / "data"
    assert main(_download(root, "spawrious-o2o-easy", "--mirror", server.url)) == 0
    assert main(_download(root, "spawrious-o2o-hard", "--mirror", server.url)) == 0
    folder = root / "spawrious224"
    assert set(json.loads((folder / MARKER).read_text())["files"]) == {"spawrious224__o2o_easy.tar.gz",
                                                                         "spawrious224__o2o_hard.tar.gz"}
    assert (folder / "domain_adaptation_ds").is_dir() and (folder / "0" / "desert").is_dir()
    _nothing_half_extracted(root)
    assert "All" in capsys.readouterr().out


def test_urbancars_twins_and_custom_are_not_downloaded(tmp_path, capsys):
    assert main(_download(tmp_path, "urbancars")) == 2
    printed = capsys.readouterr()
    assert "create_urbancars.sh" in printed.out and "gen_urbancars.py" in printed.out
    assert "generated, not downloaded" in _one_line_error(printed.err)
    assert main(_download(tmp_path, "waterbirds-synth")) == 2
    assert "built in" in _one_line_error(capsys.readouterr().err)
    assert main(_download(tmp_path, "custom")) == 2
    assert "no published files" in _one_line_error(capsys.readouterr().err)
    assert main(_download(tmp_path, "nope")) == 2
    assert "unknown dataset" in _one_line_error(capsys.readouterr().err)


@pytest.mark.parametrize("name", sorted(releases.RELEASES))
def test_every_release_unpacks_where_its_loader_looks(name: str) -> None:
    release = releases.RELEASES[name]
    source = get_dataset(name)
    assert release.target in source.folder_names  # locate() finds DATA_ROOT/<target>
    for file in release.files:
        assert file.url is None or file.url.startswith("https://")
        assert file.md5 is None or re.fullmatch(r"[0-9a-f]{32}", file.md5)
    assert release.origin and release.checksum_origin
    assert all(f.url for f in release.files) or release.manual_steps
