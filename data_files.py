"""Image files on disk, found and opened without surprises: the class-folder walk skips links that loop
back up the tree or lead into another class (torchvision's walk follows them: wrong labels), and skips
anything that is not a regular file (a FIFO named like an image blocks open() forever); opening re-checks
the file without blocking, since it may have changed since the walk."""
import collections
import os
import stat
from typing import BinaryIO, Dict, List, Tuple

from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS, ImageFolder


def open_regular_file(path: str) -> BinaryIO:
    """``open(path, 'rb')`` for a regular file; an OSError, at once, for a FIFO, socket or device."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO without writer opens at once instead of blocking
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise OSError(f'not a regular file ({file_kind(mode)})')
        os.set_blocking(fd, True)
        return os.fdopen(fd, 'rb')
    except BaseException:
        os.close(fd)
        raise


def file_kind(mode: int) -> str:
    kinds = ((stat.S_ISFIFO, 'a FIFO'), (stat.S_ISSOCK, 'a socket'), (stat.S_ISCHR, 'a character device'),
             (stat.S_ISBLK, 'a block device'), (stat.S_ISDIR, 'a directory'))
    return next((name for test, name in kinds if test(mode)), 'not a regular file')


def load_rgb(path: str) -> Image.Image:
    """torchvision's default PIL loader, opening the file with open_regular_file."""
    with open_regular_file(path) as f:
        return Image.open(f).convert('RGB')


def is_within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def walk_class_folder(folder: str, split_root: str, skipped: Dict[str, List[str]]) -> List[str]:
    """The image files under ``folder`` (links followed), sorted as torchvision's walk sorts them.

    A linked directory is skipped, and recorded in ``skipped``, when it leads to a folder being walked (a
    loop: ``ln -s .. class0/loop``), to one already walked, or into another class of ``split_root``; a file
    that is not a regular file (checked with stat, through links) is skipped and recorded too.
    """
    split_real, files, visited = os.path.realpath(split_root), [], set()
    own_real = os.path.realpath(folder)
    for root, dirs, names in os.walk(folder, followlinks=True):  # top-down: the links are pruned before entered
        here = os.path.realpath(root)
        visited.add(here)
        for name in list(dirs):
            path = os.path.join(root, name)
            if not os.path.islink(path):
                continue
            target = os.path.realpath(path)
            if is_within(here, target) or target in visited:
                skipped['link(s) looping back up the tree'].append(path)
                dirs.remove(name)
            elif is_within(target, split_real) and not is_within(target, own_real):
                skipped['link(s) into another class folder'].append(path)
                dirs.remove(name)
        for name in sorted(names):
            path = os.path.join(root, name)
            if not name.lower().endswith(IMG_EXTENSIONS):
                continue
            try:
                mode = os.stat(path).st_mode
            except OSError:  # a dangling link
                skipped['dangling link(s)'].append(path)
                continue
            if stat.S_ISREG(mode):
                files.append((root, name))
            else:
                skipped[f'file(s) that are {file_kind(mode)}'].append(path)
    return [os.path.join(root, name) for root, name in sorted(files)]


class ClassFolders(ImageFolder):
    """torchvision's ImageFolder (one folder per class), its walk replaced by walk_class_folder; what was
    skipped is said once, in one warning line."""

    def make_dataset(self, directory: str, class_to_idx: Dict[str, int], extensions=None, is_valid_file=None,
                     allow_empty: bool = False) -> List[Tuple[str, int]]:
        skipped: Dict[str, List[str]] = collections.defaultdict(list)
        samples, empty = [], []
        for name in sorted(class_to_idx):
            folder = os.path.join(directory, name)
            if not os.path.isdir(folder):
                continue
            found = walk_class_folder(folder, directory, skipped)
            samples += [(path, class_to_idx[name]) for path in found]
            if not found:
                empty.append(name)
        if skipped:
            print(f'warning: {directory}: skipped ' + '; '.join(
                f'{len(paths)} {kind} (e.g. {paths[0]})' for kind, paths in skipped.items())
                + ': not read (labels come from the real class folders only); remove them to silence this warning')
        if empty and not allow_empty:
            raise FileNotFoundError(f'Found no valid file for the classes {", ".join(empty)}. ')
        return samples

