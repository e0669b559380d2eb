//! `mta-worker`: started by the governor with its IPC socket on fd 3, never by hand.

use std::os::fd::{FromRawFd as _, OwnedFd};
use std::process::ExitCode;

use nix::sys::stat::{SFlag, fstat};

fn main() -> ExitCode {
    // A worker started by hand would wait forever on a terminal; say how it is meant to run.
    let is_socket = fstat(protocol::WORKER_FD)
        .map(|st| SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFSOCK)
        .unwrap_or(false);
    if !is_socket {
        eprintln!("mta-worker: must be started by the governor (no IPC socket on fd 3)");
        return ExitCode::from(2);
    }
    // SAFETY: fd 3 is open (fstat succeeded) and nothing else in this process owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(protocol::WORKER_FD) };
    match mta_worker::run(fd) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mta-worker: {e:#}");
            ExitCode::FAILURE
        }
    }
}
