"""A ``speedslurm`` whose file locks fail as on a file system mounted without flock, for both tiers."""

from __future__ import annotations

import textwrap

# A `speedslurm` whose flock fails like Lustre mounted noflock (only the non-blocking calls the results lock
# makes); run under `unshare -u` it also gets a hostname of its own: a second login node on the same file system.
NOFLOCK = textwrap.dedent("""\
    import errno, fcntl, os, socket, sys
    real = fcntl.flock
    def flock(fd, op):
        if op & fcntl.LOCK_NB:
            raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))
        return real(fd, op)
    fcntl.flock = flock
    if len(sys.argv) > 1 and sys.argv[1] == "--hostname":
        socket.sethostname(sys.argv[2])
        del sys.argv[1:3]
    from speedslurm.cli import main
    main(sys.argv[1:])
    """)
