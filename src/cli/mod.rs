//! The `wraith` command line: one file per subcommand, each a function returning the exit
//! code. Exit codes: 0 success, 1 the thing asked for failed (invalid config, server not
//! running, ...), 2 usage error (clap).

mod certs;
mod decisions;
mod logs;
mod policy;
mod reload;
mod serve;
mod status;
mod stop;
mod test;
mod top;
mod version;
mod wazuh_ar;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Wraith: a zero-trust security gateway and reverse proxy.
#[derive(Debug, Parser)]
#[command(name = "wraith", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// Where the config file is.
#[derive(Debug, clap::Args)]
pub struct ConfigArg {
    /// Configuration file.
    #[arg(
        short,
        long,
        value_name = "FILE",
        default_value = "wraith.toml",
        env = "WRAITH_CONFIG"
    )]
    pub config: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway.
    Serve(ConfigArg),
    /// Check the configuration (like `nginx -t`) and run the policy test cases
    /// (`<policy dir>/tests/*.toml`): exit 0 if all is well, 1 with every problem if not.
    Test(ConfigArg),
    /// Cedar policies: print the schema, explain a decision.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Ask the running server to reload its configuration (SIGHUP) and report the outcome.
    Reload(ConfigArg),
    /// Ask the running server to reopen its log files (SIGUSR1; logrotate's postrotate).
    Reopen(ConfigArg),
    /// Ask the running server to drain and stop (SIGTERM), and wait for it to exit.
    Stop {
        #[command(flatten)]
        config: ConfigArg,
        /// How long to wait for the exit (default: the shutdown timeout plus 5s).
        #[arg(long, value_name = "DURATION")]
        timeout: Option<String>,
    },
    /// Show the running server's state (via the admin socket).
    Status {
        #[command(flatten)]
        config: ConfigArg,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Query the SQLite access log (read-only): `wraith logs "SELECT status, count(*) FROM
    /// access_log GROUP BY 1"`, or a preset (`--denied`, `--errors`, `--slow 500ms`), or
    /// `--tail` to follow new rows.
    Logs {
        #[command(flatten)]
        config: ConfigArg,
        /// SQL to run (read-only); omit to use the presets.
        sql: Option<String>,
        /// The database (default: `[log.sqlite] path` of the config).
        #[arg(long, value_name = "FILE")]
        db: Option<std::path::PathBuf>,
        /// One JSON object per row instead of a table.
        #[arg(long)]
        json: bool,
        /// Keep printing new rows as they are written.
        #[arg(long)]
        tail: bool,
        /// Requests refused: 401/403/429, policy denials, rate limits, bans.
        #[arg(long)]
        denied: bool,
        /// Requests answered with a 5xx.
        #[arg(long)]
        errors: bool,
        /// Requests slower than this (e.g. `500ms`).
        #[arg(long, value_name = "DURATION")]
        slow: Option<String>,
        /// Only requests newer than this (e.g. `1h`).
        #[arg(long, value_name = "DURATION")]
        since: Option<String>,
        /// Rows shown (the newest; default 50; 0 for all).
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Longest a statement may run before it is stopped, the time spent writing its
        /// rows (to a slow pager, say) included (default 30s; 0 for no limit).
        #[arg(long, value_name = "DURATION")]
        timeout: Option<String>,
    },
    /// A live view of the running server (requests/s, errors, latency, routes, upstreams,
    /// denied clients); q quits.
    Top(ConfigArg),
    /// Print version, git revision, TLS provider and features.
    Version,
    /// Development certificates.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// List, add and lift ban decisions (via the admin socket).
    Decisions {
        /// Configuration file (to find the admin socket); also accepted after the action.
        #[arg(
            short,
            long,
            value_name = "FILE",
            default_value = "wraith.toml",
            env = "WRAITH_CONFIG",
            global = true
        )]
        config: PathBuf,
        #[command(subcommand)]
        command: decisions::DecisionsCommand,
    },
    /// Wazuh active-response script: reads execd's message on stdin, answers the
    /// check_keys handshake, and adds or lifts a ban with origin "wazuh:<the AR's program>".
    #[command(name = "wazuh-ar")]
    WazuhAr(wazuh_ar::WazuhArgs),
}

#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Create a dev CA, a server certificate (localhost, 127.0.0.1, ::1) and a client
    /// certificate with a SPIFFE ID. Keys are written 0600.
    Init {
        /// Directory to write into.
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Print Wraith's Cedar schema (the entities and context policies see).
    Schema,
    /// Decide a request with the configured policies and show the determining policies and
    /// the entities and context Cedar saw.
    Explain {
        #[command(flatten)]
        config: ConfigArg,
        #[command(flatten)]
        args: policy::ExplainArgs,
    },
}

/// The text a panic was raised with, when it has one.
pub(crate) fn panic_message<'a>(info: &'a std::panic::PanicHookInfo<'_>) -> Option<&'a str> {
    let payload = info.payload();
    payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
}

/// Parses the command line and runs the subcommand.
pub fn run() -> ExitCode {
    let cli = Cli::parse();
    // The Rust runtime ignores SIGPIPE, so a command printing into a closed pipe
    // (`wraith decisions list --json | head -1`) panicked on its next print. Such a panic
    // now ends the command quietly, as SIGPIPE ends Unix tools (status 141, as a shell
    // reports a death by SIGPIPE). The signal itself stays ignored: a write to the admin
    // socket of a server that went away must be an error the command reports, not a
    // silent death.
    if !matches!(cli.command, Command::Serve(_)) {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let msg = panic_message(info).unwrap_or("");
            if msg.starts_with("failed printing to stdout") && msg.contains("Broken pipe") {
                std::process::exit(141);
            }
            default(info);
        }));
    }
    match cli.command {
        Command::Serve(c) => serve::run(&c.config),
        Command::Test(c) => test::run(&c.config),
        Command::Policy {
            command: PolicyCommand::Schema,
        } => policy::schema(),
        Command::Policy {
            command: PolicyCommand::Explain { config, args },
        } => policy::explain(&config.config, &args),
        Command::Reload(c) => reload::run(&c.config),
        Command::Reopen(c) => reload::reopen(&c.config),
        Command::Stop { config, timeout } => stop::run(&config.config, timeout.as_deref()),
        Command::Status { config, json } => status::run(&config.config, json),
        Command::Logs {
            config,
            sql,
            db,
            json,
            tail,
            denied,
            errors,
            slow,
            since,
            limit,
            timeout,
        } => logs::run(logs::LogsArgs {
            config: config.config,
            db,
            sql,
            json,
            tail,
            denied,
            errors,
            slow,
            since,
            limit,
            timeout,
        }),
        Command::Top(c) => top::run(&c.config),
        Command::Version => version::run(),
        Command::Certs {
            command: CertsCommand::Init { dir, force },
        } => certs::init(&dir, force),
        Command::Decisions { config, command } => decisions::run(&config, command),
        Command::WazuhAr(args) => wazuh_ar::run(args),
    }
}

/// A small runtime for commands that talk to the server.
pub(crate) fn block_on<F: std::future::Future>(f: F) -> Result<F::Output, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map(|rt| rt.block_on(f))
        .map_err(|e| format!("cannot start runtime: {e}"))
}

/// The running server of a config, through its pid file (`signals::Running`: only a locked
/// file's holder). When that file does not exist but the config's admin socket answers for a
/// server holding another one (`server.pid_file` changed in the file, not yet reloaded: the
/// reload moves it), through the one it holds, verified the same way.
pub(crate) fn find_server(
    server: &crate::config::ServerConfig,
) -> Result<crate::signals::Running, String> {
    let pid_file = server
        .pid_file
        .as_ref()
        .ok_or("the configuration has no server.pid_file, so the server cannot be found")?;
    let missing = match crate::signals::Running::find(pid_file) {
        Ok(running) => return Ok(running),
        // A stale file, or one locked by another, is a verdict: only a missing one is not.
        Err(e) if std::fs::symlink_metadata(pid_file).is_ok() => return Err(e),
        Err(e) => e,
    };
    let Some(socket) = &server.admin_socket else {
        return Err(missing);
    };
    let status = block_on(crate::admin::call(
        socket,
        http::Method::GET,
        "/v1/status",
        std::time::Duration::from_secs(5),
    ));
    let Ok(Ok((_, status))) = status else {
        return Err(missing);
    };
    let held = match status["pid_file"].as_str().map(std::path::PathBuf::from) {
        Some(held) if held != *pid_file => held,
        _ => return Err(missing),
    };
    let running = crate::signals::Running::find(&held)?;
    if status["pid"].as_i64() != Some(i64::from(running.pid)) {
        return Err(missing);
    }
    eprintln!(
        "note: {} does not exist, but the server answering on {} holds {} (server.pid_file changed since it last loaded the file); using that one",
        pid_file.display(),
        socket.display(),
        held.display()
    );
    Ok(running)
}

/// The `[server]` paths of a config, even if other parts of it are broken (so `stop` still
/// works after someone broke the file on disk).
pub(crate) fn server_paths(path: &std::path::Path) -> Result<crate::config::ServerConfig, String> {
    match crate::config::load(path, crate::config::LoadOptions::default()) {
        Ok(c) => Ok(c.server),
        Err(full) => {
            let text = crate::files::read_to_string(path, crate::files::SMALL)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            let only_server = extract_server_section(&text);
            let with_dummy = format!(
                "{only_server}\n[[listener]]\nname='x'\naddress='127.0.0.1:0'\nprotocol='http'\n"
            );
            crate::config::load_str(path, &with_dummy, crate::config::LoadOptions::default())
                .map(|c| c.server)
                .map_err(|_| {
                    format!(
                        "{}: [server] has errors, so the running server (its pid file and admin \
                         socket) cannot be found; nothing was sent to it:\n{full}",
                        path.display()
                    )
                })
        }
    }
}

/// The `[server]` table of a TOML document, as text.
fn extract_server_section(text: &str) -> String {
    let mut out = String::new();
    let mut inside = false;
    for line in text.lines() {
        let t = line.trim_start();
        if t.starts_with('[') {
            inside = t.starts_with("[server]");
        }
        if inside {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

pub use crate::telemetry::format::{json_printable, printable, printable_lines};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_sequences_never_reach_the_terminal() {
        assert_eq!(printable("curl/8.0"), "curl/8.0");
        assert_eq!(
            printable("a\x1b]52;c;aGk=\x07b\u{9b}c"),
            "a\\u{1b}]52;c;aGk=\\u{7}b\\u{9b}c"
        );
        assert_eq!(printable("x\ny\u{202e}z"), "x\\u{a}y\\u{202e}z");
        assert_eq!(printable_lines("one\ntwo\r\n"), "one\ntwo\\u{d}\n");
    }

    #[test]
    fn json_output_escapes_c1_controls_and_bidi_overrides_and_keeps_its_value() {
        let one = serde_json::json!({"ua": "a\u{9b}31mb\u{85}\u{7f}\u{202e}é€"}).to_string();
        assert_eq!(
            json_printable(&one),
            r#"{"ua":"a\u009b31mb\u0085\u007f\u202eé€"}"#
        );
        let v =
            serde_json::json!({"ua": "a\u{9b}31mb\u{85}", "path": "/x\u{202e}gpj.exe", "ok": "é€"});
        let raw = v.to_string();
        let safe = json_printable(&raw);
        assert!(!safe
            .chars()
            .any(|c| ('\u{7f}'..='\u{9f}').contains(&c)
                || crate::telemetry::format::terminal_unsafe(c)));
        let back: serde_json::Value = serde_json::from_str(&safe).unwrap();
        assert_eq!(back, v);
        let pretty = serde_json::to_string_pretty(&v).unwrap();
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&json_printable(&pretty)).unwrap(),
            v
        );
        assert!(matches!(
            json_printable("{\"a\":1}"),
            std::borrow::Cow::Borrowed(_)
        ));
    }
}
