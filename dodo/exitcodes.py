"""dodo's exit statuses, in one place: the CLI, the ranks, the launchers and the batch scripts'
continuation step all agree on them (a batch shell reads them to decide on a requeue).

Torch-free and import-free: the lowest layer, importable from anywhere.
"""

from __future__ import annotations

import signal

EXIT_COMPLETED = 0  # the command or the run finished
EXIT_FAILED = 1  # a run that failed (a rank crashed, a continuation that could not requeue)
EXIT_USAGE = 2  # an expected error: bad job file, override, run directory; a refused submission
EXIT_STOPPED = 3  # checkpointed and stopped on request (signal, cap reached); resumable
EXIT_DIVERGED = 4  # non-finite loss, gradient or weights (train.on_nonfinite); never retried
EXIT_HUNG = 75  # a rank was silent past cluster.hang_timeout_s; the watchdog ended the attempt
EXIT_INTERRUPTED = 128 + signal.SIGINT  # Ctrl-C on the CLI itself (130, as a shell reports it)
# USR2 arrived before a rank could install its handler: nothing was lost, the run resumes.
EXIT_USR2 = 128 + signal.SIGUSR2
RESUMABLE = (EXIT_STOPPED, EXIT_USR2)
