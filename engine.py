"""One training epoch and one evaluation pass."""
import contextlib
from dataclasses import dataclass
from typing import Optional

import torch
from timm.data import Mixup

from losses import Criterion
from real_labels import real_correct, split_targets
from seeding import Stream, seed_everything, stream_seed
from utils import (MetricLogger, RunError, UserError, agree_on_failure, all_reduce_max, all_reduce_sum,
                   count_over_ranks, failing_together, get_rank, get_world_size, print_error, raise_everywhere)


class NonFiniteLossError(RunError):
    """The training loss became NaN or infinite; the run must stop without saving (exit code 3)."""
    exit_code = 3


class DataWaitExpired(BaseException):
    """A stop signal came while the trainer waited for a batch, and the batch did not come in time (a data
    worker stuck in a read): raised out of the wait by checkpoint.StopSignals. A BaseException: no
    ``except Exception`` around a read swallows it."""


class UnreadableDataError(UserError):
    """An image could not be decoded and --strict-data asks to fail instead of skipping it."""


class FiniteLossGuard:
    """Remembers, on the device, the first step of an epoch whose loss was not finite, and a failure of
    this rank alone (an unreadable image with --strict-data) that must stop every rank.

    ``update`` is device work only (no host sync per step); ``check`` reads both back, as the whole
    job's, and is called where the host waits anyway: at progress lines, at the end of the epoch, before
    any checkpoint is written, and when a step's rank agreement says a rank failed.
    """
    NONE = 2 ** 62

    def __init__(self, epoch: int, device: torch.device):
        self.epoch = epoch
        self.first_bad = torch.tensor(self.NONE, device=device)
        self.failure: Optional[RunError] = None

    def update(self, loss: torch.Tensor, step: int) -> None:
        self.first_bad = torch.minimum(self.first_bad, torch.where(torch.isfinite(loss), self.NONE, step))

    def fail(self, error: RunError) -> None:
        """This rank cannot go on: alone, stop now; with other ranks, say so now and stop with them at
        the next check (the step in progress is complete, only no checkpoint will hold it)."""
        if get_world_size() == 1:
            raise error
        if self.failure is None:
            print_error(error)
            self.failure = error

    def check(self) -> None:
        """Raise if any rank failed or had a non-finite loss (a collective: every rank calls it after the
        same steps)."""
        step = int(-all_reduce_max(-self.first_bad))  # the first bad step over all ranks
        agree_on_failure(self.failure)
        if step != self.NONE:
            raise_everywhere(NonFiniteLossError(
                f'non-finite loss in epoch {self.epoch} at step {step}: lower --lr, set --clip-grad, or check '
                f'the data; no checkpoint holds its weights (--resume auto continues from the last finite one)'))


class LossScaler:
    """Backward, optional gradient clipping, optimizer step; fp16 loss scaling only when enabled.

    timm's NativeScaler always scales the loss; bf16 and fp32 need no scaling, so this wraps a
    GradScaler that is a pass-through when disabled.
    """
    def __init__(self, enabled: bool, device_type: str = 'cuda'):
        self._scaler = torch.amp.GradScaler(device_type, enabled=enabled)

    def __call__(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer,
                 clip_grad: Optional[float] = None, parameters=None, create_graph: bool = False,
                 need_update: bool = True) -> None:
        """Backward; then, if ``need_update`` (the last micro-batch of a step, as timm's NativeScaler),
        clip and step."""
        self._scaler.scale(loss).backward(create_graph=create_graph)
        if not need_update:
            return
        if clip_grad:
            self._scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            torch.nn.utils.clip_grad_norm_(parameters, clip_grad)
        self._scaler.step(optimizer)
        self._scaler.update()

    def state_dict(self) -> dict:
        return self._scaler.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the loss scale; a checkpoint trained without fp16 scaling (bf16, fp32, CPU) saved
        ``{}``, which GradScaler refuses: fp16 then starts from the initial scale, as a fresh run does."""
        if not state_dict:
            if self._scaler.is_enabled():
                print('note: the checkpoint has no fp16 loss-scale state (trained in bf16 or fp32): '
                      'the loss scale starts at its initial value')
            return
        self._scaler.load_state_dict(state_dict)


def autocast(device: torch.device, amp_dtype: Optional[torch.dtype]):
    """Mixed-precision context for ``device``, or a no-op when ``amp_dtype`` is None."""
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=amp_dtype)


def gradient_sync(model: torch.nn.Module, sync: bool):
    """DDP's all-reduce of the gradients only where ``sync`` (a step's last micro-batch): the earlier
    micro-batches accumulate locally under ``no_sync``. A no-op for a model without DDP."""
    if sync or not hasattr(model, 'no_sync'):
        return contextlib.nullcontext()
    return model.no_sync()


def split_batch(batch):
    """``(samples, targets)`` plus the unreadable image paths that datasets.collate_skipping reports."""
    return batch[0], batch[1], (batch[2] if len(batch) > 2 else [])


@dataclass(frozen=True)
class TrainOptions:
    """How train_one_epoch runs its steps (main.py fills it from the command line)."""
    amp_dtype: Optional[torch.dtype] = None  # autocast dtype; None: fp32 without autocast
    accum_steps: int = 1  # micro-batches per optimizer step (--grad-accum-steps)
    clip_grad: Optional[float] = None  # gradient norm clip
    print_freq: int = 10  # micro-batches between progress lines
    seed: int = 0  # with the rank, epoch and micro-batch: seeds each micro-batch's randomness
    strict_data: bool = False  # fail on an unreadable image instead of skipping it
    set_training_mode: bool = True  # False (--no-train-mode): the model steps in eval mode


def train_one_epoch(model: torch.nn.Module, criterion: Criterion, data_loader, optimizer,
                    device: torch.device, epoch: int, loss_scaler: LossScaler,
                    options: TrainOptions = TrainOptions(), model_ema=None, mixup_fn: Optional[Mixup] = None,
                    start_step: int = 0, checkpointer=None, metrics_state: Optional[dict] = None) -> dict:
    """Train for one epoch (from optimizer step ``start_step`` when resuming); returns the epoch's averages.

    A step is ``options.accum_steps`` (K) micro-batches of the loader: each one's loss / K is
    backpropagated into the same gradients (under DDP synchronised on the last one only), then one
    optimizer step with clipping, loss scaling and the EMA update. The loader yields whole steps
    (main.build_data drops an epoch's partial last step). Every micro-batch draws its randomness
    (mixup, dropout, drop-path) from generators seeded by (seed, rank, epoch, micro-batch), so a run
    resumed at any step continues exactly as an uninterrupted one.
    ``checkpointer.after_step`` may write a step checkpoint or stop the run after any optimizer step.
    """
    model.train(options.set_training_mode)
    accum_steps, print_freq = options.accum_steps, options.print_freq
    seed, rank = options.seed, get_rank()
    metric_logger = MetricLogger()
    if metrics_state and rank == 0:  # the sums of every rank (summed_state_dict): counted once, here
        metric_logger.load_state_dict(metrics_state)
    unreadable = {}  # path (error) -> None: each image counted once, however often it was drawn or retried
    first_micro = start_step * accum_steps
    last_micro = first_micro + len(data_loader) - 1
    finite = FiniteLossGuard(epoch, device)

    steps_done = start_step  # optimizer steps of this epoch finished: what a stop while waiting for data saves
    batches = checkpointer.watch(data_loader) if checkpointer is not None else data_loader
    try:
        for micro, batch in enumerate(metric_logger.log_every(batches, print_freq, f'Epoch: [{epoch}]', first_micro),
                                      start=first_micro):
            step, phase = divmod(micro, accum_steps)
            updating = phase == accum_steps - 1
            samples, targets, bad_paths = split_batch(batch)
            unreadable.update(dict.fromkeys(bad_paths))
            if bad_paths and options.strict_data:  # the batch is whole: its unreadable images were replaced
                finite.fail(UnreadableDataError(f'unreadable image {bad_paths[0]}: remove or replace it, '
                                                'or drop --strict-data to skip such images'))
            seed_everything(stream_seed(seed, rank, epoch, micro, Stream.STEP))
            samples = samples.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            if mixup_fn is not None:
                samples, targets = mixup_fn(samples, targets)

            if phase == 0:
                optimizer.zero_grad(set_to_none=True)
            with gradient_sync(model, updating):
                with autocast(device, options.amp_dtype):
                    outputs = model(criterion.model_inputs(samples))
                    loss = criterion(samples, outputs, targets)
                loss_scaler(loss / accum_steps, optimizer, clip_grad=options.clip_grad, parameters=model.parameters(),
                            need_update=updating)
            if updating and model_ema is not None:
                model_ema.update(model)

            # Reading the loss back forces a device sync: do it only when a progress line is printed.
            metric_logger.update(loss=loss.detach().float(), lr=optimizer.param_groups[0]['lr'])
            finite.update(loss.detach(), step)
            if micro % print_freq == 0 or micro == last_micro:
                finite.check()
            if updating and checkpointer is not None:  # metrics and finiteness read only when saving: a device sync
                checkpointer.after_step(epoch, step + 1, lambda: metric_logger.summed_state_dict(device),
                                        before_save=finite.check, failed=finite.failure is not None,
                                        epoch_trained=micro == last_micro)
            if updating:
                steps_done = step + 1
    except DataWaitExpired:
        checkpointer.stop_waiting_for_data(epoch, steps_done, lambda: metric_logger.summed_state_dict(device),
                                         before_save=finite.check)

    unreadable_images = count_over_ranks(unreadable)  # an image drawn by several ranks counts once
    if unreadable_images:
        example = next(iter(unreadable), None)
        print(f'warning: epoch {epoch}: {unreadable_images} unreadable images were skipped'
              + (f', e.g. {example}' if example else ''))
    metric_logger.synchronize_between_processes(device)
    averages = metric_logger.averages()
    averages['unreadable_images'] = unreadable_images
    averages['images_per_sec'] = metric_logger.images_per_sec
    print(f'Averaged stats: loss {averages["loss"]:.4f}  lr {averages["lr"]:.3g}')
    return averages


def head_logits(model: torch.nn.Module, images: torch.Tensor) -> dict:
    """Logits per classifier: {'both'} for a plain model; {'cls', 'dist', 'both'} for a distilled one.

    'both' is the average of the two heads, what a distilled model returns in eval mode (the
    paper's joint classifier); the heads are read separately to fill Table 3 in one evaluation.
    ``model`` is the bare model (no DDP or torch.compile wrapper): see HeadLogits.
    """
    if not is_distilled(model):
        return {'both': model(images)}
    features = model.forward_features(images)
    cls, dist = model.head(features[:, 0]), model.head_dist(features[:, 1])
    return {'cls': cls, 'dist': dist, 'both': (cls + dist) / 2}


# What evaluate sums over the images of every rank; for a distilled model also the top-1 of each head.
EVALUATION_SUMS = ('acc1', 'acc5', 'loss')
HEAD_SUMS = ('acc1_both', 'acc1_cls', 'acc1_dist')
REAL_SUMS = ('real_correct', 'real_images')  # with ReaL labels
def is_distilled(model: torch.nn.Module) -> bool:
    """Whether the bare ``model`` has a distillation head (a DDP wrapper hides it: pass its .module)."""
    return hasattr(model, 'head_dist')


class HeadLogits(torch.nn.Module):
    """head_logits of a distilled model as one module: what evaluate runs for it, and what --compile
    compiles (the training module returns the heads' average in eval mode, not each head)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> dict:
        return head_logits(self.model, images)


@torch.inference_mode()  # no autograd bookkeeping at all (no_grad still tracks versions)
def evaluate(data_loader, model: torch.nn.Module, device: torch.device,
             amp_dtype: Optional[torch.dtype] = None, print_freq: int = 10, eval_head: str = 'both',
             label: str = '') -> dict:
    """Top-1 / top-5 accuracy (%) and cross-entropy loss of the ``eval_head`` classifier, summed exactly
    over all ranks; for a distilled model also the top-1 of each head (acc1_cls, acc1_dist, acc1_both);
    with ReaL labels in the targets (real_labels.attach) also the ReaL top-1 (real_acc1) of the images
    that have any. ``label`` (e.g. 'EMA model') starts the printed lines of this evaluation.

    A rank may have no image to evaluate (a --dist-eval shard of a validation set smaller than the
    world, or one whose images are all unreadable): it adds nothing. Only a split without any readable
    image fails.

    ``model`` returns logits, or logits per head (HeadLogits; a bare distilled model is wrapped in it here).
    """
    if is_distilled(model):
        model = HeadLogits(model)
    criterion = torch.nn.CrossEntropyLoss(reduction='sum')
    model.eval()
    metric_logger = MetricLogger()
    totals = {}  # name -> float64 sum on the device: read back once, at the end
    count = 0  # images, counted on the host: a device tensor made from it would be a copy per batch
    unreadable = []
    prefix = f'{label}: ' if label else ''
    with failing_together():  # an error on some ranks (an --eval-head the model lacks) stops every rank
        for batch in metric_logger.log_every(data_loader, print_freq, f'{prefix}Test:'):
            images, target, bad_paths = split_batch(batch)
            unreadable += bad_paths
            if len(images) == 0:
                continue
            images = images.to(device, non_blocking=True)
            target, real = split_targets(target.to(device, non_blocking=True))
            with autocast(device, amp_dtype):
                outputs = model(images)
            logits = outputs if isinstance(outputs, dict) else {'both': outputs}
            if eval_head not in logits:
                raise UserError(f'--eval-head {eval_head} needs a distilled model: use --eval-head both')
            output = logits[eval_head].float()
            n = images.shape[0]
            predicted = output.topk(min(5, output.shape[1]), dim=1).indices
            top5 = predicted.eq(target[:, None])
            count += n
            batch_sums = {'loss': criterion(output, target), 'acc1': top5[:, 0].sum(), 'acc5': top5.sum()}
            if len(logits) > 1:
                batch_sums.update({f'acc1_{name}': out.argmax(dim=1).eq(target).sum() for name, out in logits.items()})
            if real is not None:
                batch_sums['real_correct'], batch_sums['real_images'] = real_correct(predicted[:, 0], real)
            for name, value in batch_sums.items():
                totals[name] = totals.get(name, 0) + value.double()
            metric_logger.update(n, loss=batch_sums['loss'] / n, acc1=100 * batch_sums['acc1'] / n)

    if unreadable:
        print(f'warning: {len(unreadable)} unreadable validation images were left out, e.g. {unreadable[0]}')
    # The same sums on every rank, whatever each one saw: those of a rank without images are 0.
    names = EVALUATION_SUMS + HEAD_SUMS + REAL_SUMS
    zero = torch.zeros((), dtype=torch.float64, device=device)
    present = torch.tensor([count, HEAD_SUMS[0] in totals, REAL_SUMS[0] in totals], dtype=torch.float64,
                           device=device)
    local = torch.cat([torch.stack([totals.get(name, zero) for name in names]), present])
    *values, count, ranks_with_heads, ranks_with_real = all_reduce_sum(local).tolist()
    if not count:
        raise_everywhere(UserError('no readable validation image: check the val/ split'))
    sums = dict(zip(names, values))
    real_correct_sum, real_images = (sums['real_correct'], sums['real_images']) if ranks_with_real else (None, None)
    sums = {name: sums[name] for name in EVALUATION_SUMS + (HEAD_SUMS if ranks_with_heads else ())}
    stats = {name: (value / count if name == 'loss' else 100 * value / count) for name, value in sums.items()}
    distilled = 'acc1_cls' in stats
    heads = {'both': ', both heads averaged', 'cls': ', class head', 'dist': ', distillation head'}
    print(f'* {prefix}Acc@1 {stats["acc1"]:.3f} Acc@5 {stats["acc5"]:.3f} loss {stats["loss"]:.3f} '
          f'({int(count)} images{heads[eval_head] if distilled else ""})')
    if distilled:
        print(f'* {prefix}Acc@1 per head: cls {stats["acc1_cls"]:.3f}  dist {stats["acc1_dist"]:.3f}  '
              f'both {stats["acc1_both"]:.3f}')
    if real_images is not None:
        stats['real_acc1'] = 100 * real_correct_sum / real_images if real_images else float('nan')
        stats['real_images'] = int(real_images)
        print(f'* {prefix}ReaL Acc@1 {stats["real_acc1"]:.3f} ({int(real_images)} images with ReaL labels, '
              f'{int(count - real_images)} without left out)')
    return stats
