//! Logging as NSM's components do it: the level from `NSM_LOG_LEVEL`, text
//! or JSON lines (`NSM_LOG_FORMAT`), on stderr, and the level switched at run
//! time by signals — SIGUSR1 sets TRACE, SIGUSR2 restores the configured
//! level (NSM's `logruslogger.SetupLevelChangeOnSignal`). Without this the
//! default action of those signals kills the process.

use std::io::IsTerminal;

use tokio::signal::unix::{SignalKind, signal};
use tracing::Level;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, reload};

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines (colour only on a terminal).
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<LogFormat, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "" | "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(format!("{s:?} is not a log format: text or json")),
        }
    }
}

impl std::fmt::Display for LogFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        })
    }
}

/// The filter for a level: every target at that level.
pub fn all_targets(level: Level) -> String {
    level.to_string()
}

/// The installed subscriber's level control.
pub struct Logging {
    handle: reload::Handle<EnvFilter, Registry>,
    level: Level,
    filter_for: fn(Level) -> String,
}

/// Installs the process's subscriber: `filter_for(level)` decides what is
/// logged at `level` (e.g. [`all_targets`]); `targets`: text lines name the
/// module that logged; `tracer`: spans also go to OpenTelemetry
/// ([`crate::telemetry`]).
pub fn init(
    level: Level,
    format: LogFormat,
    filter_for: fn(Level) -> String,
    targets: bool,
    tracer: Option<opentelemetry_sdk::trace::Tracer>,
) -> Logging {
    let (filter, handle) = reload::Layer::new(EnvFilter::new(filter_for(level)));
    let ansi = std::io::stderr().is_terminal();
    let text = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(targets)
        .with_ansi(ansi);
    let otel = tracer.map(|t| tracing_opentelemetry::layer().with_tracer(t));
    let registry = tracing_subscriber::registry().with(filter).with(otel);
    match format {
        LogFormat::Text => registry.with(text).init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr),
            )
            .init(),
    }
    Logging {
        handle,
        level,
        filter_for,
    }
}

impl Logging {
    /// Logs at `level` from now on.
    pub fn set(&self, level: Level) {
        if let Err(e) = self.handle.reload(EnvFilter::new((self.filter_for)(level))) {
            tracing::warn!(error = %e, "cannot change the log level");
        } else {
            tracing::info!(%level, "log level");
        }
    }

    /// Takes SIGUSR1 (TRACE) and SIGUSR2 (the configured level) from now on;
    /// call inside the runtime, before serving.
    pub fn switch_on_signals(self) -> std::io::Result<()> {
        let mut usr1 = signal(SignalKind::user_defined1())?;
        let mut usr2 = signal(SignalKind::user_defined2())?;
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    Some(()) = usr1.recv() => self.set(Level::TRACE),
                    Some(()) = usr2.recv() => self.set(self.level),
                    else => break,
                }
            }
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_parse_as_documented() {
        assert_eq!("text".parse(), Ok(LogFormat::Text));
        assert_eq!("".parse(), Ok(LogFormat::Text));
        assert_eq!(" JSON ".parse(), Ok(LogFormat::Json));
        assert_eq!(
            "yaml".parse::<LogFormat>(),
            Err("\"yaml\" is not a log format: text or json".to_owned())
        );
        assert_eq!(LogFormat::Json.to_string(), "json");
    }
}
