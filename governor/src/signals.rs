//! Signals become events on the main loop's channel: SIGHUP (reload), SIGTERM/SIGINT (stop;
//! a second one stops at once) and SIGCHLD (a worker may have exited: reap).

use crossbeam_channel::Sender;
use signal_hook::consts::{SIGCHLD, SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

/// A signal the main loop acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sig {
    /// Re-read the configuration.
    Reload,
    /// Stop gracefully (the first time) or at once (the second time).
    Stop,
    /// A child changed state.
    Child,
}

/// Handle that stops the signal thread when dropped.
pub struct SignalThread {
    handle: signal_hook::iterator::Handle,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for SignalThread {
    fn drop(&mut self) {
        self.handle.close();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Starts a thread that forwards signals to `tx` through `wrap`.
pub fn forward<E: Send + 'static>(
    tx: Sender<E>,
    wrap: fn(Sig) -> E,
) -> std::io::Result<SignalThread> {
    let mut signals = Signals::new([SIGHUP, SIGTERM, SIGINT, SIGCHLD])?;
    let handle = signals.handle();
    let thread = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                let s = match sig {
                    SIGHUP => Sig::Reload,
                    SIGCHLD => Sig::Child,
                    _ => Sig::Stop,
                };
                if tx.send(wrap(s)).is_err() {
                    break;
                }
            }
        })?;
    Ok(SignalThread {
        handle,
        thread: Some(thread),
    })
}
