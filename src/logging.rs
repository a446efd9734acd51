//! The node's logger: slog, readable on a terminal or JSON lines, with `log` (used by
//! actix-web and other libraries) bridged into it.
//!
//! Set up once in `main` before the actix System starts, so the global guard outlives
//! the runtime. Nothing here may log a secret: callers log ids and usernames, never
//! passwords, tokens, hashes or keys.
//!
//! Library messages known to be noise at their level are demoted to debug here (see
//! `NOISE`), so an ordinary start logs only what is true and worth an operator's look.

use slog::{Drain, Level, Logger, OwnedKVList, Record, o};

use crate::config::LogFormat;

/// Parses a level name (`critical`, `error`, `warning`/`warn`, `info`, `debug`, `trace`).
pub fn parse_level(name: &str) -> Option<Level> {
    match name.to_ascii_lowercase().as_str() {
        "critical" | "crit" => Some(Level::Critical),
        "error" => Some(Level::Error),
        "warning" | "warn" => Some(Level::Warning),
        "info" => Some(Level::Info),
        "debug" => Some(Level::Debug),
        "trace" => Some(Level::Trace),
        _ => None,
    }
}

/// Library messages demoted to debug: (target, start of the message, why).
const NOISE: &[(&str, &str)] = &[
    // Kademlia bootstraps when a listen address appears and every few minutes; a node
    // with no bootstrap peers (the first of a network) has nobody to ask, and kad warns
    // each time. The node says once at info that it has no bootstrap peers instead.
    ("libp2p_kad::behaviour", "Failed to trigger bootstrap: No known peers"),
];

/// Passes records on, with the `NOISE` messages at debug level.
struct DemoteNoise<D>(D);

impl<D: Drain> Drain for DemoteNoise<D> {
    type Ok = D::Ok;
    type Err = D::Err;

    fn log(&self, record: &Record<'_>, values: &OwnedKVList) -> Result<D::Ok, D::Err> {
        let noise = record.level().is_at_least(Level::Info)
            && NOISE
                .iter()
                .any(|(target, start)| record.tag() == *target && record.msg().to_string().starts_with(start));
        if !noise {
            return self.0.log(record, values);
        }
        let demoted = slog::RecordStatic { location: record.location(), level: Level::Debug, tag: record.tag() };
        self.0.log(&Record::new(&demoted, record.msg(), record.kv()), values)
    }
}

/// Keeps the global logger installed; drop it last.
pub struct LogGuard {
    _scope: slog_scope::GlobalLoggerGuard,
}

/// Builds the root logger writing to stderr and installs it as the global logger.
pub fn init(format: LogFormat, level: Level) -> LogGuard {
    let drain: Box<dyn Drain<Ok = (), Err = slog::Never> + Send> = match format {
        LogFormat::Term => {
            let decorator = slog_term::TermDecorator::new().stderr().build();
            Box::new(slog_term::FullFormat::new(decorator).build().fuse())
        }
        LogFormat::Json => {
            Box::new(slog_json::Json::new(std::io::stderr()).add_default_keys().set_newlines(true).build().fuse())
        }
    };
    let drain = slog_async::Async::new(DemoteNoise(drain.filter_level(level).fuse()))
        .chan_size(4096)
        .overflow_strategy(slog_async::OverflowStrategy::DropAndReport)
        .build()
        .fuse();
    let logger = Logger::root(drain, o!());
    let scope = slog_scope::set_global_logger(logger);
    // Libraries log through `log`; keep them at info or above so they cannot flood.
    let lib_level = match level {
        Level::Critical | Level::Error => log::Level::Error,
        Level::Warning => log::Level::Warn,
        _ => log::Level::Info,
    };
    let _ = slog_stdlog::init_with_level(lib_level);
    LogGuard { _scope: scope }
}
