"""tools/pack_shards.py: ImageFolder -> WebDataset shards in timm's layout, resumable, verifying every image."""
import io
import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest
from PIL import Image
from torchvision.datasets import ImageFolder

from conftest import assert_one_line_error
from imagefolder import make_imagefolder, make_imagenet_as_downloaded
from tools import pack_shards
from tools.pack_shards import INFO, SKIPPED, pack_folder

TINY = ((32, 24), (40, 32), (24, 36))
SHARD = '8KB'  # two or three tiny images per shard: several shards from a dozen images


def quiet(_line):
    pass


def members(dst: Path, filenames):
    """(key, {extension: bytes}) of every sample, in shard order."""
    samples = []
    for filename in filenames:
        with tarfile.open(dst / filename) as tar:
            for member in tar:
                key, extension = member.name.split('.', 1)
                if not samples or samples[-1][0] != key:
                    samples.append((key, {}))
                samples[-1][1][extension] = tar.extractfile(member).read()
    return samples


def shard_files(dst: Path):
    return {p.name: p.read_bytes() for p in sorted(dst.glob('*.tar'))}


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    return make_imagefolder(tmp_path_factory.mktemp('src') / 'tiny', num_classes=3, train_per_class=4,
                            val_per_class=2, sizes=TINY)


def test_shards_hold_the_imagefolder_order_its_labels_and_the_file_bytes(folder, tmp_path):
    dst = tmp_path / 'shards'
    info = pack_folder(str(folder), str(dst), shard_size=pack_shards.parse_size(SHARD), log=quiet)
    assert json.loads((dst / INFO).read_text()) == info
    assert info['classes'] == ['class_0', 'class_1', 'class_2'] and info['num_classes'] == 3
    for split, folder_name in (('train', 'train'), ('validation', 'val')):
        expected = ImageFolder(str(folder / folder_name)).samples
        entry = info['splits'][split]
        assert entry['name'] == split and entry['num_samples'] == len(expected) == sum(entry['shard_lengths'])
        assert len(entry['filenames']) > 1 and entry['filenames'][0] == f'tiny-{split}-000000.tar'
        samples = members(dst, entry['filenames'])
        assert [key for key, _ in samples] == [f'{i:08d}' for i in range(len(expected))]
        for (key, m), (path, label) in zip(samples, expected):
            assert int(m['cls']) == label and m['jpg'] == Path(path).read_bytes()
            assert json.loads(m['json']) == {'filename': os.path.relpath(path, folder / folder_name)}
    assert (dst / SKIPPED).read_text() == ''

    # timm's own WebDataset reader takes the layout: the same labels in the same order
    from timm.data import create_dataset
    timm_val = create_dataset('wds/tiny', root=str(dst), split='validation', is_training=False)
    assert [label for _, label in timm_val] == [label for _, label in ImageFolder(str(folder / 'val')).samples]


def test_imagenet_flat_val_is_packed_with_the_labels_of_its_ground_truth_file(tmp_path):
    src = tmp_path / 'imagenet'
    truth = make_imagenet_as_downloaded(src, 'LOC_val_solution.csv', num_classes=3, train_per_class=1,
                                        val_per_class=2)
    info = pack_folder(str(src), str(tmp_path / 'shards'), log=quiet)
    wnids = info['classes']
    samples = members(tmp_path / 'shards', info['splits']['validation']['filenames'])
    packed = {json.loads(m['json'])['filename']: wnids[int(m['cls'])] for _, m in samples}
    assert packed == truth and [json.loads(m['json'])['filename'] for _, m in samples] == sorted(truth)


def test_an_interrupted_packing_resumes_keeps_finished_shards_and_ends_identical(folder, tmp_path, monkeypatch):
    reference = tmp_path / 'reference'
    info = pack_folder(str(folder), str(reference), shard_size=pack_shards.parse_size(SHARD), workers=2, log=quiet)
    lengths = info['splits']['train']['shard_lengths']
    assert lengths[2] >= 2
    killed_at = sum(lengths[:2]) + 2  # the second image of the third shard: two shards done, one partial

    dst = tmp_path / 'interrupted'
    encode, calls = pack_shards.encode_image, []

    def killed_in_the_third_shard(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == killed_at:
            raise KeyboardInterrupt
        return encode(*args, **kwargs)

    monkeypatch.setattr(pack_shards, 'encode_image', killed_in_the_third_shard)
    with pytest.raises(KeyboardInterrupt):
        pack_folder(str(folder), str(dst), shard_size=pack_shards.parse_size(SHARD), log=quiet)
    monkeypatch.undo()
    assert not (dst / INFO).exists() and list(dst.glob('.*.partial'))
    finished = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in dst.glob('*.tar')}
    assert len(finished) == 2 and set(finished) < set(shard_files(reference))

    lines = []
    pack_folder(str(folder), str(dst), shard_size=pack_shards.parse_size(SHARD), log=lines.append)
    assert any('already written, resuming' in line for line in lines)
    assert {name: (dst / name).stat().st_ino for name in finished} == {n: v[0] for n, v in finished.items()}
    assert {name: (dst / name).stat().st_mtime_ns for name in finished} == {n: v[1] for n, v in finished.items()}
    assert shard_files(dst) == shard_files(reference) and not list(dst.glob('.*.partial'))
    assert (dst / INFO).read_bytes() == (reference / INFO).read_bytes()


def test_undecodable_images_are_skipped_and_listed(tmp_path):
    src = make_imagefolder(tmp_path / 'src', num_classes=2, train_per_class=3, val_per_class=1, sizes=TINY)
    truncated = src / 'train' / 'class_0' / '0001.jpg'
    truncated.write_bytes(truncated.read_bytes()[:200])
    not_an_image = src / 'train' / 'class_1' / '0000.jpg'
    not_an_image.write_text('not a jpeg')
    info = pack_folder(str(src), str(tmp_path / 'shards'), log=quiet)
    assert info['splits']['train']['num_samples'] == 4
    keys = [key for key, _ in members(tmp_path / 'shards', info['splits']['train']['filenames'])]
    assert keys == ['00000000', '00000002', '00000004', '00000005']  # ImageFolder's indices, 1 and 3 missing
    listed = [line.split('\t') for line in (tmp_path / 'shards' / SKIPPED).read_text().splitlines()]
    assert [(split, path) for split, path, _ in listed] == [('train', str(truncated)), ('train', str(not_an_image))]
    assert all(reason for _, _, reason in listed)


def test_max_side_reencodes_larger_images_and_keeps_smaller_ones(tmp_path):
    src = make_imagefolder(tmp_path / 'src', num_classes=2, train_per_class=3, val_per_class=1,
                           sizes=((90, 60), (30, 20)))
    info = pack_folder(str(src), str(tmp_path / 'shards'), max_side=40, quality=80, log=quiet)
    samples = members(tmp_path / 'shards', info['splits']['train']['filenames'])
    expected = ImageFolder(str(src / 'train')).samples
    for (_, m), (path, _) in zip(samples, expected):
        source_size = Image.open(path).size
        stored = Image.open(io.BytesIO(m['jpg']))
        if max(source_size) > 40:
            assert stored.size == (40, round(40 * source_size[1] / source_size[0])), (source_size, stored.size)
        else:
            assert m['jpg'] == Path(path).read_bytes()
    assert len(samples) == len(expected) and any(max(Image.open(p).size) > 40 for p, _ in expected)


def test_pack_mistakes_are_one_line_errors(folder, tmp_path, capsys):
    def pack(*args):
        code = pack_shards.cli([str(folder), *map(str, args), '--workers', '0'])
        return subprocess.CompletedProcess(args, code, *capsys.readouterr())

    foreign = tmp_path / 'foreign'
    foreign.mkdir()
    (foreign / 'notes.txt').write_text('mine')
    assert_one_line_error(pack(foreign), str(foreign), 'not empty')
    assert_one_line_error(pack(folder / 'train' / 'shards'), 'inside the source')

    dst = tmp_path / 'shards'
    assert pack(dst, '--shard-size', SHARD).returncode == 0
    assert_one_line_error(pack(dst, '--shard-size', SHARD, '--max-side', '16'), 'max_side', 'same source and options')
    with pytest.raises(SystemExit) as exit_:
        pack(dst, '--shard-size', 'huge')
    assert exit_.value.code == 2 and 'is not a size' in capsys.readouterr().err
