//! Starting one `mta-worker` process.
//!
//! The worker gets its end of a socketpair on [`protocol::WORKER_FD`], becomes the leader of a new
//! session and process group (so a stop can signal the whole group), and asks the kernel to send
//! it SIGKILL when the spawning thread dies (PDEATHSIG), so no worker outlives the governor. Only
//! async-signal-safe calls run between fork and exec.
//!
//! When a [`Credentials`] is given (the governor runs as root and `supervisor.worker_user` is
//! set), the child drops to that uid/gid (with no supplementary groups) before exec. The numbers
//! are resolved before the fork; the log file the worker appends to is created and chowned to
//! that user first, so it can still write there. The drop happens *before* PR_SET_PDEATHSIG,
//! because the kernel clears the parent-death signal whenever the credentials change.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use nix::sys::signal::Signal;

/// A freshly started worker process and the governor's end of its socket.
pub struct Spawned {
    /// The child process (reaped with `try_wait`).
    pub child: Child,
    /// The governor's end of the IPC socket.
    pub stream: UnixStream,
}

/// The unprivileged identity a worker runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Credentials {
    /// User id.
    pub uid: u32,
    /// Primary group id (also the only group: supplementary groups are cleared).
    pub gid: u32,
}

/// Starts `worker` with its socket on fd 3 and stderr appended to `log_path` (so a panic or an
/// early error of the worker lands in its own log), as `user` if given.
pub fn spawn(
    worker: &Path,
    slot: u32,
    log_path: &Path,
    user: Option<Credentials>,
) -> io::Result<Spawned> {
    let (ours, theirs) = UnixStream::pair()?;
    let theirs: OwnedFd = theirs.into();
    let stderr = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)?;
    if let Some(u) = user {
        // The worker opens this file again by path after the handshake, as `u`.
        std::os::unix::fs::fchown(&stderr, Some(u.uid), Some(u.gid))?;
    }
    let fd = theirs.as_raw_fd();
    let parent = nix::unistd::getpid();
    let mut cmd = Command::new(worker);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .env("GOVERNOR_WORKER_SLOT", slot.to_string());
    // SAFETY: the closure only makes async-signal-safe system calls (dup2, setsid, setgroups,
    // setgid, setuid, prctl, getppid, _exit) and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            // dup2 onto fd 3 clears FD_CLOEXEC on the target, so the socket survives exec.
            if fd == protocol::WORKER_FD {
                let flags = nix::libc::fcntl(fd, nix::libc::F_GETFD);
                nix::libc::fcntl(fd, nix::libc::F_SETFD, flags & !nix::libc::FD_CLOEXEC);
            } else if nix::libc::dup2(fd, protocol::WORKER_FD) < 0 {
                return Err(io::Error::last_os_error());
            }
            if nix::libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            if let Some(u) = user {
                // Groups first: after setuid we could no longer change them.
                let gid: nix::libc::gid_t = u.gid;
                if nix::libc::setgroups(1, &gid) < 0
                    || nix::libc::setgid(u.gid) < 0
                    || nix::libc::setuid(u.uid) < 0
                {
                    return Err(io::Error::last_os_error());
                }
            }
            if nix::libc::prctl(
                nix::libc::PR_SET_PDEATHSIG,
                Signal::SIGKILL as nix::libc::c_ulong,
            ) < 0
            {
                return Err(io::Error::last_os_error());
            }
            // The governor may have died between fork and prctl: then nobody would kill us.
            if nix::libc::getppid() != parent.as_raw() {
                nix::libc::_exit(1);
            }
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    drop(theirs);
    Ok(Spawned {
        child,
        stream: ours,
    })
}
