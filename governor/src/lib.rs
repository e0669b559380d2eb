//! The governor: owns the spool, paces dispatch toward a target rate, sizes and supervises the
//! pool of `mta-worker` processes, and explains every decision in its logs.
//!
//! # Layout
//! - [`config`]: the TOML configuration, validated with errors that name file, key and problem.
//! - [`campaign`]: streaming the recipients CSV and validating rows and addresses.
//! - [`spool`]: the durable SQLite job store and its state machine.
//! - [`supervisor`]: spawning, reaping, restarting and stopping worker processes.
//! - [`dispatch`]: the pacer (token bucket) that hands jobs to workers.
//! - [`control`]: measuring efficiency and deciding the worker count (pure functions).
//! - [`retry`]: the retry schedule and the adaptive retry limit (pure functions).
//! - [`target`]: the target rate over time (constant, schedule of steps and ramps, deadline).
//! - [`report`]: `governor report`, plots of the control log.
//! - [`deliverylog`]: one JSON line per delivery attempt.
//! - [`signals`]: SIGHUP/SIGTERM/SIGINT/SIGCHLD to flags and wake-ups.
//! - [`run`]: the main loop that ties the above together.
//! - [`sink`]: a small SMTP server for the demo and for load profiles.
//! - [`demo`]: the one-command demonstration.

pub mod campaign;
pub mod config;
pub mod control;
pub mod deliverylog;
pub mod demo;
pub mod dispatch;
pub mod report;
pub mod retry;
pub mod run;
pub mod signals;
pub mod sink;
pub mod spool;
pub mod supervisor;
pub mod target;
