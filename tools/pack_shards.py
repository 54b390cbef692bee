"""Pack an image folder into WebDataset shards in the layout of timm's published datasets.

    python -m tools.pack_shards SRC DST [--shard-size 1GB] [--max-side 320 --quality 90] [--workers N]

SRC is a dataset root holding train/ and/or val/ (what --data-set IMNET reads: val/ as class folders, or
ImageNet's flat download labelled by the devkit, torchvision's meta.bin or Kaggle's LOC_val_solution.csv), or
one tree of class folders (packed as --split). DST receives, per split (train/ -> train, val/ -> validation,
timm's split names):

  NAME-SPLIT-000000.tar ...  about --shard-size bytes each, in the order of torchvision's ImageFolder (the
                             order training from the folder sees): per image <key>.cls (its class index),
                             <key>.jpg (.png, .webp: the source's format) and <key>.json ({"filename": its path
                             under the split folder}); key = the image's 8-digit index in that order
  _info.json                 timm's split table (name, num_samples, filenames, shard_lengths) and the class
                             names; written last, atomically: it exists once the packing is complete
  _skipped.txt               one line per image that could not be decoded: split, path, reason
  _pack_state.json           the shards finished so far: rerunning an interrupted packing resumes there

Every image is decoded and converted to RGB, as the training loader does, before it is written. Unless
--max-side re-encodes it, the bytes written are the source file's, so training from the shards reads the
pixels training from the folder reads.
"""
import argparse
import functools
import io
import json
import multiprocessing
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import webdataset
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from datasets import check_same_classes, image_folder, imagenet_split  # noqa: E402
from utils import SaveError, UserError, write_text_atomic  # noqa: E402

INFO, SKIPPED, STATE = '_info.json', '_skipped.txt', '_pack_state.json'
SPLIT_FOLDERS = (('train', 'train'), ('val', 'validation'))  # folder -> timm's split name
KEPT_FORMATS = {'JPEG': 'jpg', 'MPO': 'jpg', 'PNG': 'png', 'WEBP': 'webp'}  # what the shard readers decode
TAR_BLOCK = 512
MTIME = 0  # a fixed member time: packing the same folder twice writes the same bytes


def parse_size(text: str) -> int:
    """'1GB', '500MB', '64KB' or a number of bytes (decimal units, as disks count)."""
    match = re.fullmatch(r'\s*([0-9.]+(?:e[0-9]+)?)\s*([kmgt]?)b?\s*', text.lower())
    if not match:
        raise argparse.ArgumentTypeError(f'{text!r} is not a size: write e.g. 1GB, 500MB or 1000000')
    number, unit = float(match.group(1)), match.group(2)
    size = int(number * 1000 ** ' kmgt'.index(unit or ' '))
    if size <= 0:
        raise argparse.ArgumentTypeError(f'{text!r}: the shard size must be positive')
    return size


# ---------------------------------------------------------------------------------------------
# One image: read, decode (the check), optionally re-encode smaller
# ---------------------------------------------------------------------------------------------

@dataclass
class Encoded:
    data: bytes = b''
    extension: str = ''
    error: str = ''  # why the image was skipped; empty when it was read


def encode_image(path: str, max_side: int = 0, quality: int = 90) -> Encoded:
    """The bytes to store for ``path``: the file itself when it decodes (and fits ``max_side``), else a
    JPEG re-encoded to ``max_side`` (``quality``); formats the readers do not take become PNG (lossless)."""
    try:
        with open(path, 'rb') as f:
            data = f.read()
        with Image.open(io.BytesIO(data)) as img:
            rgb = img.convert('RGB')  # decodes everything: what the training loader does
            if max_side and max(rgb.size) > max_side:
                scale = max_side / max(rgb.size)
                size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
                rgb = rgb.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
                return Encoded(save(rgb, 'JPEG', quality=quality), 'jpg')
            if img.format not in KEPT_FORMATS:
                return Encoded(save(rgb, 'PNG'), 'png')
            return Encoded(data, KEPT_FORMATS[img.format])
    except Exception as e:  # a corrupt file can raise nearly anything from a PIL decoder: skip it, say why
        return Encoded(error=f'{type(e).__name__}: {e}'.splitlines()[0])


def save(img: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **options)
    return buffer.getvalue()


def member_bytes(size: int) -> int:
    """What one member takes in a tar: its header block and its data padded to whole blocks."""
    return TAR_BLOCK + -(-size // TAR_BLOCK) * TAR_BLOCK


# ---------------------------------------------------------------------------------------------
# What is packed, and what was packed before an interruption
# ---------------------------------------------------------------------------------------------

@dataclass
class Split:
    name: str  # timm's split name
    root: str  # the folder the file names are relative to
    samples: List[Tuple[str, int]]  # (path, class index) in ImageFolder's order


def find_splits(src: str, split: str) -> Tuple[List[Split], List[str]]:
    """The splits of ``src`` and the class names (train's), read by the code training reads them with."""
    if not os.path.isdir(src):
        raise UserError(f'{src} is not a directory: give the dataset root (train/, val/) or a tree of class folders')
    present = [(folder, name) for folder, name in SPLIT_FOLDERS if os.path.isdir(os.path.join(src, folder))]
    if not present:
        folder = image_folder(src, '', None, None)
        return [Split(split, folder.root, folder.samples)], list(folder.classes)
    folders = {name: imagenet_split(src, folder == 'train') for folder, name in present}
    if 'train' in folders and 'validation' in folders:
        check_same_classes(folders['train'], folders['validation'])
    classes = list(next(iter(folders.values())).classes)
    return [Split(name, f.root, f.samples) for name, f in folders.items()], classes


@dataclass
class Shard:
    filename: str
    first: int  # index of its first source image
    end: int  # index after its last source image
    samples: int
    bytes: int
    skipped: List[List[str]] = field(default_factory=list)  # [path, reason]


@dataclass
class PackState:
    """The options of a packing and the shards it has finished, saved after each one."""
    source: str
    name: str
    shard_size: int
    max_side: int
    quality: int
    classes: List[str]
    images: Dict[str, int]  # split -> images found in the source
    shards: Dict[str, List[Shard]] = field(default_factory=dict)

    def save(self, dst: str) -> None:
        write_text_atomic(os.path.join(dst, STATE), json.dumps(asdict(self), indent=1) + '\n')

    @classmethod
    def load(cls, dst: str) -> Optional['PackState']:
        path = os.path.join(dst, STATE)
        if not os.path.exists(path):
            return None
        try:
            with open(path) as f:
                state = json.load(f)
            state['shards'] = {split: [Shard(**s) for s in shards] for split, shards in state['shards'].items()}
            return cls(**state)
        except (ValueError, TypeError, KeyError) as e:
            raise UserError(f'{path} is damaged ({e}): delete DST and pack again') from None

    def check_resumable(self, wanted: 'PackState', dst: str) -> None:
        """The same source and options, or one line saying which differs."""
        for option in ('source', 'name', 'shard_size', 'max_side', 'quality', 'classes', 'images'):
            before, now = getattr(self, option), getattr(wanted, option)
            if before != now:
                shown = 'class folders' if option == 'classes' else 'image counts' if option == 'images' else option
                raise UserError(f'{dst} holds a packing of {self.source} with other {shown} ({short(before)}, now '
                                f'{short(now)}): rerun with the same source and options, or pack into an empty DST')


def short(value) -> str:
    text = str(value)
    return text if len(text) < 80 else text[:77] + '...'


def finished_shards(state: PackState, split: str, dst: str) -> List[Shard]:
    """The recorded shards of ``split`` that are intact on disk, up to the first that is not."""
    kept = []
    for shard in state.shards.get(split, []):
        path = os.path.join(dst, shard.filename)
        if not os.path.isfile(path) or os.path.getsize(path) != shard.bytes:
            break
        kept.append(shard)
    return kept


def shard_name(name: str, split: str, index: int) -> str:
    return f'{name}-{split}-{index:06d}.tar'


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------

class Progress:
    """A line every ``every`` seconds: images done, images/s, ETA."""

    def __init__(self, split: str, total: int, done: int, log: Callable[[str], None], every: float = 10.0):
        self.split, self.total, self.start_done, self.log, self.every = split, total, done, log, every
        self.start = self.last = time.monotonic()

    def update(self, done: int, shard: str) -> None:
        now = time.monotonic()
        if done < self.total and now - self.last < self.every:
            return
        self.last = now
        rate = (done - self.start_done) / max(now - self.start, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else float('inf')
        eta_text = time.strftime('%H:%M:%S', time.gmtime(eta)) if eta < 86400 * 365 else '?'
        where = f'ETA {eta_text}, writing {shard}' if done < self.total else 'done'
        self.log(f'pack {self.split}: {done:,}/{self.total:,} images ({100 * done / max(self.total, 1):.1f}%), '
                 f'{rate:.0f} images/s, {where}')


def encoded_images(paths: List[str], max_side: int, quality: int, workers: int) -> Iterator[Encoded]:
    """``encode_image`` of each path, in order; in ``workers`` processes when there is more than one."""
    encode = functools.partial(encode_image, max_side=max_side, quality=quality)
    if workers <= 1:
        yield from map(encode, paths)
        return
    with multiprocessing.Pool(workers) as pool:
        yield from pool.imap(encode, paths, chunksize=16)


class ShardFile:
    """One shard being written: under a temporary name until ``finish`` syncs and renames it."""

    def __init__(self, dst: str, filename: str, first: int):
        self.path = os.path.join(dst, filename)
        self.partial = os.path.join(dst, f'.{filename}.partial')
        self.file = open(self.partial, 'wb')
        self.writer = webdataset.TarWriter(self.file, encoder=False, mtime=MTIME)
        self.shard = Shard(filename, first, first, 0, 0)

    def add(self, index: int, label: int, filename: str, image: Encoded) -> None:
        members = {'cls': str(label).encode(), image.extension: image.data,
                   'json': json.dumps({'filename': filename}).encode()}
        self.writer.write({'__key__': f'{index:08d}', **members})
        self.shard.samples += 1
        self.shard.bytes += sum(member_bytes(len(data)) for data in members.values())

    def finish(self, end: int) -> Shard:
        self.writer.close()  # ends the archive (two zero blocks, padded to a tar record)
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.partial, self.path)
        self.shard.end = end
        self.shard.bytes = os.path.getsize(self.path)
        return self.shard


def pack_split(split: Split, dst: str, state: PackState, workers: int, log: Callable[[str], None]) -> None:
    """Write the shards of ``split`` after those ``state`` holds as finished, saving it after each one."""
    shards = state.shards.setdefault(split.name, [])
    start = shards[-1].end if shards else 0
    total = len(split.samples)
    if start:
        log(f'pack {split.name}: {len(shards)} shards ({start:,} images) already written, resuming')
    progress = Progress(split.name, total, start, log)
    paths = [path for path, _ in split.samples[start:]]
    current = None
    for index, image in enumerate(encoded_images(paths, state.max_side, state.quality, workers), start=start):
        path, label = split.samples[index]
        if current is None:
            current = ShardFile(dst, shard_name(state.name, split.name, len(shards)), index)
        if image.error:
            current.shard.skipped.append([path, image.error])
            log(f'pack {split.name}: skipped {path}: {image.error}')
        else:
            current.add(index, label, os.path.relpath(path, split.root), image)
        full = current.shard.bytes + 2 * TAR_BLOCK >= state.shard_size
        if full or index + 1 == total:
            shards.append(current.finish(index + 1))
            state.save(dst)
            current = None
        progress.update(index + 1, shard_name(state.name, split.name, len(shards)))


def remove_stale_shards(dst: str, state: PackState) -> None:
    """Partial shards and shards no finished record names: an interrupted packing's leftovers."""
    recorded = {s.filename for shards in state.shards.values() for s in shards}
    prefix = f'{state.name}-'
    for entry in os.scandir(dst):
        stale_shard = entry.name.startswith(prefix) and entry.name.endswith('.tar') and entry.name not in recorded
        if stale_shard or (entry.name.startswith(f'.{prefix}') and entry.name.endswith('.tar.partial')):
            os.remove(entry.path)


def split_info(shards: List[Shard], split: str) -> dict:
    """timm's entry for one split (timm.data.readers.reader_wds reads these keys)."""
    lengths = [s.samples for s in shards if s.samples]
    return {'name': split, 'num_samples': sum(lengths), 'filenames': [s.filename for s in shards if s.samples],
            'shard_lengths': lengths}


def prepare_dst(dst: str, src: str) -> None:
    """An empty (or new) folder, or one holding an earlier packing; never a folder inside the source."""
    dst_path, src_path = Path(dst).resolve(), Path(src).resolve()
    if dst_path == src_path or src_path in dst_path.parents:
        raise UserError(f'{dst} is inside the source {src}: write the shards somewhere else')
    try:
        os.makedirs(dst, exist_ok=True)
    except OSError as e:
        raise UserError(f'cannot create {dst}: {e.strerror}') from None
    if not os.path.exists(os.path.join(dst, STATE)) and any(os.scandir(dst)):
        raise UserError(f'{dst} is not empty and holds no packing ({STATE}): give an empty or new folder')


def pack_folder(src: str, dst: str, shard_size: int = 10 ** 9, max_side: int = 0, quality: int = 90,
                workers: int = 0, name: str = '', split: str = 'train',
                log: Callable[[str], None] = print) -> dict:
    """Pack ``src`` into shards under ``dst`` (see the module's docstring); returns what _info.json holds.

    Rerun on the same ``dst`` after an interruption, it keeps the finished shards and redoes the rest.
    """
    if max_side < 0 or not 1 <= quality <= 100:
        raise UserError(f'--max-side must be >= 0 and --quality within 1..100 (got {max_side}, {quality})')
    name = name or re.sub(r'[^A-Za-z0-9_.]+', '_', Path(src).resolve().name) or 'data'
    splits, classes = find_splits(src, split)
    prepare_dst(dst, src)
    wanted = PackState(str(Path(src).resolve()), name, shard_size, max_side, quality, classes,
                       {s.name: len(s.samples) for s in splits})
    state = PackState.load(dst)
    if state is None:
        state = wanted
    else:
        state.check_resumable(wanted, dst)
    state.shards = {s.name: finished_shards(state, s.name, dst) for s in splits}
    remove_stale_shards(dst, state)
    try:
        for s in splits:
            pack_split(s, dst, state, workers, log)
        info = {'name': name, 'num_classes': len(classes), 'classes': classes,
                'splits': {s.name: split_info(state.shards[s.name], s.name) for s in splits}}
        skipped = [f'{s.name}\t{path}\t{reason}\n' for s in splits for shard in state.shards[s.name]
                   for path, reason in shard.skipped]
        write_text_atomic(os.path.join(dst, SKIPPED), ''.join(skipped))
        write_text_atomic(os.path.join(dst, INFO), json.dumps(info, indent=1) + '\n')
    except OSError as e:
        raise SaveError(getattr(e, 'filename', None) or dst, e) from e
    for s in splits:
        entry = info['splits'][s.name]
        log(f'{s.name}: {entry["num_samples"]:,} images in {len(entry["filenames"])} shards'
            + (f', {len(s.samples) - entry["num_samples"]} skipped (listed in {os.path.join(dst, SKIPPED)})'
               if len(s.samples) != entry['num_samples'] else ''))
    return info


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser('python -m tools.pack_shards', description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('src', metavar='SRC', help='dataset root (train/, val/) or a tree of class folders')
    parser.add_argument('dst', metavar='DST', help='folder for the shards (new, empty, or an interrupted packing)')
    parser.add_argument('--shard-size', type=parse_size, default='1GB',
                        help='bytes per shard (1GB, 500MB, ...): few large files for a network filesystem')
    parser.add_argument('--max-side', type=int, default=0,
                        help='re-encode images whose longer side exceeds this many pixels as JPEG of that size '
                             '(0: keep every file as it is)')
    parser.add_argument('--quality', type=int, default=90, help='JPEG quality of the images --max-side re-encodes')
    parser.add_argument('--workers', type=int, default=min(8, os.cpu_count() or 1),
                        help='processes that read and decode the images')
    parser.add_argument('--name', default='', help="shard file prefix (default: SRC's folder name)")
    parser.add_argument('--split', default='train',
                        help='split name when SRC is one tree of class folders (no train/ or val/)')
    return parser


def cli(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        pack_folder(args.src, args.dst, args.shard_size, args.max_side, args.quality, args.workers, args.name,
                    args.split)
    except UserError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    except SaveError as e:
        print(f'error: {e}', file=sys.stderr)
        return 4
    except KeyboardInterrupt:
        print('interrupted: run the same command again to resume from the last finished shard', file=sys.stderr)
        return 130
    return 0


if __name__ == '__main__':
    sys.exit(cli())
