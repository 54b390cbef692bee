"""Datasets read from shards: WebDataset tars in timm's layout (--data-set WDS) and Hugging Face datasets on
disk (--data-set HF: save_to_disk's Arrow files, or a Parquet repository such as ILSVRC/imagenet-1k).

Both are map-style: sample i is found by index (shard, position in it), so the folder path's samplers
(repeated augmentation, --dist-eval's strided shards, the resumable order of samplers.py) work unchanged and
shards packed from a folder in its order give the folder's samples, index for index. Images stay the bytes
of their file until the pipeline's ``open_bytes`` decodes them (the fast data path included). A sample that
cannot be read (a corrupt member, a missing label, a shard cut short) raises one of the errors
datasets.RobustSamples skips and counts (or --strict-data fails on).

WDS is indexed by a walk of the tar headers (plain_tar_members; tarfile for pax or GNU long-name
headers) and read with os.pread rather than through webdataset's ``wids``: wids (a separate package since
webdataset 1.0) copies local shards into /tmp/_wids_cache unless given a local name, prints on every
construction, and asserts on a short shard instead of losing only its missing samples.
"""
import glob
import json
import os
import re
import resource
import tarfile
from collections import OrderedDict
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import yaml
from PIL import UnidentifiedImageError
from torch.utils.data import Dataset

from utils import UserError

INFO_FILES = ('_info.json', '_info.yaml', 'info.json')  # timm's names for a shard set's description
SPLIT_NAMES = {True: ('train',), False: ('validation', 'val')}  # timm's split names first
IMAGE_MEMBERS = ('jpg', 'jpeg', 'png', 'webp')
LABEL_MEMBERS = ('cls', 'json')  # .cls: the class index as text; .json: a "label" (or "cls") field
# Descriptors a process leaves for everything but shards (its libraries, the data loader's pipes); the
# rest of its limit of open files holds shards, least recently used closed first.
FILES_FOR_THE_REST = 256
MOST_OPEN_FILES = 1 << 16  # how far the soft limit of open files is raised, where the hard limit allows
PARQUET_ROW_GROUPS = 4  # decoded Parquet row groups each process keeps
# webdataset's sample key: the member's path up to the first dot of its base name; the rest is the extension.
MEMBER_NAME = re.compile(r'^((?:.*/|)[^.]+)[.]([^/]*)$')
TAR_BLOCK = 512
EMPTY_BLOCK = bytes(TAR_BLOCK)  # two of them end a tar archive


class ShardedDataset(Dataset):
    """Samples numbered across shards in shard order; ``shard_lengths`` (the units --shuffle blocks keeps
    together) and ``classes`` (the class names, or the labels as text where the data names none) as the
    subclasses find them."""

    def __init__(self, shard_names: Sequence[str], shard_lengths: Sequence[int], transform: Optional[Callable],
                 open_bytes: Callable[[bytes], Any]):
        self.shard_names = list(shard_names)
        self.shard_lengths = [int(n) for n in shard_lengths]
        self.starts = np.cumsum([0] + self.shard_lengths)
        self.transform = transform
        self.open_bytes = open_bytes
        self.classes: List[str] = []
        self.nb_classes = 0  # labels outside 0 .. nb_classes - 1 are refused as unreadable samples
        self._pid = None  # the process whose open files the caches hold (data-loader workers open their own)

    OPEN_STATE: Tuple[str, ...] = ()  # the attributes that hold this process's open files
    def __len__(self) -> int:
        return int(self.starts[-1])

    def locate(self, index: int) -> Tuple[int, int]:
        """(shard, position in the shard) of sample ``index``."""
        shard = int(np.searchsorted(self.starts, index, side='right')) - 1
        return shard, index - int(self.starts[shard])

    def sample_name(self, index: int) -> str:
        """What error messages call sample ``index``."""
        shard, position = self.locate(index)
        return f'{self.shard_names[shard]} sample {position}'

    def __getitem__(self, index: int):
        data, target = self.read(index)
        if not 0 <= target < self.nb_classes:
            raise ValueError(f'label {target} is not one of the {self.nb_classes} classes')
        try:
            image = self.open_bytes(data)
        except UnidentifiedImageError:  # PIL's words name the BytesIO object: a new name at every try
            raise UnidentifiedImageError('not an image file') from None
        return (self.transform(image) if self.transform else image), target

    def read(self, index: int) -> Tuple[bytes, int]:
        """The image file's bytes and the label of sample ``index``."""
        raise NotImplementedError

    def in_this_process(self) -> None:
        """Forget the open files of another process (the one this dataset was forked or unpickled from)."""
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self.forget_open_files()

    def forget_open_files(self) -> None:
        raise NotImplementedError

    def __getstate__(self):
        state = dict(self.__dict__)
        state['_pid'] = None  # what is open stays in this process: the new one opens its own
        state.update({name: OrderedDict() for name in self.OPEN_STATE})
        return state


# ---------------------------------------------------------------------------------------------
# WebDataset tars
# ---------------------------------------------------------------------------------------------

def read_info(folder: str) -> Optional[dict]:
    """The shard set's description (timm's _info.json / _info.yaml) in ``folder``, or None."""
    for name in INFO_FILES:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            try:
                with open(path) as f:
                    info = json.load(f) if name.endswith('.json') else yaml.safe_load(f)
            except (OSError, ValueError, yaml.YAMLError) as e:
                raise UserError(f'cannot read {path}: {e}: download or write it again') from None
            if not isinstance(info, dict) or not isinstance(info.get('splits'), dict):
                raise UserError(f'{path} has no "splits": it must describe the shards as timm\'s _info.json does')
            return info
    return None


def info_split(info: dict, is_train: bool, where: str) -> Tuple[str, dict]:
    """The train or validation split of an info file: (its name, its entry)."""
    for name in SPLIT_NAMES[is_train]:
        if name in info['splits']:
            split = info['splits'][name]
            if len(split.get('filenames', ())) != len(split.get('shard_lengths', ())):
                raise UserError(f'{where}: split {name} needs "filenames" and "shard_lengths" of the same length')
            return name, split
    raise UserError(f'{where} describes the splits {sorted(info["splits"])} and none of '
                    f'{" / ".join(SPLIT_NAMES[is_train])}: pack that split too')


def expand_pattern(pattern: str, is_train: bool) -> List[str]:
    """The shard files of a brace pattern naming the train shards (``imagenet-train-{000000..000146}.tar``);
    for validation, the files named as the pattern with 'train' read as 'validation' (timm's name) or 'val'
    and any shard numbers."""
    from webdataset.shardlists import expand_urls
    if is_train:
        return expand_urls(pattern)
    head, tail = os.path.split(pattern)
    if 'train' not in tail:
        raise UserError(f'--data-path {pattern}: a shard pattern must name the train shards (with "train" in '
                        f'the file names, read as "validation" or "val" for the validation split)')
    for name in SPLIT_NAMES[False]:
        named = re.sub(r'\{[^}]*\}', '*', tail.replace('train', name))
        files = sorted(glob.glob(os.path.join(glob.escape(head), named)))
        if files:
            return files
    raise UserError(f'no validation shards next to {pattern} (the same names with "validation" or "val" for '
                    f'"train"): pack or download the validation split')


def index_shard(fd: int) -> np.ndarray:
    """(image offset, image size, label offset, label size) of each sample of the tar shard open as ``fd``, in
    tar order, from the tar headers alone; -1 where the sample has no such member. A member the file ends
    inside is left out, with whatever follows it: a shard cut short keeps the samples before the cut.

    Read through the descriptor the samples are read with: on a network filesystem each open and stat of a
    path is a round trip to the server, so a shard costs one open per process."""
    file_size = os.fstat(fd).st_size
    try:
        return sample_index(plain_tar_members(fd, file_size), file_size)
    except NotPlainTar:
        return sample_index(tarfile_members(fd), file_size)


def sample_index(members: Iterator[Tuple[str, int, int, bool]], file_size: int) -> np.ndarray:
    """index_shard's table from (name, data offset, size, is a regular file) of each member."""
    samples: Dict[str, List[int]] = {}
    for name, offset, size, is_file in members:
        named = MEMBER_NAME.match(name)
        if offset + size > file_size:
            if named:
                samples.pop(named.group(1), None)  # the sample the file ends in
            break
        if not is_file or not named:
            continue
        key, extension = named.group(1), named.group(2).lower()
        entry = samples.setdefault(key, [-1, -1, -1, -1])
        if extension in IMAGE_MEMBERS and entry[0] < 0:
            entry[0:2] = offset, size
        elif extension in LABEL_MEMBERS and (entry[2] < 0 or extension == 'cls'):
            entry[2:4] = offset, size
    return np.array(list(samples.values()), dtype=np.int64).reshape(-1, 4)


class NotPlainTar(Exception):
    """A header that plain_tar_members leaves to tarfile (pax or GNU long-name records, base-256 sizes)."""


def plain_tar_members(fd: int, file_size: int) -> Iterator[Tuple[str, int, int, bool]]:
    """(name, data offset, size, is a regular file) of each member of a tar made of plain ustar headers, as
    webdataset's TarWriter writes short ASCII names (tools/pack_shards.py, timm's shards), read with one
    os.pread per header. By hand because an index through tarfile's walk costs several times more (its
    TarInfo objects; docs/performance.md), and under --shuffle global every data-loader worker indexes every
    shard; anything else is left to tarfile (NotPlainTar)."""
    offset = 0
    while True:
        header = os.pread(fd, TAR_BLOCK, offset)
        if len(header) < TAR_BLOCK or header == EMPTY_BLOCK or not tar_checksum_matches(header):
            if offset == 0:
                raise OSError('not a readable tar file (no tar header at its start)')
            return  # the end of the archive, a cut or garbage: the members before it are kept, as tarfile does
        kind = header[156:157]
        if kind not in (b'0', b'\0', b'5') or header[124] & 0x80:
            raise NotPlainTar
        try:
            size = int(header[124:136].split(b'\0', 1)[0].strip() or b'0', 8)
        except ValueError:
            if offset == 0:
                raise OSError('not a readable tar file (a header without size)') from None
            return
        name = header[:100].split(b'\0', 1)[0]
        prefix = header[345:500].split(b'\0', 1)[0] if header[257:263] == b'ustar\0' else b''
        name = (prefix + b'/' + name if prefix else name).decode('utf-8', 'surrogateescape')
        yield name, offset + TAR_BLOCK, size, kind != b'5'
        offset += TAR_BLOCK + -(-size // TAR_BLOCK) * TAR_BLOCK


def tar_checksum_matches(header: bytes) -> bool:
    """The header's checksum field against its bytes (the field itself counted as spaces), as tar defines it."""
    try:
        recorded = int(header[148:156].split(b'\0', 1)[0].strip() or b'-1', 8)
    except ValueError:
        return False
    return recorded == sum(header[:148]) + 8 * 32 + sum(header[156:])


def tarfile_members(fd: int) -> Iterator[Tuple[str, int, int, bool]]:
    """plain_tar_members for any tar, through tarfile."""
    with os.fdopen(os.dup(fd), 'rb') as file:  # a duplicate shares the open file: no new open
        file.seek(0)
        try:
            tar = tarfile.open(fileobj=file, mode='r:')
        except tarfile.ReadError as e:  # a header cut short or garbage where the file starts
            raise OSError(f'not a readable tar file ({e})') from None
        try:
            for member in tar:
                yield member.name, member.offset_data, member.size, member.isfile()
        except tarfile.ReadError:
            return  # a broken header after the first: the members before it are kept


def parse_label(data: bytes) -> int:
    """A .cls member (the class index as text) or a .json member's "label" (or "cls") field."""
    text = data.decode('utf-8').strip()
    if text.startswith('{'):
        fields = json.loads(text)
        label = fields.get('label', fields.get('cls'))
        if label is None:
            raise ValueError('no .cls label, and its .json has no "label" field')
        return int(label)
    return int(text)


class WdsDataset(ShardedDataset):
    """One split of a WebDataset shard set: tar shards of samples ``KEY.jpg`` (or .jpeg, .png, .webp) with
    ``KEY.cls`` (or ``KEY.json``) labels, as timm/imagenet-1k-wds and tools.pack_shards write them.

    Each process opens a shard when it first reads from it, indexes it from its tar headers and keeps the
    index; it keeps as many shards open as its limit of open files allows (shard_file_limit) and reads
    samples with os.pread (no seek to share).
    """

    def __init__(self, shards: Sequence[str], lengths: Sequence[int], transform, open_bytes,
                 indexes: Optional[Dict[int, np.ndarray]] = None):
        super().__init__(shards, lengths, transform, open_bytes)
        self._indexes: Dict[int, np.ndarray] = dict(indexes or {})
        self.forget_open_files()

    OPEN_STATE = ('_files',)

    def forget_open_files(self) -> None:
        self._files: 'OrderedDict[int, int]' = OrderedDict()
        self._most_files = shard_file_limit()

    def _file(self, shard: int) -> int:
        self.in_this_process()
        fd = self._files.get(shard)
        if fd is None:
            fd = os.open(self.shard_names[shard], os.O_RDONLY)
            self._files[shard] = fd
            if len(self._files) > self._most_files:
                os.close(self._files.popitem(last=False)[1])
        else:
            self._files.move_to_end(shard)
        return fd

    def read(self, index: int) -> Tuple[bytes, int]:
        shard, position = self.locate(index)
        fd = self._file(shard)
        if shard not in self._indexes:
            self._indexes[shard] = index_shard(fd)
        entries = self._indexes[shard]
        if position >= len(entries):
            raise OSError(f'the shard holds {len(entries)} samples, not {self.shard_lengths[shard]}: it was cut short '
                          f'or rewritten')
        image_at, image_size, label_at, label_size = (int(v) for v in entries[position])
        if image_at < 0:
            raise ValueError(f'no image member ({"/".join(IMAGE_MEMBERS)})')
        if label_at < 0:
            raise ValueError('no .cls or .json label')
        label = parse_label(os.pread(fd, label_size, label_at))
        data = os.pread(fd, image_size, image_at)
        if len(data) < image_size:
            raise OSError('the shard ends inside the image')
        return data, label

    def labels(self) -> List[int]:
        """Every sample's label, read from the shards (where no info file gives the class count)."""
        found = []
        for index in range(len(self)):
            try:
                found.append(self.read(index)[1])
            except (OSError, ValueError):
                pass  # counted when training reaches it
        return found


def shard_file_limit() -> int:
    """How many shards this process may keep open: its limit of open files, raised to the hard limit first
    (a soft limit of 1,024 is common; with every shard open, a worker opens each once, whatever the order),
    less FILES_FOR_THE_REST."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = MOST_OPEN_FILES if hard == resource.RLIM_INFINITY else min(hard, MOST_OPEN_FILES)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):
            pass  # the limit it has
    if soft == resource.RLIM_INFINITY:
        soft = MOST_OPEN_FILES
    return max(16, soft - FILES_FOR_THE_REST)


def build_wds(data_path: str, is_train: bool, transform, open_bytes,
              nb_classes: Optional[int]) -> Tuple[WdsDataset, int]:
    """The train or validation split of the shard set at ``data_path`` (a folder with an info file, or a
    brace pattern of the train shards) and its number of classes (``nb_classes``: --nb-classes, the count
    where neither an info file nor the labels give one)."""
    folder = data_path if os.path.isdir(data_path) else os.path.dirname(data_path)
    info = read_info(folder) or {}
    where = os.path.join(folder, '_info.json')
    if os.path.isdir(data_path):
        if not info:
            raise UserError(f'{data_path} has no {" / ".join(INFO_FILES)}: give the shards as a brace pattern '
                            f'instead, e.g. --data-path "{data_path}/NAME-train-{{000000..000099}}.tar"')
        name, split = info_split(info, is_train, where)
        shards = [os.path.join(folder, f) for f in split['filenames']]
        lengths = split['shard_lengths']
    elif info and not is_train:  # the validation split the info file describes
        name, split = info_split(info, is_train, where)
        shards = [os.path.join(folder, f) for f in split['filenames']]
        lengths = split['shard_lengths']
    else:
        shards = expand_pattern(data_path, is_train)
        known = {}
        if info:  # counts of the listed shards from the info file, as timm reads a pattern
            for entry in info['splits'].values():
                known.update(zip((os.path.join(folder, f) for f in entry.get('filenames', ())),
                                 entry.get('shard_lengths', ())))
        lengths = [known.get(path) for path in shards]
        name = 'train' if is_train else 'validation'
    check_shards_exist(shards, name)
    # without counts, every shard's headers are read now (and the index kept for this process)
    indexes = {i: index_shard_file(path) for i, path in enumerate(shards) if lengths[i] is None}
    lengths = [len(indexes[i]) if n is None else n for i, n in enumerate(lengths)]
    if sum(lengths) == 0:
        raise UserError(f'the {name} shards ({shards[0]} ...) hold no samples: check --data-path')
    dataset = WdsDataset(shards, lengths, transform, open_bytes, indexes)
    names, dataset.nb_classes = wds_classes(info, dataset, nb_classes)
    dataset.classes = names or [str(label) for label in range(dataset.nb_classes)]
    return dataset, dataset.nb_classes


def check_shards_exist(shards: Sequence[str], split: str) -> None:
    """One access() per shard (a round trip each on a network filesystem); a closer look only at failures."""
    unreadable = [path for path in shards if not os.access(path, os.R_OK)]
    missing = [path for path in unreadable if not os.path.isfile(path)]
    if missing:
        raise UserError(f'{len(missing)} of the {len(shards)} {split} shards are missing, e.g. {missing[0]}: '
                        f'download them (again) or fix --data-path')
    if unreadable:
        raise UserError(f'cannot read {len(unreadable)} {split} shards, e.g. {unreadable[0]}: check their permissions')


def index_shard_file(path: str) -> np.ndarray:
    """The index of a shard read at start-up (where no info file gives the counts); an unreadable one refused."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            return index_shard(fd)
        finally:
            os.close(fd)
    except OSError as e:
        raise UserError(f'cannot read shard {path}: {e}') from None


def wds_classes(info: dict, dataset: WdsDataset, nb_classes: Optional[int]) -> Tuple[Optional[List[str]], int]:
    """Class names (or None) and class count: from the info file, else --nb-classes, else the labels."""
    names = info.get('classes')
    if names:
        return list(names), int(info.get('num_classes', len(names)))
    if info.get('num_classes'):
        return None, int(info['num_classes'])
    if nb_classes:
        return None, nb_classes
    print(f'counting the classes in the labels of {len(dataset.shard_names)} shards '
          f'(an info file with "num_classes", or --nb-classes, saves this)')
    labels = dataset.labels()
    return None, max(labels) + 1 if labels else 0


# ---------------------------------------------------------------------------------------------
# Hugging Face datasets on disk
# ---------------------------------------------------------------------------------------------
# Read with pyarrow, the library `datasets` stores them with: `import datasets` names this project's
# datasets.py here, so the `datasets` package itself cannot be imported next to it.

def hf_split_files(root: str, is_train: bool) -> Tuple[str, List[str], str]:
    """(split name, its files, 'arrow' or 'parquet'): a DatasetDict saved with save_to_disk
    (``dataset_dict.json`` and one folder per split), or Parquet files named by split
    (``data/train-00000-of-00294.parquet`` as in ILSVRC/imagenet-1k, or ``train/0000.parquet``)."""
    names = SPLIT_NAMES[is_train]
    if os.path.isfile(os.path.join(root, 'dataset_dict.json')):
        for name in names:
            state = os.path.join(root, name, 'state.json')
            if os.path.isfile(state):
                with open(state) as f:
                    files = [os.path.join(root, name, entry['filename']) for entry in json.load(f)['_data_files']]
                return name, files, 'arrow'
        raise UserError(f'{root} (save_to_disk) has no {" / ".join(names)} split: save the DatasetDict with it')
    if os.path.isfile(os.path.join(root, 'state.json')):
        raise UserError(f'{root} holds a single Dataset: save a DatasetDict with train and validation splits '
                        f'(DatasetDict(train=..., validation=...).save_to_disk(...))')
    for name in names:
        files = sorted(set(glob.glob(os.path.join(root, '**', f'{name}-*.parquet'), recursive=True)
                           + glob.glob(os.path.join(root, '**', name, '*.parquet'), recursive=True)))
        if files:
            return name, files, 'parquet'
    raise UserError(f'{root} is neither a saved DatasetDict (dataset_dict.json) nor a Parquet repository with '
                    f'{" / ".join(names)} files (data/{names[0]}-*.parquet): point --data-path at one')


def class_names(features: dict) -> Optional[List[str]]:
    """The names of a ``label`` ClassLabel in a `datasets` features description, or None."""
    label = features.get('label') if isinstance(features, dict) else None
    if isinstance(label, dict) and label.get('_type') == 'ClassLabel' and label.get('names'):
        return list(label['names'])
    return None


class HfDataset(ShardedDataset):
    """One split of a Hugging Face dataset on disk with ``image`` ({bytes, path}) and ``label`` columns.

    Arrow files (save_to_disk) are memory-mapped, one shard each: any row is read without a copy.
    Parquet files are read a row group at a time (the shards are the row groups); each process keeps the
    last PARQUET_ROW_GROUPS decoded, so shuffled training over Parquet reads far more than it uses.
    """

    def __init__(self, files: Sequence[str], kind: str, shard_lengths: Sequence[int], shard_names: Sequence[str],
                 row_groups: Sequence[Tuple[int, int]], transform, open_bytes):
        super().__init__(shard_names, shard_lengths, transform, open_bytes)
        self.files, self.kind, self.row_groups = list(files), kind, list(row_groups)
        self.forget_open_files()

    OPEN_STATE = ('_tables',)

    def forget_open_files(self) -> None:
        self._tables: 'OrderedDict[int, Any]' = OrderedDict()

    def _rows(self, shard: int):
        """The image and label columns of a shard as a pyarrow table (memory-mapped for Arrow)."""
        import pyarrow as pa
        import pyarrow.parquet as pq
        self.in_this_process()
        table = self._tables.get(shard)
        if table is None:
            if self.kind == 'arrow':
                table = pa.ipc.open_stream(pa.memory_map(self.files[shard])).read_all()
            else:
                file, group = self.row_groups[shard]
                table = pq.ParquetFile(self.files[file]).read_row_group(group, columns=['image', 'label'])
                if len(self._tables) >= PARQUET_ROW_GROUPS:
                    self._tables.popitem(last=False)
            self._tables[shard] = table
        else:
            self._tables.move_to_end(shard)
        return table

    def read(self, index: int) -> Tuple[bytes, int]:
        shard, position = self.locate(index)
        rows = self._rows(shard)
        image, label = rows.column('image')[position].as_py(), rows.column('label')[position].as_py()
        if label is None or label < 0:
            raise ValueError('no label')
        data = image.get('bytes') if isinstance(image, dict) else None
        if data is None:
            path = image.get('path') if isinstance(image, dict) else None
            if not path:
                raise ValueError('no image bytes')
            with open(path, 'rb') as f:  # a dataset that refers to its image files
                data = f.read()
        return data, int(label)


def build_hf(data_path: str, is_train: bool, transform, open_bytes) -> Tuple[HfDataset, int]:
    """The train or validation split of the Hugging Face dataset saved or downloaded at ``data_path``, and
    its number of classes."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError('--data-set HF needs pyarrow: python -m pip install -r requirements.txt -c constraints.txt') \
            from None
    split, files, kind = hf_split_files(data_path, is_train)
    check_shards_exist(files, split)
    lengths, names, row_groups, schema = [], [], [], None
    try:
        for i, path in enumerate(files):
            if kind == 'arrow':
                reader = pa.ipc.open_stream(pa.memory_map(path))
                schema = reader.schema
                lengths.append(reader.read_all().num_rows)
                names.append(path)
                row_groups.append((i, 0))
            else:
                meta = pq.ParquetFile(path).metadata
                schema = meta.schema.to_arrow_schema()
                for group in range(meta.num_row_groups):
                    lengths.append(meta.row_group(group).num_rows)
                    names.append(f'{path} row group {group}')
                    row_groups.append((i, group))
    except (OSError, pa.ArrowException) as e:
        raise UserError(f'cannot read {path} of the {split} split: {e}') from None
    missing = {'image', 'label'} - set(schema.names)
    if missing:
        raise UserError(f'{files[0]} has no {" and ".join(sorted(missing))} column (it has {", ".join(schema.names)}): '
                        f'--data-set HF reads image classification datasets with "image" and "label" columns')
    dataset = HfDataset(files, kind, lengths, names, row_groups, transform, open_bytes)
    names = hf_class_names(data_path, split, kind, schema)
    dataset.nb_classes = len(names) if names else hf_class_count(dataset)
    dataset.classes = names or [str(label) for label in range(dataset.nb_classes)]
    return dataset, dataset.nb_classes


def hf_class_names(root: str, split: str, kind: str, schema) -> Optional[List[str]]:
    """The label's class names from the features `datasets` stored: dataset_info.json of save_to_disk,
    or the 'huggingface' metadata of Parquet files."""
    if kind == 'arrow':
        with open(os.path.join(root, split, 'dataset_info.json')) as f:
            return class_names(json.load(f).get('features', {}))
    metadata = json.loads((schema.metadata or {}).get(b'huggingface', b'{}'))
    return class_names(metadata.get('info', {}).get('features', {}))


def hf_class_count(dataset: HfDataset) -> int:
    """Where no class names were stored: the largest label plus one."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    import pyarrow as pa
    largest = -1
    for path in dataset.files:
        if dataset.kind == 'arrow':
            column = pa.ipc.open_stream(pa.memory_map(path)).read_all().column('label')
        else:
            column = pq.read_table(path, columns=['label']).column('label')
        largest = max(largest, pc.max(column).as_py() if len(column) else -1)
    return largest + 1
