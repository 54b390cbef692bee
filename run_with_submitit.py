"""Submit main.py to Slurm through submitit: many nodes, requeued on preemption and time limit.

    python run_with_submitit.py --nodes 2 --ngpus 8 --model deit_base_patch16_224 --data-path ...

Every main.py flag is accepted. Each Slurm task becomes one rank of the torch.distributed job
(submitit's TorchDistributedEnvironment exports MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK,
the variables torchrun sets). On preemption or time limit Slurm signals the job, submitit calls
``Trainer.checkpoint`` and the job is requeued under the same id with ``--resume auto``: it
continues from the newest checkpoint of its output directory.
"""
import argparse
import copy
import os
import sys
from pathlib import Path

import submitit

import checkpoint
import config
import main as trainer
import utils

REPO = Path(__file__).resolve().parent


def parse_args(argv=None) -> argparse.Namespace:
    parser = config.CommandLineParser(description='Submit DeiT training to Slurm with submitit',
                                      parents=[trainer.get_args_parser()])
    slurm = parser.add_argument_group('Slurm submission')
    slurm.add_argument('--ngpus', default=8, type=int, help='GPUs per node; 0 runs CPU tasks (gloo)')
    slurm.add_argument('--nodes', default=2, type=int, help='number of nodes')
    slurm.add_argument('--ntasks-per-node', default=None, type=int,
                       help='tasks (ranks) per node; default: --ngpus, or 1 with --ngpus 0')
    slurm.add_argument('--timeout', default=2800, type=int, help='job time limit in minutes')
    slurm.add_argument('--job_dir', default='experiments/%j', type=str,
                       help='submitit logs; %%j is the job id. Also the output_dir when none is given')
    slurm.add_argument('--partition', default=None, type=str, help="Slurm partition; unset: the cluster's default")
    slurm.add_argument('--use_volta32', action='store_true', help='constrain to 32 GB V100 nodes')
    slurm.add_argument('--comment', default='', type=str, help='Slurm job comment')
    slurm.add_argument('--qos', default=None, type=str, help="Slurm quality of service; unset: the cluster's default")
    slurm.add_argument('--account', default=None, type=str, help="Slurm account; unset: the cluster's default")
    slurm.add_argument('--cpus-per-task', default=10, type=int, help='CPUs per task (data-loader workers)')
    slurm.add_argument('--mem-per-gpu', default=40, type=int, help='GB of memory per GPU')
    slurm.add_argument('--constraint', default=None, type=str, help='Slurm node constraint; unset: none')
    slurm.add_argument('--exclude', default=None, type=str, help='nodes to exclude; unset: none')
    slurm.add_argument('--job-name', default='deit', type=str, help='Slurm job name')
    return config.parse_args(parser, argv)


class Trainer:
    """The submitted callable: runs main.main on each task, and requeues itself when preempted."""

    def __init__(self, args: argparse.Namespace):
        # main.main mutates its arguments (scaled lr, device, start epoch): keep the submitted ones.
        self.args = args

    def __call__(self) -> None:
        if str(REPO) not in sys.path:  # the job must import main.py even if started elsewhere
            sys.path.insert(0, str(REPO))
        args = copy.deepcopy(self.args)
        self._setup_distributed(args)
        try:
            trainer.main(args)
        except checkpoint.TrainingInterrupted:
            # Rank 0 requeues the job (submitit's handler, in main.main) once the checkpoint is written, which every
            # rank has waited for. The others end quietly: a non-zero exit would let srun's --kill-on-bad-exit kill
            # rank 0 before it requeues.
            if submitit.JobEnvironment().global_rank == 0:
                raise
        finally:
            utils.leave_distributed()

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on preemption/timeout: requeue, resuming from the newest checkpoint."""
        args = copy.deepcopy(self.args)
        args.resume = 'auto'
        print(f'Requeuing: will resume from the newest checkpoint in {job_output_dir(args)}', flush=True)
        return submitit.helpers.DelayedSubmission(type(self)(args))

    @staticmethod
    def _setup_distributed(args: argparse.Namespace) -> None:
        env = submitit.JobEnvironment()
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        args.output_dir = job_output_dir(args, env.job_id)
        args.dist_url = 'env://'
        if args.ngpus == 0:
            args.device = 'cpu'
        print(f'Process group: {env.num_tasks} tasks, rank {env.global_rank}, job {env.job_id}', flush=True)


def job_output_dir(args: argparse.Namespace, job_id: str = None) -> str:
    """--output_dir (or --job_dir), with %j replaced by the job id once it is known."""
    out = args.output_dir or args.job_dir
    job_id = job_id or os.environ.get('SLURM_JOB_ID')
    return out.replace('%j', job_id) if job_id else out


def submit(args: argparse.Namespace) -> submitit.Job:
    """Validate the training arguments, then submit the job; returns submitit's handle."""
    # The output directory may contain %j (unknown before submission): the job creates it.
    trainer.validate_args(argparse.Namespace(**{**vars(args), 'output_dir': '',
                                                'resume': '' if args.resume == 'auto' else args.resume}))
    tasks_per_node = args.ntasks_per_node or max(args.ngpus, 1)
    if args.ngpus > 0 and tasks_per_node > args.ngpus:
        raise trainer.UserError(f'--ntasks-per-node {tasks_per_node} is more than --ngpus {args.ngpus}: each task '
                                f'(rank) trains on a GPU of its own; ask for at most {args.ngpus} tasks per node')
    executor = submitit.AutoExecutor(folder=args.job_dir, slurm_max_num_timeout=30)
    slurm = {}
    for key in ('qos', 'account', 'exclude'):
        if getattr(args, key):
            slurm[f'slurm_{key}'] = getattr(args, key)
    constraint = 'volta32gb' if args.use_volta32 else args.constraint
    if constraint:
        slurm['slurm_constraint'] = constraint
    if args.comment:
        slurm['slurm_comment'] = args.comment
    if args.partition:
        slurm['slurm_partition'] = args.partition
    if args.ngpus > 0:
        slurm['mem_gb'] = args.mem_per_gpu * args.ngpus
        slurm['gpus_per_node'] = args.ngpus
    # --kill-on-bad-exit: a task that dies (a segfault, the OOM killer) ends the others at once, instead of
    # leaving them waiting in a collective until its timeout (utils.DIST_TIMEOUT).
    executor.update_parameters(
        tasks_per_node=tasks_per_node, cpus_per_task=args.cpus_per_task, nodes=args.nodes,
        timeout_min=args.timeout, slurm_signal_delay_s=120, name=args.job_name,
        slurm_srun_args=['--kill-on-bad-exit=1'], **slurm)
    return executor.submit(Trainer(args))


def cli(argv=None) -> int:
    args = parse_args(argv)
    try:
        job = submit(args)
    except trainer.UserError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    except submitit.core.utils.FailedJobError as e:
        print(f'error: Slurm refused the job: {str(e).strip().splitlines()[-1]}', file=sys.stderr)
        return 2
    print(f'Submitted job_id: {job.job_id}')
    print(f'Logs: {job.paths.stdout}  {job.paths.stderr}'.replace('%t', '*'))
    print(f'Checkpoints and log.txt: {job_output_dir(args, job.job_id)}')
    return 0


if __name__ == '__main__':
    sys.exit(cli())
