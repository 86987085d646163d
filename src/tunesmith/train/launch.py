"""`tunesmith train ... --nproc N`: N training processes on this machine, started by PyTorch's own launcher.

This is torchrun, called as a function (``torch.distributed.run``): a standalone rendezvous on a free
local port, N copies of ``python -m tunesmith train <the same arguments, minus --nproc>`` each with
RANK / LOCAL_RANK / WORLD_SIZE set, and the gloo backend on CPU (NCCL on GPUs, chosen by accelerate).
The same command therefore runs unchanged under ``torchrun``, ``accelerate launch`` and SLURM, which
start the processes themselves (see examples/distributed/); nothing here is needed on those paths.

Signals: torchrun starts the workers in their own session, so Ctrl-C (or a SIGTERM to this process)
reaches only the launcher, which passes it on once; each worker then finishes its step, the ranks agree
to stop at the same step, a checkpoint is written, and this command exits 130 like a one-process run.
"""

from __future__ import annotations

import os
import sys

# How long a worker may take, after Ctrl-C or SIGTERM, to finish its step and write the checkpoint before
# torchrun kills it (torchrun's own default is 30 s, short for a large model's checkpoint).
SHUTDOWN_TIMEOUT_S = 600


def without_nproc(argv: list[str]) -> list[str]:
    """The command line minus ``--nproc N`` / ``--nproc=N``: what each launched process runs."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def check_nproc(nproc: int) -> bool:
    """Whether ``--nproc N`` asks this process to launch N others (else it runs the training itself).

    Inside a launched process (torchrun / accelerate launch set LOCAL_RANK) ``--nproc`` is accepted only
    when it agrees with the launcher, so a command line can be started either way.
    """
    from ..config import ConfigError

    if nproc < 1:
        raise ConfigError(f"--nproc {nproc}: give the number of processes to start, 1 or more")
    launched = os.environ.get("LOCAL_WORLD_SIZE")
    if "LOCAL_RANK" not in os.environ:
        return nproc > 1
    if launched is not None and int(launched) != nproc:
        raise ConfigError(f"--nproc {nproc}, but this process was started by a launcher (torchrun, accelerate "
                          f"launch) with {launched} processes per machine: leave --nproc out under a launcher")
    return False


def launch_train(argv: list[str], nproc: int) -> int:
    """Run ``tunesmith <argv>`` in ``nproc`` local processes through torchrun; return the exit code.

    The code is the first failing process's own (2 bad input, 1 failure, 130 interrupted), 0 when all succeed.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    # One process per core group: N processes with all cores each would oversubscribe the CPU many times
    # over (torchrun itself would set 1 thread and say so). GPU runs barely use CPU threads.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(SHUTDOWN_TIMEOUT_S))
    args = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={nproc}", "-m", "tunesmith",
                                         *without_nproc(argv)])
    try:
        run(args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = failure.exitcode if failure.exitcode > 0 else 1  # negative: killed by a signal
        if code not in (2, 130):  # those processes said why themselves
            print(f"error: training process {rank} of {nproc} failed with exit code {failure.exitcode}",
                  file=sys.stderr)
        return code
    except SignalException:
        # torchrun passed the signal on and waited for the workers to save a checkpoint and exit; a second
        # signal while it waits is passed on too, and the workers quit at once (as one process does)
        return 130
    return 0
