//! The TOML configuration, validated with errors that name the file, the key and what to do.
//!
//! # Theory of operation
//! The file is deserialized into `Raw*` structs that mirror it exactly (`deny_unknown_fields`,
//! every key optional) and then checked key by key into [`Config`], where defaults are applied,
//! durations (floats in seconds) become [`Duration`]s and relative paths are resolved against
//! the config file's directory. Every error is a single line:
//!
//! ```text
//! /etc/governor.toml: key `target_rate`: must be a number > 0 (got -5)
//! /etc/governor.toml: line 3: unknown key `targte_rate` (did you mean `target_rate`?)
//! /etc/governor.toml: cannot read: No such file or directory
//! ```
//!
//! The list of keys, their defaults and which ones SIGHUP reloads lives in `docs/config.md`
//! and `examples/governor.toml`; keep the three in step.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use protocol::{Auth, Dkim, DkimAlgorithm, Relay, Timeouts, TlsMode};
use serde::Deserialize;

/// File descriptors the governor keeps for itself (spool, logs, signals, listeners) on top of
/// one per SMTP session.
pub const FD_RESERVE: u64 = 64;

/// Keys that SIGHUP applies without a restart.
pub const RELOADABLE_KEYS: &[&str] = &[
    "target_rate",
    "min_workers",
    "max_workers",
    "control_interval",
    "control",
    "schedule",
    "deadline",
];

/// When the control loop decides (claim 6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ControlMode {
    /// Every `control_interval`.
    Periodic,
    /// On every batch of outcomes, at most every [`CONTINUOUS_MIN_GAP`].
    Continuous,
    /// No controller: `min_workers` workers and the pacer at the target, as a
    /// static-concurrency MTA does (for comparisons; measurements are still logged).
    Off,
}

/// Shortest time between two decisions in continuous mode.
pub const CONTINUOUS_MIN_GAP: Duration = Duration::from_millis(100);

/// The whole configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The file it was read from (absolute).
    pub path: PathBuf,
    /// SQLite spool file. Default `<config dir>/var/spool.db`.
    pub spool: PathBuf,
    /// Directory of `worker-<slot>.log`, `delivery.jsonl`, `control.jsonl`. Default
    /// `<config dir>/var/log`.
    pub log_dir: PathBuf,
    /// Target delivery rate in messages per second (> 0).
    pub target_rate: f64,
    /// Fewest workers to keep allocated (>= 1).
    pub min_workers: u32,
    /// Most workers to allocate (>= min_workers).
    pub max_workers: u32,
    /// SMTP sessions per worker (1..=1000).
    pub sessions: u32,
    /// Control loop period (>= 50 ms).
    pub control_interval: Duration,
    /// Periodic or continuous control.
    pub control: ControlMode,
    /// The target rate over time (constant `target_rate`, `[[schedule]]` or `[deadline]`).
    pub target: crate::target::Target,
    /// Worker supervision policy.
    pub supervisor: SupervisorConfig,
    /// The relay every worker delivers to.
    pub relay: Relay,
    /// Per-stage SMTP deadlines.
    pub timeouts: Timeouts,
    /// Retry policy.
    pub retry: RetryConfig,
    /// Size limits on inputs.
    pub limits: Limits,
    /// The campaigns to deliver (at least one).
    pub campaigns: Vec<CampaignConfig>,
    /// DKIM signing of every message (`[dkim]`), with the key read at start-up. `Debug`
    /// never shows the key.
    pub dkim: Option<Dkim>,
}

/// `[supervisor]`: OTP-style restart intensity and shutdown policy.
#[derive(Debug, Clone, PartialEq)]
pub struct SupervisorConfig {
    /// More than this many restarts within `restart_period` escalates (back off, log loudly).
    pub restart_intensity: u32,
    /// The window over which restarts are counted.
    pub restart_period: Duration,
    /// Upper bound of the exponential back-off between restarts of one slot.
    pub restart_backoff_max: Duration,
    /// How long a worker asked to stop may take before its process group is killed.
    pub shutdown_grace: Duration,
    /// The unprivileged user workers run as when the governor runs as root (`worker_user`).
    pub worker_user: Option<WorkerUser>,
}

/// A user account looked up when the config is loaded, so the fork/exec path only has to call
/// `setgroups`/`setgid`/`setuid` with plain numbers (async-signal-safe).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerUser {
    /// The account name as configured.
    pub name: String,
    /// Its uid.
    pub uid: u32,
    /// Its primary gid.
    pub gid: u32,
}

/// `[retry]`: how often and how long a deferred job is retried, and how the retry limit adapts
/// (see [`crate::retry`]).
#[derive(Debug, Clone, PartialEq)]
pub struct RetryConfig {
    /// Most delivery attempts per job (the control loop may adapt it below this).
    pub max_attempts: u32,
    /// Shortest wait before a retry.
    pub min_interval: Duration,
    /// Longest wait before a retry (back-off ceiling).
    pub max_interval: Duration,
    /// A job older than this since its first attempt expires instead of being retried.
    pub max_age: Duration,
    /// Fewest attempts the adaptive limit may go down to (1..=max_attempts).
    pub min_attempts: u32,
    /// Which measurements adapt the limit; none is a fixed limit of `max_attempts`.
    pub adapt: crate::retry::Adapt,
    /// More allocated workers than this lower the limit (claim 54).
    pub workers_high: u32,
    /// Fewer allocated workers than this raise it (claim 55); <= `workers_high`.
    pub workers_low: u32,
    /// A failure rate above this lowers the limit (claim 56).
    pub failure_high: f64,
    /// A failure rate below this raises it (claim 57); <= `failure_high`.
    pub failure_low: f64,
    /// Utilization above which the limit falls in inverse proportion (claim 59).
    pub utilization_ref: f64,
    /// Weight of the stage of delivery (claim 58), in [0, 1].
    pub stage_weight: f64,
}

impl Default for RetryConfig {
    /// The defaults of `[retry]` for the default `max_workers = 8`.
    fn default() -> Self {
        RetryConfig {
            max_attempts: 5,
            min_interval: Duration::from_secs(60),
            max_interval: Duration::from_secs(3600),
            max_age: Duration::from_secs(5 * 86400),
            min_attempts: 2,
            adapt: crate::retry::Adapt::default(),
            workers_high: 6,
            workers_low: 2,
            failure_high: 0.2,
            failure_low: 0.05,
            utilization_ref: 0.5,
            stage_weight: 0.5,
        }
    }
}

impl RetryConfig {
    /// The retry-limit policy these keys describe.
    pub fn policy(&self) -> crate::retry::Policy {
        crate::retry::Policy::from_config(self)
    }
}

/// `[limits]`: sizes above which input is refused.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Largest template file, in bytes.
    pub template_max_bytes: usize,
    /// Largest single CSV field, in bytes; a row with a bigger field is invalid.
    pub field_max_bytes: usize,
}

/// One `[[campaign]]`.
#[derive(Debug, Clone, PartialEq)]
pub struct CampaignConfig {
    /// Unique name, `[A-Za-z0-9._-]+`; part of every Message-ID.
    pub name: String,
    /// Recipients CSV (absolute).
    pub recipients: PathBuf,
    /// RFC 5322 template (absolute).
    pub template: PathBuf,
    /// Envelope sender (MAIL FROM), without angle brackets.
    pub sender: String,
}

/// A configuration problem. Display is one line naming the file, and the line and/or key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{}: cannot read: {}", path.display(), io_reason(source))]
    Read {
        /// The config file.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
    /// A key not in the schema.
    #[error("{}: {}unknown key `{key}`{}", path.display(), line_prefix(*line),
        match suggestion {
            Some(s) => format!(" (did you mean `{s}`?)"),
            None => "; remove it (docs/config.md lists every key)".to_string(),
        })]
    UnknownKey {
        /// The config file.
        path: PathBuf,
        /// 1-based line, if known.
        line: Option<usize>,
        /// The unknown key, with its table (`relay.hots`).
        key: String,
        /// The closest known key, if one is close.
        suggestion: Option<String>,
    },
    /// TOML syntax or a value of the wrong type.
    #[error("{}: {}{}{message}", path.display(), line_prefix(*line),
        key.as_ref().map(|k| format!("key `{k}`: ")).unwrap_or_default())]
    Syntax {
        /// The config file.
        path: PathBuf,
        /// 1-based line, if known.
        line: Option<usize>,
        /// The key concerned, if known.
        key: Option<String>,
        /// The parser's message (one line).
        message: String,
    },
    /// A value that parsed but is not acceptable.
    #[error("{}: key `{key}`: {message}", path.display())]
    Invalid {
        /// The config file.
        path: PathBuf,
        /// The key (`relay.port`, `campaign[0].template`).
        key: String,
        /// What is wrong and what to do.
        message: String,
    },
}

fn line_prefix(line: Option<usize>) -> String {
    line.map(|l| format!("line {l}: ")).unwrap_or_default()
}

/// An io::Error's text without the " (os error N)" suffix, for one-line messages.
pub(crate) fn io_reason(e: &io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error ") {
        Some(i) if s.ends_with(')') => s[..i].to_string(),
        _ => s,
    }
}

// ---- the file as written ----

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    spool: Option<PathBuf>,
    log_dir: Option<PathBuf>,
    target_rate: Option<f64>,
    min_workers: Option<i64>,
    max_workers: Option<i64>,
    sessions: Option<i64>,
    control_interval: Option<f64>,
    control: Option<String>,
    #[serde(default)]
    schedule: Vec<RawPoint>,
    deadline: Option<RawDeadline>,
    #[serde(default)]
    supervisor: RawSupervisor,
    #[serde(default)]
    relay: RawRelay,
    #[serde(default)]
    timeouts: RawTimeouts,
    #[serde(default)]
    retry: RawRetry,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    campaign: Vec<RawCampaign>,
    dkim: Option<RawDkim>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDkim {
    domain: Option<String>,
    selector: Option<String>,
    key_file: Option<PathBuf>,
    algorithm: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSupervisor {
    restart_intensity: Option<i64>,
    restart_period: Option<f64>,
    restart_backoff_max: Option<f64>,
    shutdown_grace: Option<f64>,
    worker_user: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRelay {
    host: Option<String>,
    port: Option<i64>,
    tls: Option<String>,
    username: Option<String>,
    password: Option<String>,
    helo: Option<String>,
    ca_file: Option<PathBuf>,
    insecure_skip_verify: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTimeouts {
    connect: Option<f64>,
    greeting: Option<f64>,
    ehlo: Option<f64>,
    mail: Option<f64>,
    rcpt: Option<f64>,
    data: Option<f64>,
    final_dot: Option<f64>,
    idle: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetry {
    max_attempts: Option<i64>,
    min_interval: Option<f64>,
    max_interval: Option<f64>,
    max_age: Option<f64>,
    min_attempts: Option<i64>,
    adapt: Option<Vec<String>>,
    workers_high: Option<i64>,
    workers_low: Option<i64>,
    failure_high: Option<f64>,
    failure_low: Option<f64>,
    utilization_ref: Option<f64>,
    stage_weight: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    template_max_bytes: Option<i64>,
    field_max_bytes: Option<i64>,
}

/// A time in the config: seconds after the start of the run, or a TOML datetime with an offset.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawWhen {
    Secs(f64),
    Date(toml::value::Datetime),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPoint {
    at: Option<RawWhen>,
    rate: Option<f64>,
    ramp: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDeadline {
    at: Option<RawWhen>,
    floor: Option<f64>,
    ceiling: Option<f64>,
}

fn when(c: &Check, key: &str, v: Option<RawWhen>) -> Result<crate::target::When, ConfigError> {
    use crate::target::When;
    match v {
        None => Err(c.err(
            key,
            "required: seconds after the start of the run (e.g. `at = 3600`) or a date and time with an offset (e.g. `at = 2025-06-01T18:00:00+02:00`)",
        )),
        Some(RawWhen::Secs(s)) if s.is_finite() && (0.0..=MAX_SECS).contains(&s) => {
            Ok(When::Offset(s))
        }
        Some(RawWhen::Secs(s)) => Err(c.err(
            key,
            format!("must be a number of seconds from 0 to {MAX_SECS:e} after the start (got {s})"),
        )),
        Some(RawWhen::Date(d)) => {
            let (Some(date), Some(time), Some(offset)) = (d.date, d.time, d.offset) else {
                return Err(c.err(
                    key,
                    format!("{d} needs a date, a time and a UTC offset, e.g. 2025-06-01T18:00:00+02:00 or 2025-06-01T16:00:00Z"),
                ));
            };
            let off_min = match offset {
                toml::value::Offset::Z => 0i64,
                toml::value::Offset::Custom { minutes } => i64::from(minutes),
            };
            let secs = f64::from(time.second.unwrap_or(0))
                + f64::from(time.nanosecond.unwrap_or(0)) * 1e-9;
            let t = crate::target::unix_from_civil(
                i64::from(date.year),
                u32::from(date.month),
                u32::from(date.day),
                u32::from(time.hour),
                u32::from(time.minute),
                secs,
            ) - off_min as f64 * 60.0;
            Ok(When::Unix(t))
        }
    }
}

/// A rate in messages/s, > 0.
fn rate(c: &Check, key: &str, v: Option<f64>, default: Option<f64>) -> Result<f64, ConfigError> {
    match v.or(default) {
        None => Err(c.err(key, "required: a rate in messages per second, e.g. 100")),
        Some(r) if r.is_finite() && r > 0.0 => Ok(r),
        Some(r) => Err(c.err(key, format!("must be a number > 0 (got {r})"))),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCampaign {
    name: Option<String>,
    recipients: Option<PathBuf>,
    template: Option<PathBuf>,
    sender: Option<String>,
}

// ---- checking ----

/// Longest duration accepted anywhere (about 31 years); keeps `Duration` conversions total.
const MAX_SECS: f64 = 1e9;

struct Check<'a> {
    path: &'a Path,
    dir: &'a Path,
}

impl Check<'_> {
    fn err(&self, key: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_path_buf(),
            key: key.into(),
            message: message.into(),
        }
    }

    /// A count in `min..=max`.
    fn int(
        &self,
        key: &str,
        v: Option<i64>,
        default: i64,
        min: i64,
        max: i64,
    ) -> Result<i64, ConfigError> {
        let v = v.unwrap_or(default);
        if v < min || v > max {
            let want = if max == i64::MAX || max == u32::MAX as i64 {
                format!(">= {min}")
            } else {
                format!("from {min} to {max}")
            };
            return Err(self.err(key, format!("must be an integer {want} (got {v})")));
        }
        Ok(v)
    }

    /// Seconds as a float, `> 0` (or `>= min` when `min > 0`).
    fn secs(
        &self,
        key: &str,
        v: Option<f64>,
        default: f64,
        min: f64,
    ) -> Result<Duration, ConfigError> {
        let v = v.unwrap_or(default);
        let ok = v.is_finite() && v <= MAX_SECS && if min > 0.0 { v >= min } else { v > 0.0 };
        if !ok {
            let want = if min > 0.0 {
                format!(">= {min}")
            } else {
                "> 0".to_string()
            };
            return Err(self.err(
                key,
                format!("must be a number of seconds {want} and at most {MAX_SECS:e} (got {v})"),
            ));
        }
        Ok(Duration::from_secs_f64(v))
    }

    fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.dir.join(p)
        }
    }

    /// `p` must be a readable regular file; returns its size.
    fn readable(&self, key: &str, p: &Path) -> Result<u64, ConfigError> {
        let hint = format!("relative paths are resolved against {}", self.dir.display());
        let meta = std::fs::File::open(p)
            .and_then(|f| f.metadata())
            .map_err(|e| {
                self.err(
                    key,
                    format!("cannot read {}: {} ({hint})", p.display(), io_reason(&e)),
                )
            })?;
        if !meta.is_file() {
            return Err(self.err(
                key,
                format!("{} is not a regular file ({hint})", p.display()),
            ));
        }
        Ok(meta.len())
    }
}

/// A number in [0, 1] (`zero_ok`) or (0, 1].
fn fraction(
    check: &Check,
    key: &str,
    v: Option<f64>,
    default: f64,
    zero_ok: bool,
) -> Result<f64, ConfigError> {
    let v = v.unwrap_or(default);
    let ok = v.is_finite() && v <= 1.0 && if zero_ok { v >= 0.0 } else { v > 0.0 };
    if !ok {
        let lo = if zero_ok { "0 <= x" } else { "0 < x" };
        return Err(check.err(key, format!("must be a number with {lo} <= 1 (got {v})")));
    }
    Ok(v)
}

fn to_u32(v: i64) -> u32 {
    u32::try_from(v).expect("range checked")
}

fn timeout_ms(
    check: &Check,
    key: &str,
    v: Option<f64>,
    default_ms: u32,
) -> Result<u32, ConfigError> {
    let v = v.unwrap_or(f64::from(default_ms) / 1000.0);
    let max = f64::from(u32::MAX) / 1000.0;
    if !(v.is_finite() && v > 0.0 && v <= max) {
        return Err(check.err(
            key,
            format!("must be a number of seconds > 0 and at most {max:.0} (got {v})"),
        ));
    }
    Ok(((v * 1000.0).round() as u32).max(1))
}

fn valid_campaign_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

impl Config {
    /// Read, parse and validate the configuration at `path` (the file-descriptor check uses
    /// this process's soft `RLIMIT_NOFILE`).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        let text = std::fs::read_to_string(&abs).map_err(|source| ConfigError::Read {
            path: abs.clone(),
            source,
        })?;
        Config::parse(&abs, &text, nofile_soft_limit())
    }

    /// Parse and validate `text` as if read from `path` (which anchors relative paths), with
    /// `nofile_soft` as the file-descriptor limit. The referenced files must exist.
    pub fn parse(path: &Path, text: &str, nofile_soft: u64) -> Result<Config, ConfigError> {
        let path = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        let raw: RawConfig = toml::from_str(text).map_err(|e| toml_error(&path, text, e))?;
        let dir = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("/"));
        let c = Check {
            path: &path,
            dir: &dir,
        };

        let target_rate = match raw.target_rate {
            None => {
                return Err(c.err(
                    "target_rate",
                    "required: the delivery rate in messages per second, e.g. `target_rate = 200`",
                ));
            }
            Some(r) if !(r.is_finite() && r > 0.0) => {
                return Err(c.err("target_rate", format!("must be a number > 0 (got {r})")));
            }
            Some(r) => r,
        };
        let min_workers = c.int("min_workers", raw.min_workers, 1, 1, u32::MAX as i64)?;
        let max_workers = c.int("max_workers", raw.max_workers, 8, 1, u32::MAX as i64)?;
        if min_workers > max_workers {
            return Err(c.err(
                "min_workers",
                format!("must be <= max_workers ({max_workers}) (got {min_workers}); lower it or raise max_workers"),
            ));
        }
        let sessions = c.int("sessions", raw.sessions, 4, 1, 1000)?;
        let fds = (max_workers as u64)
            .saturating_mul(sessions as u64)
            .saturating_add(FD_RESERVE);
        if fds > nofile_soft {
            return Err(c.err(
                "max_workers",
                format!(
                    "max_workers x sessions + {FD_RESERVE} = {max_workers} x {sessions} + {FD_RESERVE} = {fds} \
                     file descriptors, over the soft open-files limit ({nofile_soft}); raise it \
                     (`ulimit -n {fds}`, or LimitNOFILE= in a systemd unit) or lower max_workers or sessions"
                ),
            ));
        }
        let control_interval = c.secs("control_interval", raw.control_interval, 1.0, 0.05)?;
        let control = match raw.control.as_deref().unwrap_or("periodic") {
            "periodic" => ControlMode::Periodic,
            "continuous" => ControlMode::Continuous,
            "off" => ControlMode::Off,
            other => {
                return Err(c.err(
                    "control",
                    format!("must be \"periodic\", \"continuous\" or \"off\" (got {other:?})"),
                ));
            }
        };
        let target = {
            use crate::target::{Deadline, Point, Target};
            if !raw.schedule.is_empty() && raw.deadline.is_some() {
                return Err(c.err(
                    "deadline",
                    "cannot be combined with [[schedule]]: choose one way of setting the target",
                ));
            }
            if let Some(d) = raw.deadline {
                let floor = rate(&c, "deadline.floor", d.floor, Some(1.0))?;
                let ceiling = rate(&c, "deadline.ceiling", d.ceiling, Some(target_rate))?;
                if floor > ceiling {
                    return Err(c.err(
                        "deadline.floor",
                        format!("must be <= deadline.ceiling ({ceiling}) (got {floor})"),
                    ));
                }
                Target::Deadline(Deadline {
                    at: when(&c, "deadline.at", d.at)?,
                    floor,
                    ceiling,
                })
            } else if raw.schedule.is_empty() {
                Target::Constant(target_rate)
            } else {
                let mut points = Vec::new();
                for (i, p) in raw.schedule.into_iter().enumerate() {
                    points.push(Point {
                        at: when(&c, &format!("schedule[{i}].at"), p.at)?,
                        rate: rate(&c, &format!("schedule[{i}].rate"), p.rate, None)?,
                        ramp: p.ramp.unwrap_or(false),
                    });
                }
                // Offsets and absolute times mixed: order is checked against "now" at start.
                let t = Target::Schedule {
                    initial: target_rate,
                    points,
                };
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0.0, |d| d.as_secs_f64());
                t.check(now).map_err(|e| c.err("schedule", e))?;
                t
            }
        };

        let s = raw.supervisor;
        let supervisor = SupervisorConfig {
            restart_intensity: to_u32(c.int(
                "supervisor.restart_intensity",
                s.restart_intensity,
                5,
                0,
                u32::MAX as i64,
            )?),
            restart_period: c.secs("supervisor.restart_period", s.restart_period, 30.0, 0.0)?,
            restart_backoff_max: c.secs(
                "supervisor.restart_backoff_max",
                s.restart_backoff_max,
                30.0,
                0.0,
            )?,
            shutdown_grace: c.secs("supervisor.shutdown_grace", s.shutdown_grace, 10.0, 0.0)?,
            worker_user: match s.worker_user {
                None => None,
                Some(name) => Some(worker_user(&c, &name)?),
            },
        };

        let r = raw.relay;
        let host = r.host.unwrap_or_else(|| "127.0.0.1".into());
        if host.trim().is_empty() || host.contains(char::is_whitespace) {
            return Err(c.err(
                "relay.host",
                format!("must be a host name or IP address (got {host:?})"),
            ));
        }
        let port = match r.port {
            None => {
                return Err(c.err(
                    "relay.port",
                    "required: the relay's TCP port, e.g. `port = 25` under [relay]",
                ));
            }
            Some(p) => to_u32(c.int("relay.port", Some(p), 0, 1, 65535)?) as u16,
        };
        let tls = match r.tls.as_deref().unwrap_or("off") {
            "off" => TlsMode::Off,
            "opportunistic" => TlsMode::Opportunistic,
            "required" => TlsMode::Required,
            "implicit" => TlsMode::Implicit,
            other => {
                return Err(c.err(
                    "relay.tls",
                    format!("must be one of \"off\", \"opportunistic\", \"required\", \"implicit\" (got {other:?})"),
                ));
            }
        };
        let auth = match (r.username, r.password) {
            (None, None) => None,
            (Some(username), Some(password)) => Some(Auth { username, password }),
            (Some(_), None) => {
                return Err(c.err(
                    "relay.password",
                    "missing: relay.username is set; set both or neither",
                ));
            }
            (None, Some(_)) => {
                return Err(c.err(
                    "relay.username",
                    "missing: relay.password is set; set both or neither",
                ));
            }
        };
        let helo = r.helo.unwrap_or_else(|| "localhost".into());
        if helo.is_empty() || helo.contains(|ch: char| ch.is_whitespace() || ch.is_control()) {
            return Err(c.err(
                "relay.helo",
                format!("must be a host name without spaces (got {helo:?})"),
            ));
        }
        let ca_file = match r.ca_file {
            None => None,
            Some(p) => {
                let p = c.resolve(&p);
                c.readable("relay.ca_file", &p)?;
                Some(
                    p.to_str()
                        .ok_or_else(|| c.err("relay.ca_file", "path must be valid UTF-8"))?
                        .to_string(),
                )
            }
        };
        let relay = Relay {
            host,
            port,
            tls,
            auth,
            helo,
            ca_file,
            insecure_skip_verify: r.insecure_skip_verify.unwrap_or(false),
        };

        let t = raw.timeouts;
        let d = Timeouts::default();
        let timeouts = Timeouts {
            connect_ms: timeout_ms(&c, "timeouts.connect", t.connect, d.connect_ms)?,
            greeting_ms: timeout_ms(&c, "timeouts.greeting", t.greeting, d.greeting_ms)?,
            ehlo_ms: timeout_ms(&c, "timeouts.ehlo", t.ehlo, d.ehlo_ms)?,
            mail_ms: timeout_ms(&c, "timeouts.mail", t.mail, d.mail_ms)?,
            rcpt_ms: timeout_ms(&c, "timeouts.rcpt", t.rcpt, d.rcpt_ms)?,
            data_ms: timeout_ms(&c, "timeouts.data", t.data, d.data_ms)?,
            final_dot_ms: timeout_ms(&c, "timeouts.final_dot", t.final_dot, d.final_dot_ms)?,
            idle_ms: timeout_ms(&c, "timeouts.idle", t.idle, d.idle_ms)?,
        };

        let rt = raw.retry;
        let min_interval = c.secs("retry.min_interval", rt.min_interval, 60.0, 0.0)?;
        let max_interval = c.secs("retry.max_interval", rt.max_interval, 3600.0, 0.0)?;
        if max_interval < min_interval {
            return Err(c.err(
                "retry.max_interval",
                format!(
                    "must be >= retry.min_interval ({} s) (got {})",
                    min_interval.as_secs_f64(),
                    max_interval.as_secs_f64()
                ),
            ));
        }
        let max_attempts = c.int("retry.max_attempts", rt.max_attempts, 5, 1, 1000)?;
        let min_attempts = c.int(
            "retry.min_attempts",
            rt.min_attempts,
            2.min(max_attempts),
            1,
            max_attempts,
        )?;
        let adapt = crate::retry::Adapt::parse(rt.adapt.as_deref().unwrap_or_default())
            .map_err(|e| c.err("retry.adapt", e))?;
        // Defaults relative to the pool: a quarter and three quarters of max_workers.
        let workers_high = c.int(
            "retry.workers_high",
            rt.workers_high,
            (max_workers * 3 + 3) / 4,
            0,
            u32::MAX as i64,
        )?;
        let workers_low = c.int(
            "retry.workers_low",
            rt.workers_low,
            (max_workers / 4).min(workers_high),
            0,
            u32::MAX as i64,
        )?;
        if workers_low > workers_high {
            return Err(c.err(
                "retry.workers_low",
                format!("must be <= retry.workers_high ({workers_high}) (got {workers_low})"),
            ));
        }
        let failure_high = fraction(&c, "retry.failure_high", rt.failure_high, 0.2, true)?;
        let failure_low = fraction(&c, "retry.failure_low", rt.failure_low, 0.05, true)?;
        if failure_low > failure_high {
            return Err(c.err(
                "retry.failure_low",
                format!("must be <= retry.failure_high ({failure_high}) (got {failure_low})"),
            ));
        }
        let retry = RetryConfig {
            max_attempts: to_u32(max_attempts),
            min_interval,
            max_interval,
            max_age: c.secs("retry.max_age", rt.max_age, 5.0 * 86400.0, 0.0)?,
            min_attempts: to_u32(min_attempts),
            adapt,
            workers_high: to_u32(workers_high),
            workers_low: to_u32(workers_low),
            failure_high,
            failure_low,
            utilization_ref: fraction(&c, "retry.utilization_ref", rt.utilization_ref, 0.5, false)?,
            stage_weight: fraction(&c, "retry.stage_weight", rt.stage_weight, 0.5, true)?,
        };

        // Templates and jobs cross the worker socket in one frame each; stay well inside it.
        let frame = protocol::MAX_FRAME as i64;
        let l = raw.limits;
        let limits = Limits {
            template_max_bytes: c.int(
                "limits.template_max_bytes",
                l.template_max_bytes,
                1 << 20,
                1,
                frame / 2,
            )? as usize,
            field_max_bytes: c.int(
                "limits.field_max_bytes",
                l.field_max_bytes,
                64 << 10,
                1,
                1 << 20,
            )? as usize,
        };

        if raw.campaign.is_empty() {
            return Err(c.err(
                "campaign",
                "at least one [[campaign]] table is required (name, recipients, template, sender)",
            ));
        }
        let mut campaigns: Vec<CampaignConfig> = Vec::with_capacity(raw.campaign.len());
        for (i, rc) in raw.campaign.into_iter().enumerate() {
            let key = |k: &str| format!("campaign[{i}].{k}");
            let required = |k: &str, what: &str| c.err(key(k), format!("required: {what}"));
            let name = rc.name.ok_or_else(|| {
                required("name", "a unique name of letters, digits, '.', '_' or '-'")
            })?;
            if !valid_campaign_name(&name) {
                return Err(c.err(
                    key("name"),
                    format!("must be letters, digits, '.', '_' or '-' only (got {name:?})"),
                ));
            }
            if let Some(j) = campaigns.iter().position(|o| o.name == name) {
                return Err(c.err(
                    key("name"),
                    format!("`{name}` is already the name of campaign[{j}]; names must be unique"),
                ));
            }
            let recipients = c.resolve(
                &rc.recipients
                    .ok_or_else(|| required("recipients", "path of the recipients CSV"))?,
            );
            c.readable(&key("recipients"), &recipients)?;
            let template = c.resolve(
                &rc.template
                    .ok_or_else(|| required("template", "path of the message template"))?,
            );
            let size = c.readable(&key("template"), &template)?;
            if size > limits.template_max_bytes as u64 {
                return Err(c.err(
                    key("template"),
                    format!(
                        "{} is {size} bytes, over limits.template_max_bytes ({}); shrink the template or raise the limit",
                        template.display(),
                        limits.template_max_bytes
                    ),
                ));
            }
            let sender = rc.sender.ok_or_else(|| {
                required(
                    "sender",
                    "the envelope sender (MAIL FROM), e.g. `news@example.com`",
                )
            })?;
            if let Err(why) = crate::campaign::validate_address(&sender) {
                return Err(c.err(
                    key("sender"),
                    format!("{sender:?} is not a plausible address ({why}); give the envelope sender, e.g. `news@example.com`"),
                ));
            }
            campaigns.push(CampaignConfig {
                name,
                recipients,
                template,
                sender,
            });
        }

        let dkim = match raw.dkim {
            None => None,
            Some(d) => Some(dkim_config(&c, d)?),
        };

        Ok(Config {
            spool: c.resolve(&raw.spool.unwrap_or_else(|| PathBuf::from("var/spool.db"))),
            log_dir: c.resolve(&raw.log_dir.unwrap_or_else(|| PathBuf::from("var/log"))),
            target_rate,
            min_workers: to_u32(min_workers),
            max_workers: to_u32(max_workers),
            sessions: to_u32(sessions),
            control_interval,
            control,
            target,
            supervisor,
            relay,
            timeouts,
            retry,
            limits,
            campaigns,
            dkim,
            path,
        })
    }

    /// Keys whose value differs in `new` but which SIGHUP cannot apply (they need a restart).
    /// A reload applies only [`RELOADABLE_KEYS`]; the caller logs these as ignored.
    pub fn restart_required_changes(&self, new: &Config) -> Vec<&'static str> {
        let mut v = Vec::new();
        let mut diff = |changed: bool, key: &'static str| {
            if changed {
                v.push(key);
            }
        };
        diff(self.spool != new.spool, "spool");
        diff(self.log_dir != new.log_dir, "log_dir");
        diff(self.sessions != new.sessions, "sessions");
        diff(self.supervisor != new.supervisor, "supervisor");
        diff(self.relay != new.relay, "relay");
        diff(self.timeouts != new.timeouts, "timeouts");
        diff(self.retry != new.retry, "retry");
        diff(self.limits != new.limits, "limits");
        diff(self.campaigns != new.campaigns, "campaign");
        diff(self.dkim != new.dkim, "dkim");
        v
    }
}

/// `supervisor.worker_user`: the account must exist and must not be root.
fn worker_user(c: &Check, name: &str) -> Result<WorkerUser, ConfigError> {
    let key = "supervisor.worker_user";
    let user = match nix::unistd::User::from_name(name) {
        Ok(Some(u)) => u,
        Ok(None) => {
            return Err(c.err(
                key,
                format!(
                    "no user named {name:?} on this system (create it, or use e.g. \"nobody\")"
                ),
            ));
        }
        Err(e) => return Err(c.err(key, format!("cannot look up user {name:?}: {e}"))),
    };
    if user.uid.is_root() {
        return Err(c.err(
            key,
            format!("{name:?} is root; name an unprivileged user such as \"nobody\""),
        ));
    }
    Ok(WorkerUser {
        name: name.to_string(),
        uid: user.uid.as_raw(),
        gid: user.gid.as_raw(),
    })
}

/// `[dkim]`: every key checked, the key file read and parsed now so a bad key stops the
/// governor at start-up with a message naming the file, never a worker later. The key's
/// contents never appear in an error.
fn dkim_config(c: &Check, d: RawDkim) -> Result<Dkim, ConfigError> {
    let required = |key: &str, v: Option<String>, example: &str| match v {
        Some(v) if !v.trim().is_empty() => Ok(v.trim().to_string()),
        _ => Err(c.err(
            key,
            format!("required when [dkim] is present, e.g. `{example}`"),
        )),
    };
    let domain = required("dkim.domain", d.domain, "domain = \"example.com\"")?;
    if !domain
        .split('.')
        .all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
    {
        return Err(c.err(
            "dkim.domain",
            format!("must be a domain name in ASCII (A-labels for IDN) (got {domain:?})"),
        ));
    }
    let selector = required("dkim.selector", d.selector, "selector = \"s2024\"")?;
    if !selector.split('.').all(|l| {
        !l.is_empty()
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    }) {
        return Err(c.err(
            "dkim.selector",
            format!("must be letters, digits, `-`, `_` and dots (got {selector:?})"),
        ));
    }
    let algorithm = match d.algorithm.as_deref().unwrap_or("rsa-sha256") {
        "rsa-sha256" => DkimAlgorithm::RsaSha256,
        "ed25519" | "ed25519-sha256" => DkimAlgorithm::Ed25519Sha256,
        other => {
            return Err(c.err(
                "dkim.algorithm",
                format!("must be one of \"rsa-sha256\", \"ed25519\" (got {other:?})"),
            ));
        }
    };
    let Some(key_file) = d.key_file else {
        return Err(c.err(
            "dkim.key_file",
            "required when [dkim] is present: the PEM private key, e.g. `key_file = \"dkim.pem\"`",
        ));
    };
    let p = c.resolve(&key_file);
    let len = c.readable("dkim.key_file", &p)?;
    if len > 64 * 1024 {
        return Err(c.err(
            "dkim.key_file",
            format!(
                "{} is {len} bytes, too large for a PEM private key",
                p.display()
            ),
        ));
    }
    let private_key_pem = std::fs::read_to_string(&p).map_err(|e| {
        c.err(
            "dkim.key_file",
            format!("cannot read {}: {}", p.display(), io_reason(&e)),
        )
    })?;
    let dkim = Dkim {
        domain,
        selector,
        algorithm,
        private_key_pem,
    };
    mta_worker::dkim::Signer::new(&dkim)
        .map_err(|e| c.err("dkim.key_file", format!("{}: {e}", p.display())))?;
    Ok(dkim)
}

/// The soft `RLIMIT_NOFILE` of this process (u64::MAX when unlimited or unknown).
pub fn nofile_soft_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit};
    getrlimit(Resource::RLIMIT_NOFILE).map_or(u64::MAX, |(soft, _hard)| soft)
}

/// 1-based line of byte offset `at`.
fn line_of(text: &str, at: usize) -> usize {
    text.as_bytes()[..at.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// The dotted key path toml attached to an error (it prints it as "in `a.b`" when the error
/// has no source context).
fn toml_keys(e: &toml::de::Error) -> Option<String> {
    let mut bare = e.clone();
    bare.set_input(None);
    let shown = bare.to_string();
    let rest = shown.lines().find_map(|l| l.strip_prefix("in `"))?;
    Some(rest.strip_suffix('`').unwrap_or(rest).to_string())
}

/// Turn a toml/serde error into a one-line [`ConfigError`], with a suggestion for unknown keys.
fn toml_error(path: &Path, text: &str, e: toml::de::Error) -> ConfigError {
    let line = e.span().map(|s| line_of(text, s.start));
    let msg = e
        .message()
        .trim()
        .replace('\n', "; ")
        .replace("expected f64", "expected a number")
        .replace("expected i64", "expected an integer")
        .replace("expected a boolean", "expected true or false");
    let keys = toml_keys(&e);
    // serde: "unknown field `x`, expected one of `a`, `b`" / "expected `a` or `b`" /
    // "there are no fields"
    if let Some(rest) = msg.strip_prefix("unknown field `") {
        let (unknown, expected) = rest.split_once('`').unwrap_or((rest, ""));
        let known: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
        let table = keys
            .as_deref()
            .map(|k| k.strip_suffix(unknown).unwrap_or(k).trim_end_matches('.'))
            .filter(|t| !t.is_empty());
        let qualify = |k: &str| match table {
            Some(t) => format!("{t}.{k}"),
            None => k.to_string(),
        };
        return ConfigError::UnknownKey {
            path: path.to_path_buf(),
            line,
            key: qualify(unknown),
            suggestion: closest(unknown, &known).map(qualify),
        };
    }
    // serde quotes the offending value ("invalid type: integer `123`"): never for a secret.
    let msg = if keys.as_deref().is_some_and(|k| SECRET_KEYS.contains(&k)) {
        "must be a string (the value is not shown: it is a secret)".to_string()
    } else {
        msg
    };
    ConfigError::Syntax {
        path: path.to_path_buf(),
        line,
        key: keys,
        message: msg,
    }
}

/// Keys whose values are secrets: an error about them never quotes the value.
const SECRET_KEYS: &[&str] = &["relay.password"];

/// The known key closest to `word`, if it is close enough to be a likely typo.
fn closest<'a>(word: &str, known: &[&'a str]) -> Option<&'a str> {
    known
        .iter()
        .map(|k| (edit_distance(&word.to_lowercase(), k), *k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 3))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

/// Levenshtein distance (with adjacent transpositions counted as one edit).
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut prev2: Vec<usize> = vec![0; b.len() + 1];
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for i in 1..=a.len() {
        let mut cur = vec![i; b.len() + 1];
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            cur[j] = (prev[j] + 1).min(cur[j - 1] + 1).min(prev[j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                cur[j] = cur[j].min(prev2[j - 2] + 1);
            }
        }
        prev2 = std::mem::replace(&mut prev, cur);
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::campaign::tests::TempDir;

    /// A directory with a recipients file and a template, and a minimal valid config.
    fn fixture(name: &str) -> TempDir {
        let d = TempDir::new(name);
        std::fs::write(d.0.join("r.csv"), "email\na@example.com\n").unwrap();
        std::fs::write(d.0.join("t.eml"), "Subject: hi\n\nhello\n").unwrap();
        d
    }

    const MINIMAL: &str = r#"
target_rate = 200
[relay]
port = 2525
[[campaign]]
name = "spring"
recipients = "r.csv"
template = "t.eml"
sender = "news@example.com"
"#;

    fn parse(d: &TempDir, text: &str) -> Result<Config, ConfigError> {
        Config::parse(&d.0.join("governor.toml"), text, 1 << 20)
    }

    #[test]
    fn minimal_config_gets_every_default() {
        let d = fixture("cfg-min");
        let c = parse(&d, MINIMAL).unwrap();
        assert_eq!(c.path, d.0.join("governor.toml"));
        assert_eq!(c.spool, d.0.join("var/spool.db"));
        assert_eq!(c.log_dir, d.0.join("var/log"));
        assert_eq!(
            (c.target_rate, c.min_workers, c.max_workers, c.sessions),
            (200.0, 1, 8, 4)
        );
        assert_eq!(c.control_interval, Duration::from_secs(1));
        assert_eq!(
            c.supervisor,
            SupervisorConfig {
                restart_intensity: 5,
                restart_period: Duration::from_secs(30),
                restart_backoff_max: Duration::from_secs(30),
                shutdown_grace: Duration::from_secs(10),
                worker_user: None,
            }
        );
        assert_eq!(
            c.relay,
            Relay {
                host: "127.0.0.1".into(),
                port: 2525,
                tls: TlsMode::Off,
                auth: None,
                helo: "localhost".into(),
                ca_file: None,
                insecure_skip_verify: false,
            }
        );
        assert_eq!(c.timeouts, Timeouts::default());
        assert_eq!(
            c.retry,
            RetryConfig {
                max_attempts: 5,
                min_interval: Duration::from_secs(60),
                max_interval: Duration::from_secs(3600),
                max_age: Duration::from_secs(5 * 86400),
                min_attempts: 2,
                adapt: crate::retry::Adapt::default(),
                workers_high: 6,
                workers_low: 2,
                failure_high: 0.2,
                failure_low: 0.05,
                utilization_ref: 0.5,
                stage_weight: 0.5,
            }
        );
        assert_eq!(c.retry, RetryConfig::default());
        assert_eq!(
            c.limits,
            Limits {
                template_max_bytes: 1 << 20,
                field_max_bytes: 64 << 10
            }
        );
        assert_eq!(
            c.campaigns,
            vec![CampaignConfig {
                name: "spring".into(),
                recipients: d.0.join("r.csv"),
                template: d.0.join("t.eml"),
                sender: "news@example.com".into(),
            }]
        );
    }

    /// The shipped example is valid (with its campaign paths pointed at the fixture) and states
    /// every default that the code applies.
    #[test]
    fn shipped_example_parses_and_matches_defaults() {
        let d = fixture("cfg-example");
        let example = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../examples/governor.toml"
        ))
        .unwrap();
        let text = example
            .replace("\"campaign/recipients.csv\"", "\"r.csv\"")
            .replace("\"campaign/template.eml\"", "\"t.eml\"")
            .replace("# ca_file = ", "ca_file = ")
            .replace("\"/etc/ssl/certs/relay-ca.pem\"", "\"t.eml\"");
        let full = parse(&d, &text).unwrap();
        let min = parse(&d, MINIMAL).unwrap();
        assert_eq!(
            full.relay.ca_file.as_deref(),
            Some(d.0.join("t.eml").to_str().unwrap())
        );
        let full = Config {
            relay: Relay {
                ca_file: None,
                ..full.relay
            },
            target_rate: min.target_rate,
            campaigns: min.campaigns.clone(),
            ..full
        };
        assert_eq!(
            full,
            Config {
                relay: Relay {
                    port: full.relay.port,
                    ..min.relay.clone()
                },
                ..min
            }
        );
    }

    #[test]
    fn full_config_every_key() {
        let d = fixture("cfg-full");
        let text = r#"
spool = "/var/lib/governor/spool.db"
log_dir = "logs"
target_rate = 1.5
min_workers = 2
max_workers = 3
sessions = 10
control_interval = 0.5
[supervisor]
restart_intensity = 3
restart_period = 10
restart_backoff_max = 5.5
shutdown_grace = 2
[relay]
host = "mx.example.net"
port = 465
tls = "implicit"
username = "u"
password = "p"
helo = "sender.example.com"
ca_file = "t.eml"
insecure_skip_verify = true
[timeouts]
connect = 1.5
greeting = 2
ehlo = 3
mail = 4
rcpt = 5
data = 6
final_dot = 7
idle = 0.25
[retry]
max_attempts = 9
min_interval = 1
max_interval = 2
max_age = 3600
min_attempts = 3
adapt = ["workers", "failure_rate", "stage", "utilization"]
workers_high = 3
workers_low = 1
failure_high = 0.5
failure_low = 0
utilization_ref = 0.8
stage_weight = 0.25
[limits]
template_max_bytes = 1000
field_max_bytes = 100
[[campaign]]
name = "a.b_c-1"
recipients = "r.csv"
template = "t.eml"
sender = "\"odd user\"@example.com"
[[campaign]]
name = "second"
recipients = "r.csv"
template = "t.eml"
sender = "n@example.com"
"#;
        let c = parse(&d, text).unwrap();
        assert_eq!(c.spool, PathBuf::from("/var/lib/governor/spool.db"));
        assert_eq!(c.log_dir, d.0.join("logs"));
        assert_eq!((c.min_workers, c.max_workers, c.sessions), (2, 3, 10));
        assert_eq!(c.control_interval, Duration::from_millis(500));
        assert_eq!(
            c.supervisor.restart_backoff_max,
            Duration::from_millis(5500)
        );
        assert_eq!(c.relay.tls, TlsMode::Implicit);
        assert_eq!(
            c.relay.auth,
            Some(Auth {
                username: "u".into(),
                password: "p".into()
            })
        );
        assert!(c.relay.insecure_skip_verify);
        assert_eq!(
            (
                c.timeouts.connect_ms,
                c.timeouts.idle_ms,
                c.timeouts.final_dot_ms
            ),
            (1500, 250, 7000)
        );
        assert_eq!(c.retry.max_attempts, 9);
        let p = c.retry.policy();
        assert_eq!(
            (
                p.min_attempts,
                p.max_attempts,
                p.workers_high,
                p.workers_low
            ),
            (3, 9, 3, 1)
        );
        assert_eq!(
            (
                p.failure_high,
                p.failure_low,
                p.utilization_ref,
                p.stage_weight
            ),
            (0.5, 0.0, 0.8, 0.25)
        );
        assert_eq!(
            p.adapt.names(),
            vec!["workers", "failure_rate", "stage", "utilization"]
        );
        assert_eq!(p.max_age_s, 3600.0);
        assert_eq!(c.limits.field_max_bytes, 100);
        assert_eq!(c.campaigns.len(), 2);
        // The password never shows in Debug output.
        assert!(!format!("{c:?}").contains("\"p\""));
        // Reload: only restart-only keys are reported.
        let mut new = c.clone();
        new.target_rate = 9.0;
        new.max_workers = 4;
        assert!(c.restart_required_changes(&new).is_empty());
        new.sessions = 11;
        new.relay.port = 25;
        assert_eq!(c.restart_required_changes(&new), vec!["sessions", "relay"]);
    }

    /// Every error, as the operator sees it (with the fixture dir shown as `D`).
    #[test]
    fn errors_table() {
        let d = fixture("cfg-errors");
        let base = MINIMAL.replace("target_rate = 200\n", "");
        // (replace in MINIMAL, with) -> expected message
        let with = |extra_top: &str| format!("{extra_top}\n{MINIMAL}");
        let cases: Vec<(String, &str)> = vec![
            (
                base.replacen("[relay]", "target_rate = -5\n[relay]", 1),
                "key `target_rate`: must be a number > 0 (got -5)",
            ),
            (
                base.clone(),
                "key `target_rate`: required: the delivery rate in messages per second, e.g. `target_rate = 200`",
            ),
            (
                base.replacen("[relay]", "target_rate = nan\n[relay]", 1),
                "key `target_rate`: must be a number > 0 (got NaN)",
            ),
            (
                format!("\n\ntargte_rate = 5\n{MINIMAL}"),
                "line 3: unknown key `targte_rate` (did you mean `target_rate`?)",
            ),
            (
                with("frobnicate = 1"),
                "line 1: unknown key `frobnicate`; remove it (docs/config.md lists every key)",
            ),
            (
                MINIMAL.replace("port = 2525", "port = 2525\nhots = \"x\""),
                "line 5: unknown key `relay.hots` (did you mean `relay.host`?)",
            ),
            (
                MINIMAL.replace("[relay]", "[relais]"),
                "line 3: unknown key `relais` (did you mean `relay`?)",
            ),
            (
                MINIMAL.replace("sender =", "sendr ="),
                "line 9: unknown key `campaign.sendr` (did you mean `campaign.sender`?)",
            ),
            (
                MINIMAL.replace("target_rate = 200", "target_rate = \"fast\""),
                "line 2: key `target_rate`: invalid type: string \"fast\", expected a number",
            ),
            (
                MINIMAL.replace("target_rate = 200", "target_rate = "),
                "line 2: ",
            ),
            (
                with("min_workers = 0"),
                "key `min_workers`: must be an integer >= 1 (got 0)",
            ),
            (
                with("min_workers = 5\nmax_workers = 2"),
                "key `min_workers`: must be <= max_workers (2) (got 5); lower it or raise max_workers",
            ),
            (
                with("sessions = 1001"),
                "key `sessions`: must be an integer from 1 to 1000 (got 1001)",
            ),
            (
                with("max_workers = 2000\nsessions = 1000"),
                "key `max_workers`: max_workers x sessions + 64 = 2000 x 1000 + 64 = 2000064 file descriptors, over the soft open-files limit (1048576)",
            ),
            (
                with("control_interval = 0.01"),
                "key `control_interval`: must be a number of seconds >= 0.05 and at most 1e9 (got 0.01)",
            ),
            (
                MINIMAL.replace("port = 2525", "port = 2525\ntls = \"starttls\""),
                "key `relay.tls`: must be one of \"off\", \"opportunistic\", \"required\", \"implicit\" (got \"starttls\")",
            ),
            (
                MINIMAL.replace("port = 2525", "port = 25.5"),
                "line 4: key `relay.port`: invalid type: floating point `25.5`, expected an integer",
            ),
            (
                MINIMAL.replace("port = 2525", "port = 70000"),
                "key `relay.port`: must be an integer from 1 to 65535 (got 70000)",
            ),
            (
                MINIMAL.replace("port = 2525", ""),
                "key `relay.port`: required: the relay's TCP port, e.g. `port = 25` under [relay]",
            ),
            (
                MINIMAL.replace("port = 2525", "port = 25\nusername = \"u\""),
                "key `relay.password`: missing: relay.username is set; set both or neither",
            ),
            (
                MINIMAL.replace("port = 2525", "port = 25\npassword = \"p\""),
                "key `relay.username`: missing: relay.password is set; set both or neither",
            ),
            (
                MINIMAL.replace("port = 2525", "port = 25\nca_file = \"nope.pem\""),
                "key `relay.ca_file`: cannot read D/nope.pem: No such file or directory (relative paths are resolved against D)",
            ),
            (
                format!("{MINIMAL}[timeouts]\ndata = 0\n"),
                "key `timeouts.data`: must be a number of seconds > 0 and at most 4294967 (got 0)",
            ),
            (
                format!("{MINIMAL}[retry]\nmin_interval = 100\nmax_interval = 10\n"),
                "key `retry.max_interval`: must be >= retry.min_interval (100 s) (got 10)",
            ),
            (
                format!("{MINIMAL}[retry]\nmax_attempts = 0\n"),
                "key `retry.max_attempts`: must be an integer from 1 to 1000 (got 0)",
            ),
            (
                format!("{MINIMAL}[retry]\nmax_attempts = 3\nmin_attempts = 4\n"),
                "key `retry.min_attempts`: must be an integer from 1 to 3 (got 4)",
            ),
            (
                format!("{MINIMAL}[retry]\nmin_attempts = 0\n"),
                "key `retry.min_attempts`: must be an integer from 1 to 5 (got 0)",
            ),
            (
                format!("{MINIMAL}[retry]\nadapt = [\"workers\", \"load\"]\n"),
                "key `retry.adapt`: unknown input \"load\"; use any of \"workers\", \"failure_rate\", \"stage\", \"utilization\" (or [] for a fixed limit)",
            ),
            (
                format!("{MINIMAL}[retry]\nadapt = \"workers\"\n"),
                "line 11: key `retry.adapt`: invalid type: string \"workers\", expected a sequence",
            ),
            (
                format!("{MINIMAL}[retry]\nadpat = [\"workers\"]\n"),
                "line 11: unknown key `retry.adpat` (did you mean `retry.adapt`?)",
            ),
            (
                format!("{MINIMAL}[retry]\nworkers_high = 2\nworkers_low = 3\n"),
                "key `retry.workers_low`: must be <= retry.workers_high (2) (got 3)",
            ),
            (
                format!("{MINIMAL}[retry]\nworkers_high = -1\n"),
                "key `retry.workers_high`: must be an integer >= 0 (got -1)",
            ),
            (
                format!("{MINIMAL}[retry]\nfailure_high = 1.5\n"),
                "key `retry.failure_high`: must be a number with 0 <= x <= 1 (got 1.5)",
            ),
            (
                format!("{MINIMAL}[retry]\nfailure_high = 0.1\nfailure_low = 0.3\n"),
                "key `retry.failure_low`: must be <= retry.failure_high (0.1) (got 0.3)",
            ),
            (
                format!("{MINIMAL}[retry]\nutilization_ref = 0\n"),
                "key `retry.utilization_ref`: must be a number with 0 < x <= 1 (got 0)",
            ),
            (
                format!("{MINIMAL}[retry]\nstage_weight = -0.1\n"),
                "key `retry.stage_weight`: must be a number with 0 <= x <= 1 (got -0.1)",
            ),
            (
                format!("{MINIMAL}[supervisor]\nshutdown_grace = -1\n"),
                "key `supervisor.shutdown_grace`: must be a number of seconds > 0 and at most 1e9 (got -1)",
            ),
            (
                format!("{MINIMAL}[limits]\ntemplate_max_bytes = 5\n"),
                "key `campaign[0].template`: D/t.eml is 19 bytes, over limits.template_max_bytes (5); shrink the template or raise the limit",
            ),
            (
                MINIMAL.split("[[campaign]]").next().unwrap().to_string(),
                "key `campaign`: at least one [[campaign]] table is required (name, recipients, template, sender)",
            ),
            (
                MINIMAL.replace("name = \"spring\"", "name = \"spring sale\""),
                "key `campaign[0].name`: must be letters, digits, '.', '_' or '-' only (got \"spring sale\")",
            ),
            (
                MINIMAL.replace("name = \"spring\"\n", ""),
                "key `campaign[0].name`: required: a unique name",
            ),
            (
                format!("{MINIMAL}[[campaign]]\nname = \"spring\"\n"),
                "key `campaign[1].name`: `spring` is already the name of campaign[0]; names must be unique",
            ),
            (
                MINIMAL.replace("t.eml", "missing.eml"),
                "key `campaign[0].template`: cannot read D/missing.eml: No such file or directory (relative paths are resolved against D)",
            ),
            (
                MINIMAL.replace("\"r.csv\"", "\".\""),
                "key `campaign[0].recipients`: D/. is not a regular file",
            ),
            (
                MINIMAL.replace("news@example.com", "news"),
                "key `campaign[0].sender`: \"news\" is not a plausible address (no @); give the envelope sender, e.g. `news@example.com`",
            ),
            (
                MINIMAL.replace("news@example.com", "news@"),
                "key `campaign[0].sender`: \"news@\" is not a plausible address (missing domain)",
            ),
        ];
        let dir = d.0.display().to_string();
        let file = format!("{dir}/governor.toml: ");
        for (text, want) in cases {
            let got = parse(&d, &text).expect_err(want).to_string();
            assert!(!got.contains('\n'), "one line: {got}");
            let got = got
                .strip_prefix(&file)
                .unwrap_or_else(|| panic!("names the file: {got}"));
            let got = got.replace(&dir, "D");
            assert!(got.starts_with(want), "\n got: {got}\nwant: {want}");
        }
    }

    /// `[retry]` defaults that depend on other keys: the worker thresholds follow max_workers,
    /// min_attempts never exceeds max_attempts.
    #[test]
    fn retry_defaults_follow_the_pool_and_max_attempts() {
        let d = fixture("cfg-retry-defaults");
        for (extra, high, low, min) in [
            ("max_workers = 1", 1, 0, 2),
            ("max_workers = 20", 15, 5, 2),
            ("max_workers = 3", 3, 0, 2),
            ("[retry]\nmax_attempts = 1", 6, 2, 1),
        ] {
            let text = if extra.starts_with('[') {
                format!("{MINIMAL}{extra}\n")
            } else {
                format!("{extra}\n{MINIMAL}")
            };
            let r = parse(&d, &text).unwrap().retry;
            assert_eq!(
                (r.workers_high, r.workers_low, r.min_attempts),
                (high, low, min),
                "{extra}"
            );
        }
    }

    #[test]
    fn unreadable_file() {
        let e = Config::load(Path::new("/nonexistent/governor.toml")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "/nonexistent/governor.toml: cannot read: No such file or directory"
        );
    }

    #[test]
    fn load_resolves_against_the_config_dir() {
        let d = fixture("cfg-load");
        let p = d.0.join("governor.toml");
        std::fs::write(&p, MINIMAL).unwrap();
        let c = Config::load(&p).unwrap();
        assert_eq!(c.campaigns[0].recipients, d.0.join("r.csv"));
    }

    /// `[dkim]`: the key is read and parsed at start-up, errors name the key file, and the key
    /// never shows in Debug output or an error.
    #[test]
    fn dkim_section() {
        // RFC 8410's example Ed25519 key, PKCS#8.
        const ED25519: &str = "-----BEGIN PRIVATE KEY-----\n\
            MC4CAQAwBQYDK2VwBCIEINTuctv5E1hK1bbY8fdp+K06/nwoy/HU++CXqI9EdVhC\n\
            -----END PRIVATE KEY-----\n";
        let d = fixture("cfg-dkim");
        std::fs::write(d.0.join("dkim.pem"), ED25519).unwrap();
        assert_eq!(parse(&d, MINIMAL).unwrap().dkim, None);
        let text = format!(
            "{MINIMAL}\n[dkim]\ndomain = \"example.com\"\nselector = \"s1\"\nkey_file = \"dkim.pem\"\nalgorithm = \"ed25519\"\n"
        );
        let c = parse(&d, &text).unwrap();
        assert_eq!(
            c.dkim,
            Some(Dkim {
                domain: "example.com".into(),
                selector: "s1".into(),
                algorithm: DkimAlgorithm::Ed25519Sha256,
                private_key_pem: ED25519.into(),
            })
        );
        assert!(!format!("{c:?}").contains("MC4CAQAw"));
        let min = parse(&d, MINIMAL).unwrap();
        assert_eq!(min.restart_required_changes(&c), vec!["dkim"]);

        let file = d.0.join("governor.toml").display().to_string();
        let dir = d.0.display().to_string();
        for (from, to, want) in [
            (
                "algorithm = \"ed25519\"",
                "algorithm = \"rsa-sha256\"",
                "key `dkim.key_file`: D/dkim.pem: DKIM private key for selector \"s1\" of example.com: not an RSA private key",
            ),
            (
                "algorithm = \"ed25519\"",
                "algorithm = \"dsa\"",
                "key `dkim.algorithm`: must be one of \"rsa-sha256\", \"ed25519\" (got \"dsa\")",
            ),
            (
                "key_file = \"dkim.pem\"",
                "key_file = \"nope.pem\"",
                "key `dkim.key_file`: cannot read D/nope.pem: No such file or directory",
            ),
            (
                "key_file = \"dkim.pem\"",
                "key_file = \"t.eml\"",
                "key `dkim.key_file`: D/t.eml: DKIM private key for selector \"s1\" of example.com: not a PEM private key",
            ),
            (
                "selector = \"s1\"\n",
                "",
                "key `dkim.selector`: required when [dkim] is present",
            ),
            (
                "domain = \"example.com\"",
                "domain = \"exa mple.com\"",
                "key `dkim.domain`: must be a domain name",
            ),
        ] {
            let got = parse(&d, &text.replace(from, to))
                .expect_err(want)
                .to_string();
            let got = got.strip_prefix(&file).unwrap().replace(&dir, "D");
            assert!(
                got.starts_with(&format!(": {want}")),
                "\n got: {got}\nwant: {want}"
            );
            assert!(!got.contains("MC4CAQAw"), "{got}");
        }
    }

    #[test]
    fn suggestions() {
        assert_eq!(edit_distance("targte_rate", "target_rate"), 1);
        assert_eq!(
            closest("max_worker", &["min_workers", "max_workers"]),
            Some("max_workers")
        );
        assert_eq!(closest("SESSIONS", &["sessions"]), Some("sessions"));
        assert_eq!(closest("zzz", &["sessions", "spool"]), None);
    }
}
