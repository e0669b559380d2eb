//! `mta_worker`: one delivery process of the governor.
//!
//! # Layout
//! - [`worker`]: the process's main loop: handshake, campaigns and jobs from the governor,
//!   one outcome per job back to it.
//! - [`render`]: personalisation of a campaign template for one job (merge data is hostile
//!   input); also used by the governor to check a template at start-up.
//! - [`session`]: SMTP sessions to the relay (pool, deadlines, TLS, AUTH, dot-stuffing).
//! - [`dkim`]: DKIM signing of the exact bytes a session sends.
//! - [`outcome`]: the one mapping from what happened in a session to a job outcome.
//!
//! The binary `mta-worker` is only a check that it was started by the governor and a call to
//! [`run`].

pub mod dkim;
pub mod outcome;
pub mod render;
pub mod session;
pub mod worker;

pub use render::{RenderError, Rendered, Renderer, check_template};
pub use worker::run;
