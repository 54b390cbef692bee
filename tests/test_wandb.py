"""--wandb: the epoch records of log.txt in an offline W&B run, continued by a resumed run."""
import json

import pytest
from conftest import FAST, assert_one_line_error, run_cli

import wandb_log

pytest.importorskip('wandb', reason='wandb is in requirements.txt; this guards only a partial install')

STUDENT = ['--model', 'test_vit', '--no-model-ema', *FAST]


def test_an_offline_wandb_run_holds_the_last_epochs_metrics_and_a_resumed_run_continues_it(imagefolder, tmp_path,
                                                                                            monkeypatch):
    monkeypatch.setenv('WANDB_MODE', 'offline')
    monkeypatch.setenv('WANDB_SILENT', 'true')
    # an offline run keeps its summary in its binary .wandb log (no reader ships with wandb): read it from
    # the run as it finishes
    summaries, finish = [], wandb_log.WandbLog.finish

    def finish_and_keep_summary(self, exit_code=None):
        summaries.append(dict(self.run.summary) if self.run is not None else None)
        finish(self, exit_code)

    monkeypatch.setattr(wandb_log.WandbLog, 'finish', finish_and_keep_summary)
    out = tmp_path / 'run'
    run_cli('--data-path', imagefolder, *STUDENT, '--epochs', 1, '--output_dir', out, '--wandb', 'deit-test')
    run_id = (out / 'wandb_run_id.txt').read_text().strip()
    run_cli('--data-path', imagefolder, *STUDENT, '--epochs', 2, '--output_dir', out, '--wandb', 'deit-test',
            '--resume', 'auto')
    assert (out / 'wandb_run_id.txt').read_text().strip() == run_id
    runs = sorted(path.name for path in (out / 'wandb').glob('offline-run-*'))
    assert len(runs) == 2 and all(name.endswith(f'-{run_id}') for name in runs)  # one W&B run, two sessions
    last = json.loads((out / 'log.txt').read_text().splitlines()[-1])
    assert len(summaries) == 2
    summary = summaries[-1]
    assert last['epoch'] == 1 and summary['epoch'] == 1
    for key in ('train_loss', 'test_acc1', 'test_loss', 'max_accuracy'):
        assert summary[key] == pytest.approx(last[key]), key


def test_wandb_without_the_package_is_one_clear_line(imagefolder, tmp_path, monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == 'wandb':
            raise ImportError('No module named wandb')
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, '__import__', no_wandb)
    proc = run_cli('--data-path', imagefolder, *STUDENT, '--epochs', 1, '--output_dir', tmp_path, '--wandb', 'p',
                   check=False)
    assert_one_line_error(proc, '--wandb needs the wandb package')
