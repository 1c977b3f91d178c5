"""Reading untrusted adapter folders (vllm_pedro/adapter_io.py): every hostile kind of the
corpus refused with a message that names the problem, never its content; every way out of
an allowed root refused (file and folder symlinks, '..', hard links, a folder swapped for
a symlink between the check and the open); what was read comes with its digest."""

from __future__ import annotations

import os
import shutil

import pytest

from hostile_adapters import SERVING_KINDS, WEIGHTS, build_corpus
from vllm_pedro.adapter_io import adapter_dir_entry, load_adapter, read_adapter_files
from vllm_pedro.config import AdapterError, BaseShapes
from vllm_pedro.testing import build_random_adapter
from vllm_pedro.vllm.args import PedroArgs
from vllm_pedro.vllm.request import check_servable


@pytest.fixture(scope="module")
def valid(tmp_path_factory, tiny_llama_dir):
    return build_random_adapter(tiny_llama_dir, str(tmp_path_factory.mktemp("valid") / "a"), seed=3, r=4)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, valid):
    base = tmp_path_factory.mktemp("corpus")
    root, outside = str(base / "root"), str(base / "outside")
    return root, outside, build_corpus(valid, root, outside)


@pytest.fixture(scope="module")
def base_shapes(tiny_llama_dir):
    from transformers import AutoConfig

    return BaseShapes.from_hf_config(AutoConfig.from_pretrained(tiny_llama_dir))


def test_the_corpus_is_large_and_the_valid_adapter_passes(corpus, valid, base_shapes):
    root, _, cases = corpus
    assert len(cases) >= 46
    config, _ = load_adapter(valid, base_shapes, allowed_roots=[os.path.dirname(valid)])
    check_servable(config, PedroArgs())


def test_every_hostile_adapter_is_refused_naming_the_problem(corpus, base_shapes):
    root, _, cases = corpus
    serving = PedroArgs()
    for kind, (folder, words) in cases.items():
        with pytest.raises(AdapterError) as e:
            config, _ = load_adapter(folder, base_shapes, allowed_roots=[root])
            if kind in SERVING_KINDS:
                check_servable(config, serving)
        for w in words:
            assert w in str(e.value), (kind, w, str(e.value))
        assert "root:x:0:0" not in str(e.value), kind  # never quotes what it read


def test_a_config_symlinked_to_etc_passwd_is_never_opened(corpus, monkeypatch):
    root, _, cases = corpus
    import vllm_pedro.adapter_io as io

    opened = []
    real_open = os.open
    monkeypatch.setattr(io.os, "open", lambda p, *a, **k: (opened.append(p), real_open(p, *a, **k))[1])
    with pytest.raises(AdapterError, match="outside the allowed roots"):
        read_adapter_files(cases["symlink-config-etc-passwd"][0], allowed_roots=[root])
    assert "/etc/passwd" not in opened


def test_without_roots_symlinks_inside_are_followed(tmp_path, valid, base_shapes):
    """The operator's own --pedro-modules (no allowed roots): files may be symlinks, as in
    a Hugging Face cache snapshot; only the shape rules apply."""
    d = tmp_path / "snapshot"
    d.mkdir()
    for name in os.listdir(valid):
        os.symlink(os.path.join(valid, name), d / name)
    load_adapter(str(d), base_shapes)
    # ...and a symlink that stays inside an allowed root is fine too.
    load_adapter(str(d), base_shapes, allowed_roots=[str(tmp_path), os.path.dirname(valid)])


def test_a_folder_swapped_for_a_symlink_after_the_check_is_caught(tmp_path, valid, monkeypatch):
    """The race: the folder is checked, then replaced by a symlink to a folder outside the
    root before the files are opened. The real path of what was opened is checked again."""
    import vllm_pedro.adapter_io as io

    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    shutil.copytree(valid, root / "a")
    shutil.copytree(valid, outside)
    real_open = os.open
    swapped = []

    def open_after_swap(path, *args, **kwargs):
        if not swapped:
            os.rename(root / "a", root / "a.old")
            os.symlink(outside, root / "a")
            swapped.append(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(io.os, "open", open_after_swap)
    with pytest.raises(AdapterError, match="moved outside the allowed roots while being opened"):
        read_adapter_files(str(root / "a"), allowed_roots=[str(root)])
    assert swapped


def test_a_file_replaced_by_a_symlink_at_open_is_refused(tmp_path, valid, monkeypatch):
    """O_NOFOLLOW: a final component swapped for a symlink between realpath and open."""
    import vllm_pedro.adapter_io as io

    d = tmp_path / "a"
    shutil.copytree(valid, d)
    real_open = os.open

    def open_after_swap(path, *args, **kwargs):
        if path.endswith(WEIGHTS) and not os.path.islink(path):
            os.rename(path, path + ".old")
            os.symlink(path + ".old", path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(io.os, "open", open_after_swap)
    with pytest.raises(AdapterError, match="replaced by a symlink"):
        read_adapter_files(str(d))


def test_digest_is_of_the_bytes_read(tmp_path, valid):
    d = tmp_path / "a"
    shutil.copytree(valid, d)
    first = read_adapter_files(str(d)).digest
    assert read_adapter_files(str(d)).digest == first and len(first) == 64
    data = bytearray((d / WEIGHTS).read_bytes())
    data[-1] ^= 1  # one bit of one weight
    (d / WEIGHTS).write_bytes(bytes(data))
    assert read_adapter_files(str(d)).digest != first


def test_adapter_dir_entry_takes_one_path_segment(tmp_path, valid):
    root = tmp_path / "tenants"
    root.mkdir()
    shutil.copytree(valid, root / "acme")
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", root / "escape")
    os.symlink(root / "acme", root / "alias")  # a symlink that stays inside is fine
    assert adapter_dir_entry(str(root), "acme") == os.path.join(os.path.realpath(root), "acme")
    assert adapter_dir_entry(str(root), "alias").endswith("alias")
    for bad in ("../acme", "a/b", "/etc", ".hidden", "..", ".", "", "a\0b", "x" * 300):
        with pytest.raises(AdapterError, match="not a tenant name"):
            adapter_dir_entry(str(root), bad)
    with pytest.raises(AdapterError, match="outside the adapter directory"):
        adapter_dir_entry(str(root), "escape")
    with pytest.raises(FileNotFoundError):
        adapter_dir_entry(str(root), "nobody")


def test_reading_refuses_a_weights_file_larger_than_its_shapes_allow(tmp_path, valid):
    d = tmp_path / "a"
    shutil.copytree(valid, d)
    with open(d / WEIGHTS, "ab") as f:
        f.write(b"\0" * (8 << 20))  # 8 MiB of padding: more than any tensor of r=4 needs
    with pytest.raises(AdapterError, match="more than the"):
        read_adapter_files(str(d))
