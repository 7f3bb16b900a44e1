//! The `hookrelay` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use hookrelay::config::{self, Settings};
use hookrelay::logging;
use tracing_subscriber::fmt::writer::BoxMakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

#[derive(Parser)]
#[command(name = "hookrelay", version, about = "A webhook relay gateway")]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(clap::Args)]
struct ConfigArg {
    /// The configuration file.
    #[arg(long, env = "HOOKRELAY_CONFIG", default_value = "routes.yaml")]
    config: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Run the relay.
    Serve(ConfigArg),
    /// Validate the configuration and print a summary; exit 1 on any error.
    Check(ConfigArg),
    /// Send a sample webhook in a source's format, signed with its secret.
    Send {
        /// The source's name, from the configuration.
        source: String,
        /// The event name, e.g. page.published or content.published.
        event: String,
        /// Where to send it (default: the relay's listener and the source's path).
        #[arg(long)]
        url: Option<String>,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Show what a webhook would do (routes, filters, each target's request), storing and sending nothing.
    Preview {
        /// The source's name, from the configuration.
        source: String,
        /// The event name, e.g. page.published.
        event: String,
        /// A JSON payload to use instead of the source's sample webhook.
        #[arg(long)]
        payload: Option<PathBuf>,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// A receiver for trying a setup: prints each request, checks its signature, answers a status.
    Receive {
        /// Where to listen.
        #[arg(long, default_value = hookrelay::receive::DEFAULT_LISTEN)]
        listen: std::net::SocketAddr,
        /// The target's signing_secret (whsec_…): webhook-signature is checked against it.
        #[arg(long)]
        secret: Option<String>,
        /// The status to answer with.
        #[arg(long, default_value_t = 200)]
        status: u16,
    },
    /// The sandbox process that runs jq programs; started by the relay itself.
    #[command(hide = true)]
    JqSandbox,
    /// Ask a running relay whether it is alive (for container health checks); exit 1 unless it answers 2xx.
    Healthcheck {
        /// The admin listener's /healthz.
        #[arg(long, env = "HOOKRELAY_HEALTHCHECK_URL", default_value = "http://127.0.0.1:9090/healthz")]
        url: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::JqSandbox = cli.command {
        return hookrelay::jq::child::run();
    }
    let _flusher = init_logging(cli.log_format);
    match cli.command {
        Command::Check(c) => match config::load(&c.config) {
            Ok(settings) => check(&settings),
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Preview { source, event, payload, config } => {
            preview(&config.config, &source, &event, payload.as_deref())
        }
        Command::Receive { listen, secret, status } => receive(listen, secret.as_deref(), status),
        Command::Send { source, event, url, config } => send(&config.config, &source, &event, url.as_deref()),
        Command::Healthcheck { url } => healthcheck(&url),
        Command::JqSandbox => hookrelay::jq::child::run(),
        Command::Serve(c) => {
            let settings = match config::load(&c.config) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("error: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(hookrelay::app::serve(settings)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "hookrelay failed");
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// The summary, then every filter and transform run on the sample webhooks.
fn check(settings: &Settings) -> ExitCode {
    print_summary(settings);
    let runs = runtime().map(|rt| rt.block_on(hookrelay::preview::check_programs(settings)));
    let (lines, problems) = match runs {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    if !lines.is_empty() {
        println!("programs  run on the sample webhooks of their sources");
        lines.iter().for_each(|l| println!("{l}"));
    }
    if problems.is_empty() {
        return ExitCode::SUCCESS;
    }
    let all: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
    eprintln!("error: {}: {}", settings.path.display(), all.join("\n  "));
    ExitCode::FAILURE
}

fn preview(config: &std::path::Path, source: &str, event: &str, payload: Option<&std::path::Path>) -> ExitCode {
    let result = config::load(config).map_err(|e| e.to_string()).and_then(|settings| {
        let body = match payload {
            Some(p) => Some(std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()))?),
            None => None,
        };
        runtime()?.block_on(hookrelay::preview::preview(&settings, source, event, body))
    });
    match result {
        Ok((report, ok)) => {
            print!("{report}");
            if ok {
                ExitCode::SUCCESS
            } else {
                eprintln!("error: a program failed (above)");
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn receive(listen: std::net::SocketAddr, secret: Option<&str>, status: u16) -> ExitCode {
    let result = hookrelay::receive::Receiver::new(secret, status).and_then(|receiver| {
        runtime()?.block_on(async {
            let shutdown = tokio_util::sync::CancellationToken::new();
            let stop = shutdown.clone();
            tokio::spawn(async move {
                let _ = tokio::signal::ctrl_c().await;
                stop.cancel();
            });
            hookrelay::receive::run(listen, receiver, shutdown).await
        })
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A small runtime for one command.
fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))
}

fn send(config: &std::path::Path, source: &str, event: &str, url: Option<&str>) -> ExitCode {
    let result = config::load(config).map_err(|e| e.to_string()).and_then(|settings| {
        let sample = hookrelay::send::sample(&settings, source, event, url)?;
        println!("POST {} ({} bytes, {} {})", sample.url, sample.body.len(), source, event);
        block_on(hookrelay::send::post(sample))
    });
    report(result)
}

fn healthcheck(url: &str) -> ExitCode {
    report(block_on(hookrelay::send::get(url)))
}

/// Runs one client exchange on a small runtime of its own.
fn block_on(
    exchange: impl std::future::Future<Output = Result<(u16, String), String>>,
) -> Result<(u16, String), String> {
    runtime()?.block_on(exchange)
}

/// Prints an exchange's status and answer; success for a 2xx.
fn report(result: Result<(u16, String), String>) -> ExitCode {
    match result {
        Ok((status, body)) => {
            println!("HTTP {status}\n{body}");
            if (200..300).contains(&status) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Log lines go to stderr through [`hookrelay::logging`]'s queue (straight
/// to stderr if its thread cannot start); what is queued is written when
/// the returned flusher drops, as `main` returns.
fn init_logging(format: LogFormat) -> Option<logging::Flusher> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let (writer, flusher) = match logging::start(std::io::stderr(), logging::QUEUE_LINES, report_dropped) {
        Ok((queue, flusher)) => (BoxMakeWriter::new(queue), Some(flusher)),
        Err(e) => {
            eprintln!("warning: log lines are written as they come (no thread to write them: {e})");
            (BoxMakeWriter::new(std::io::stderr), None)
        }
    };
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(writer);
    let never = tracing_subscriber::filter::filter_fn(|meta| !never_logged(meta));
    match format {
        LogFormat::Text => builder.finish().with(never).init(),
        LogFormat::Json => builder.json().finish().with(never).init(),
    }
    flusher
}

/// Lines dropped whatever `RUST_LOG` asks, because they hold webhook bodies,
/// which are never logged: tokio-postgres writes each statement's
/// parameters at debug level, and sled its batches (keys and values) at
/// trace level and a page it cannot read at debug level.
fn never_logged(meta: &tracing::Metadata<'_>) -> bool {
    let target = meta.target();
    let sled = target == "sled" || target.starts_with("sled::");
    target == "tokio_postgres::query" || (sled && *meta.level() >= tracing::Level::DEBUG)
}

fn report_dropped(lines: u64) {
    tracing::warn!(dropped = lines, "log lines dropped: stderr was not read as fast as they came");
}

fn print_summary(s: &Settings) {
    println!("{}: OK", s.path.display());
    let tls = if s.server.tls.is_some() { "TLS" } else { "plain HTTP" };
    println!(
        "ingress   {} ({tls}), max_body {} bytes, request_timeout {}",
        s.server.listen,
        s.server.max_body,
        human(s.server.request_timeout)
    );
    let admin = if s.admin.token.is_some() { "/admin/* enabled" } else { "/admin/* disabled (no token)" };
    println!("admin     {} ({admin})", s.admin.listen);
    match &s.storage.postgres {
        Some(pg) => println!(
            "storage   {} (pool {}, retention {}{})",
            pg.describe,
            pg.pool,
            human(s.storage.retention),
            if pg.ca_certs.is_empty() { "" } else { ", CA from ca_file" }
        ),
        None => println!(
            "storage   {} (cache {} bytes, retention {})",
            s.storage.path.display(),
            s.storage.cache_bytes,
            human(s.storage.retention)
        ),
    }
    println!("sources   {}", s.sources.len());
    for src in &s.sources {
        println!("  {:<16} POST {:<24} format {:<10} auth {}", src.name, src.path, src.format.name(), src.auth.kind());
        if matches!(src.auth, config::Auth::None) {
            println!("  warning: source {} has auth type none", src.name);
        }
        for r in &src.routes {
            let events: Vec<String> = r.events.iter().map(|e| e.to_string()).collect();
            let filter = if r.filter.is_some() { " (filtered)" } else { "" };
            println!("    {} {}{filter} -> {}", r.key, events.join(", "), r.targets.join(", "));
        }
    }
    println!("targets   {}", s.targets.len());
    for t in &s.targets {
        println!(
            "  {:<16} {} (timeout {}, concurrency {}, max_attempts {}{})",
            t.name,
            s.from_env.redact(&t.url.to_string()),
            human(t.timeout),
            t.concurrency,
            t.retry.max_attempts,
            if t.transform.is_some() { ", transformed" } else { "" }
        );
    }
}

fn human(d: std::time::Duration) -> humantime::FormattedDuration {
    humantime::format_duration(d)
}
