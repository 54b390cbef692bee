"""The generated ImageFolders of imagefolder.py as a Hugging Face dataset on disk, in the layout `datasets`'
save_to_disk writes (``import datasets`` names the project's datasets.py here, so it is written with
pyarrow, as `datasets` itself writes it)."""
import json
from pathlib import Path

import pyarrow as pa
from torchvision.datasets import ImageFolder

SPLITS = {'train': 'train', 'validation': 'val'}  # HF split name -> folder


def hf_schema(classes) -> pa.Schema:
    """The columns `datasets` writes for an Image and a ClassLabel feature, the features in the metadata."""
    features = {'image': {'_type': 'Image'}, 'label': {'names': classes, '_type': 'ClassLabel'}}
    return pa.schema([('image', pa.struct([('bytes', pa.binary()), ('path', pa.string())])), ('label', pa.int64())],
                     metadata={'huggingface': json.dumps({'info': {'features': features}})})


def hf_table(samples, schema: pa.Schema) -> pa.Table:
    return pa.table({'image': [{'bytes': Path(path).read_bytes(), 'path': Path(path).name} for path, _ in samples],
                     'label': [label for _, label in samples]}, schema=schema)


def save_hf_parquet(folder: Path, dst: Path, rows_per_group: int = 10) -> Path:
    """``folder``'s train/ and val/ as a Parquet repository as ILSVRC/imagenet-1k has it
    (``data/{split}-0000N-of-0000M.parquet``), two files per split of ``rows_per_group`` row groups."""
    import pyarrow.parquet as pq
    (dst / 'data').mkdir(parents=True)
    for split, source in SPLITS.items():
        images = ImageFolder(str(folder / source))
        schema = hf_schema(images.classes)
        half = len(images.samples) // 2
        for n, part in enumerate((images.samples[:half], images.samples[half:])):
            pq.write_table(hf_table(part, schema), dst / 'data' / f'{split}-{n:05d}-of-00002.parquet',
                           row_group_size=rows_per_group)
    return dst


def save_hf(folder: Path, dst: Path, rows_per_file: int = 20) -> Path:
    """``folder``'s train/ and val/ as a DatasetDict: per split, Arrow stream files of ``rows_per_file`` rows
    with an ``image`` ({bytes, path}) and a ``label`` column, the ClassLabel names in dataset_info.json."""
    dst.mkdir(parents=True)
    for split, source in SPLITS.items():
        images = ImageFolder(str(folder / source))
        schema = hf_schema(images.classes)
        (dst / split).mkdir()
        names = []
        chunks = [images.samples[i:i + rows_per_file] for i in range(0, len(images.samples), rows_per_file)]
        for n, chunk in enumerate(chunks):
            name = f'data-{n:05d}-of-{len(chunks):05d}.arrow'
            with pa.OSFile(str(dst / split / name), 'wb') as sink, pa.ipc.new_stream(sink, schema) as writer:
                writer.write_table(hf_table(chunk, schema))
            names.append(name)
        features = json.loads(schema.metadata[b'huggingface'])['info']['features']
        (dst / split / 'dataset_info.json').write_text(json.dumps({'features': features}))
        (dst / split / 'state.json').write_text(json.dumps({'_data_files': [{'filename': n} for n in names],
                                                            '_split': split}))
    (dst / 'dataset_dict.json').write_text(json.dumps({'splits': list(SPLITS)}))
    return dst

