"""End-to-end runs of main.py on a generated JPEG ImageFolder (CPU, seconds each)."""
import json
import re
import signal
import subprocess
import sys
import time

import pytest
import timm
import torch

from conftest import FAST, REPO, run_cli

# A distilled DeiT of 6 blocks at 16 px (4x4 patches): steps several times cheaper than DeiT-Ti at 32 px.
STUDENT = ['--model', 'deit_micro_distilled_patch4_16', '--lr', '2e-3']
STUDENT_FAST = [*FAST, '--input-size', '16']


def read_log(output_dir):
    return [json.loads(line) for line in (output_dir / 'log.txt').read_text().splitlines()]


def printed_acc1(stdout):
    return float(re.findall(r'\* Acc@1 ([\d.]+)', stdout)[-1])


@pytest.fixture(scope='module')
def distilled_run(imagefolder, teacher_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp('student')
    run_cli('--data-path', imagefolder, *STUDENT, '--epochs', '2', '--distillation-type', 'hard',
            '--teacher-model', 'regnety_002', '--teacher-path', teacher_checkpoint, '--output_dir', out, *STUDENT_FAST)
    return out


def test_hard_distillation_run_writes_checkpoints_and_log(distilled_run):
    assert (distilled_run / 'checkpoint.pth').is_file() and (distilled_run / 'best_checkpoint.pth').is_file()
    log = read_log(distilled_run)
    assert [row['epoch'] for row in log] == [0, 1]
    for key in ('train_lr', 'train_loss', 'test_loss', 'test_acc1', 'test_acc5', 'epoch', 'n_parameters',
                'test_ema_acc1', 'test_acc1_cls', 'test_acc1_dist', 'test_acc1_both'):
        assert key in log[0], key
    checkpoint = torch.load(distilled_run / 'checkpoint.pth', weights_only=True)  # plain data only
    assert {'model', 'optimizer', 'lr_scheduler', 'epoch', 'model_ema', 'scaler', 'args', 'max_accuracy'} <= set(checkpoint)
    assert checkpoint['epoch'] == 1 and 'dist_token' in checkpoint['model'] and 'head_dist.weight' in checkpoint['model']
    assert checkpoint['max_accuracy'] == max(row['test_acc1'] for row in log)


def test_summary_csv_and_tensorboard_events(distilled_run):
    import csv
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    rows = list(csv.DictReader((distilled_run / 'summary.csv').open()))
    assert [int(row['epoch']) for row in rows] == [0, 1]
    assert float(rows[1]['test_acc1']) == pytest.approx(read_log(distilled_run)[1]['test_acc1'])
    events = EventAccumulator(str(distilled_run / 'tensorboard'))
    events.Reload()
    tags = set(events.Tags()['scalars'])
    assert {'train/loss', 'train/lr', 'train/images_per_sec', 'test/acc1', 'test/acc5', 'test/loss',
            'test/ema_acc1', 'test/acc1_dist'} <= tags, tags
    assert [e.step for e in events.Scalars('test/acc1')] == [0, 1]


def test_eval_resume_reproduces_the_logged_accuracy(distilled_run, imagefolder):
    proc = run_cli('--data-path', imagefolder, *STUDENT, '--eval', '--resume', distilled_run / 'checkpoint.pth',
                   *STUDENT_FAST)
    assert printed_acc1(proc.stdout) == pytest.approx(read_log(distilled_run)[-1]['test_acc1'], abs=1e-3)


def test_finetune_to_a_larger_input_size(distilled_run, imagefolder, tmp_path):
    proc = run_cli('--data-path', imagefolder, *STUDENT, '--finetune', distilled_run / 'checkpoint.pth',
                   '--epochs', '1', '--output_dir', tmp_path, *FAST, '--input-size', '24')
    assert 'Position embedding interpolated from 4x4 to 6x6' in proc.stdout
    assert len(read_log(tmp_path)) == 1
    assert torch.load(tmp_path / 'checkpoint.pth', weights_only=True)['model']['pos_embed'].shape == (1, 2 + 36, 192)


def test_resume_continues_at_the_next_epoch_with_the_same_learning_rate(imagefolder, tmp_path):
    common = ['--data-path', imagefolder, '--model', 'test_vit', '--epochs', '4', '--no-model-ema',
              *FAST, '--warmup-epochs', '1', '--cooldown-epochs', '1']
    reference = tmp_path / 'reference'
    run_cli(*common, '--output_dir', reference)
    assert [row['epoch'] for row in read_log(reference)] == [0, 1, 2, 3, 4]  # cooldown epoch really runs

    interrupted = tmp_path / 'interrupted'
    proc = subprocess.Popen([sys.executable, 'main.py', *map(str, common), '--output_dir', str(interrupted)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (interrupted / 'checkpoint.pth').exists():  # written atomically after epoch 0's log line
        assert time.time() < deadline and proc.poll() is None, 'the first epoch never finished'
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    done = torch.load(interrupted / 'checkpoint.pth', weights_only=True)['epoch']
    assert done < 4

    resumed = run_cli(*common, '--output_dir', interrupted, '--resume', interrupted / 'checkpoint.pth')
    assert f'Continuing at epoch {done + 1}' in resumed.stdout
    log = read_log(interrupted)
    assert [row['epoch'] for row in log] == [0, 1, 2, 3, 4]
    assert [row['train_lr'] for row in log] == pytest.approx([row['train_lr'] for row in read_log(reference)],
                                                             rel=1e-12)


def test_eval_head_reports_each_classifier_of_a_distilled_checkpoint(tmp_path):
    """Heads that ignore the image and always answer one class: cls -> 0, dist -> 1, their mean -> 2.

    On a validation split of 2 / 4 / 6 images per class they score 16.7%, 33.3% and 50%.
    """
    from imagefolder import make_imagefolder
    root = make_imagefolder(tmp_path / 'data', num_classes=3, train_per_class=2, val_per_class=6)
    for label, keep in ((0, 2), (1, 4)):
        for path in sorted((root / 'val' / f'class_{label}').iterdir())[keep:]:
            path.unlink()
    model = timm.create_model('deit_micro_distilled_patch4_16', num_classes=3)
    state = model.state_dict()
    for head, bias in (('head', [3.0, 0.0, 2.0]), ('head_dist', [0.0, 3.0, 2.0])):
        state[f'{head}.weight'].zero_()
        state[f'{head}.bias'].copy_(torch.tensor(bias))
    torch.save({'model': state}, tmp_path / 'heads.pth')

    printed = {}
    for head in ('cls', 'dist', 'both'):
        proc = run_cli('--data-path', root, *STUDENT, *STUDENT_FAST, '--eval', '--resume', tmp_path / 'heads.pth',
                       '--eval-head', head)
        printed[head] = printed_acc1(proc.stdout)
    assert printed == pytest.approx({'cls': 100 * 2 / 12, 'dist': 100 * 4 / 12, 'both': 100 * 6 / 12}, abs=1e-3)
    assert re.search(r'per head: cls 16.667  dist 33.333  both 50.000', proc.stdout)


def test_classic_distillation_trains_the_class_head_against_the_teacher(imagefolder, teacher_checkpoint, tmp_path,
                                                                       monkeypatch):
    """--no-distillation-token: the loss of each step is (1 - alpha) * base + alpha * tau^2 * KL between the
    class head's logits and the teacher's, on the same (mixed) images."""
    import losses
    steps = []
    forward = losses.DistillationLoss.forward

    def recorded(criterion, inputs, outputs, labels):
        loss = forward(criterion, inputs, outputs, labels)
        steps.append((criterion, inputs, outputs.detach(), labels, loss.item()))
        return loss
    monkeypatch.setattr(losses.DistillationLoss, 'forward', recorded)
    proc = run_cli('--data-path', imagefolder, '--model', 'test_vit', '--epochs', '1',
                   '--distillation-type', 'soft', '--no-distillation-token', '--teacher-model', 'regnety_002',
                   '--teacher-path', teacher_checkpoint, '--distillation-tau', '2', '--output_dir', tmp_path, *FAST)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [row['epoch'] for row in read_log(tmp_path)] == [0] and len(steps) == 6  # 72 images, batch 12
    criterion, inputs, outputs, labels, loss = steps[-1]
    assert isinstance(outputs, torch.Tensor) and outputs.shape == (12, 3)  # the one (class) head
    with torch.no_grad():
        teacher = criterion.teacher_model(inputs)
    kl = torch.nn.functional.kl_div((outputs / 2).log_softmax(1), (teacher / 2).log_softmax(1), reduction='sum',
                                    log_target=True) * 4 / outputs.numel()
    base = criterion.base_criterion(outputs, labels)
    assert kl > 0 and loss == pytest.approx((0.5 * base + 0.5 * kl).item(), rel=1e-5)
