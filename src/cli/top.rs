//! `wraith top`: a live terminal view of the running server, refreshed every second from the
//! admin socket (`GET /v1/status`). Fits 80x24 (works over SSH); `q`, Esc or Ctrl-C quits.
//!
//! Route rates are computed here from the difference between two samples of the cumulative
//! per-route counters; the traffic line is the server's own last-minute window.

use std::collections::HashMap;
use std::io::Stdout;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use http::Method;
use ratatui::backend::CrosstermBackend;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::crossterm::execute;
use ratatui::crossterm::terminal::{
    disable_raw_mode, enable_raw_mode, EnterAlternateScreen, LeaveAlternateScreen,
};
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Paragraph, Row, Table};
use ratatui::{Frame, Terminal};
use serde_json::Value;

/// How often the view refreshes.
const REFRESH: Duration = Duration::from_secs(1);

pub fn run(config_path: &Path) -> ExitCode {
    let socket = match super::server_paths(config_path).and_then(|s| {
        s.admin_socket
            .ok_or_else(|| "the configuration has no server.admin_socket".to_string())
    }) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("wraith top: {e}");
            return ExitCode::FAILURE;
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("wraith top: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut terminal = match TerminalGuard::new() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("wraith top: cannot use the terminal: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut view = View::default();
    loop {
        let fetched = rt.block_on(crate::admin::call(
            &socket,
            Method::GET,
            "/v1/status",
            Duration::from_secs(2),
        ));
        view.update(fetched.map(|(_, v)| v));
        if let Err(e) = terminal.0.draw(|f| view.render(f)) {
            drop(terminal);
            eprintln!("wraith top: cannot draw: {e}");
            return ExitCode::FAILURE;
        }
        // Wait for a key until the next refresh.
        let deadline = Instant::now() + REFRESH;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match event::poll(left) {
                Ok(true) => {
                    if let Ok(Event::Key(k)) = event::read() {
                        let quit = k.kind == KeyEventKind::Press
                            && (matches!(k.code, KeyCode::Char('q') | KeyCode::Esc)
                                || (k.code == KeyCode::Char('c')
                                    && k.modifiers.contains(KeyModifiers::CONTROL)));
                        if quit {
                            return ExitCode::SUCCESS;
                        }
                    }
                }
                Ok(false) => break,
                Err(_) => return ExitCode::FAILURE,
            }
        }
    }
}

/// Raw mode and the alternate screen, undone on drop (also on errors and panics' unwinding).
struct TerminalGuard(Terminal<CrosstermBackend<Stdout>>);

impl TerminalGuard {
    fn new() -> std::io::Result<TerminalGuard> {
        enable_raw_mode()?;
        let mut out = std::io::stdout();
        execute!(out, EnterAlternateScreen)?;
        Ok(TerminalGuard(Terminal::new(CrosstermBackend::new(out))?))
    }
}

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        let _ = disable_raw_mode();
        let _ = execute!(self.0.backend_mut(), LeaveAlternateScreen);
        let _ = self.0.show_cursor();
    }
}

/// Requests, 5xx and denials per second.
type Rates = (f64, f64, f64);

/// What the screen shows, with the previous sample for rates.
#[derive(Default)]
struct View {
    status: Option<Value>,
    error: Option<String>,
    /// route -> (requests, 5xx, denied) at the previous sample, and when it was taken.
    previous: HashMap<String, (u64, u64, u64)>,
    previous_at: Option<Instant>,
    /// route -> (req/s, 5xx/s, denied/s)
    rates: HashMap<String, Rates>,
}

impl View {
    fn update(&mut self, fetched: Result<Value, String>) {
        match fetched {
            Ok(v) => {
                let now = Instant::now();
                let mut current = HashMap::new();
                for r in v["routes"].as_array().into_iter().flatten() {
                    let name = r["name"].as_str().unwrap_or("?").to_string();
                    let n = |k: &str| r[k].as_u64().unwrap_or(0);
                    current.insert(name, (n("requests"), n("server_errors"), n("denied")));
                }
                if let Some(at) = self.previous_at {
                    let secs = now.duration_since(at).as_secs_f64().max(0.001);
                    self.rates = current
                        .iter()
                        .map(|(name, (r, e, d))| {
                            let (pr, pe, pd) =
                                self.previous.get(name).copied().unwrap_or((*r, *e, *d));
                            let rate = |a: u64, b: u64| a.saturating_sub(b) as f64 / secs;
                            (name.clone(), (rate(*r, pr), rate(*e, pe), rate(*d, pd)))
                        })
                        .collect();
                }
                self.previous = current;
                self.previous_at = Some(now);
                self.status = Some(v);
                self.error = None;
            }
            Err(e) => self.error = Some(e),
        }
    }

    fn render(&self, f: &mut Frame<'_>) {
        let [head, traffic, middle, bottom] = Layout::vertical([
            Constraint::Length(1),
            Constraint::Length(3),
            Constraint::Min(6),
            Constraint::Length(7),
        ])
        .areas(f.area());
        let empty = Value::Null;
        let v = self.status.as_ref().unwrap_or(&empty);
        self.header(f, head, v);
        traffic_line(f, traffic, &v["traffic"]);
        let [routes, upstreams] =
            Layout::horizontal([Constraint::Percentage(50), Constraint::Percentage(50)])
                .areas(middle);
        self.routes(f, routes, v);
        upstream_table(f, upstreams, v);
        let [ips, ids] =
            Layout::horizontal([Constraint::Percentage(50), Constraint::Percentage(50)])
                .areas(bottom);
        top_list(
            f,
            ips,
            "Top denied IPs (60s)",
            &v["traffic"]["top_denied_ips"],
        );
        top_list(
            f,
            ids,
            "Top denied identities (60s)",
            &v["traffic"]["top_denied_identities"],
        );
    }

    fn header(&self, f: &mut Frame<'_>, area: Rect, v: &Value) {
        let line = if let Some(e) = &self.error {
            Line::from(vec![
                Span::styled(" wraith top ", Style::new().add_modifier(Modifier::BOLD)),
                Span::styled(e.clone(), Style::new().fg(Color::Red)),
            ])
        } else {
            let reload = match &v["last_reload"] {
                Value::Null => "none".to_string(),
                r if r["ok"].as_bool() == Some(true) => "ok".to_string(),
                _ => "FAILED".to_string(),
            };
            Line::from(vec![
                Span::styled(
                    format!(" wraith {} ", s(&v["version"])),
                    Style::new().add_modifier(Modifier::BOLD),
                ),
                Span::raw(format!(
                    " up {}  gen {}  reload {}  {}",
                    human(v["uptime_secs"].as_u64().unwrap_or(0)),
                    v["generation"],
                    reload,
                    if v["draining"].as_bool() == Some(true) {
                        "DRAINING"
                    } else {
                        ""
                    }
                )),
                Span::styled("  q quits", Style::new().fg(Color::DarkGray)),
            ])
        };
        f.render_widget(Paragraph::new(line), area);
    }

    fn routes(&self, f: &mut Frame<'_>, area: Rect, v: &Value) {
        let mut rows: Vec<(String, Option<Rates>, u64)> = v["routes"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| {
                let name = s(&r["name"]);
                let rate = self.rates.get(&name).copied();
                (name, rate, r["requests"].as_u64().unwrap_or(0))
            })
            .collect();
        let rps = |r: &Option<Rates>| r.map_or(0.0, |r| r.0);
        rows.sort_by(|a, b| {
            rps(&b.1)
                .total_cmp(&rps(&a.1))
                .then(b.2.cmp(&a.2))
                .then(a.0.cmp(&b.0))
        });
        let table = Table::new(
            rows.into_iter().map(|(name, rate, total)| {
                // Rates need two samples: "-" until the second refresh.
                let f = |x: Option<f64>| x.map_or("-".to_string(), |x| format!("{x:.1}"));
                Row::new(vec![
                    name,
                    f(rate.map(|r| r.0)),
                    f(rate.map(|r| r.1)),
                    f(rate.map(|r| r.2)),
                    total.to_string(),
                ])
            }),
            [
                Constraint::Min(8),
                Constraint::Length(6),
                Constraint::Length(5),
                Constraint::Length(5),
                Constraint::Length(7),
            ],
        )
        .header(Row::new(vec!["ROUTE", "REQ/S", "5XX/S", "DEN/S", "TOTAL"]).style(bold()))
        .block(Block::bordered().title(" Top routes "));
        f.render_widget(table, area);
    }
}

fn traffic_line(f: &mut Frame<'_>, area: Rect, t: &Value) {
    let errors = t["errors_per_sec"].as_f64().unwrap_or(0.0);
    let line = Line::from(vec![
        Span::styled(
            format!("{:.1} req/s", t["requests_per_sec"].as_f64().unwrap_or(0.0)),
            bold(),
        ),
        Span::raw("   errors "),
        Span::styled(
            format!(
                "{errors:.1}/s ({:.1}%)",
                t["error_rate"].as_f64().unwrap_or(0.0) * 100.0
            ),
            if errors > 0.0 {
                Style::new().fg(Color::Red)
            } else {
                Style::new()
            },
        ),
        Span::raw(format!(
            "   denied {}   p50 {}   p99 {}",
            t["denied"].as_u64().unwrap_or(0),
            super::status::millis(&t["p50_ms"]),
            super::status::millis(&t["p99_ms"]),
        )),
    ]);
    f.render_widget(
        Paragraph::new(line).block(Block::bordered().title(format!(
            " Traffic, last {}s ",
            t["window_secs"].as_u64().unwrap_or(60)
        ))),
        area,
    );
}

fn upstream_table(f: &mut Frame<'_>, area: Rect, v: &Value) {
    let mut rows = Vec::new();
    for u in v["upstreams"].as_array().into_iter().flatten() {
        for e in u["endpoints"].as_array().into_iter().flatten() {
            let (health, style) = match e["health"].as_str() {
                Some("up") => ("up".to_string(), Style::new().fg(Color::Green)),
                Some(other) => (other.to_uppercase(), Style::new().fg(Color::Red)),
                None => ("?".to_string(), Style::new()),
            };
            rows.push(
                Row::new(vec![
                    s(&u["name"]),
                    // Plain HTTP is the common case; only a TLS endpoint keeps its scheme.
                    s(&e["address"]).trim_start_matches("http://").to_string(),
                    health,
                    e["in_flight"].to_string(),
                ])
                .style(style),
            );
        }
    }
    let table = Table::new(
        rows,
        [
            Constraint::Length(9),
            Constraint::Min(15),
            Constraint::Length(7),
            Constraint::Length(4),
        ],
    )
    .header(Row::new(vec!["UPSTREAM", "ENDPOINT", "HEALTH", "BUSY"]).style(bold()))
    .block(Block::bordered().title(" Upstreams "));
    f.render_widget(table, area);
}

fn top_list(f: &mut Frame<'_>, area: Rect, title: &str, list: &Value) {
    let rows: Vec<Row> = list
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| Row::new(vec![s(&e["name"]), e["count"].to_string()]))
        .collect();
    let table = Table::new(rows, [Constraint::Min(10), Constraint::Length(6)])
        .block(Block::bordered().title(format!(" {title} ")));
    f.render_widget(table, area);
}

fn bold() -> Style {
    Style::new().add_modifier(Modifier::BOLD)
}

fn s(v: &Value) -> String {
    v.as_str()
        .map(|t| super::printable(t).into_owned())
        .unwrap_or_else(|| v.to_string())
}

fn human(secs: u64) -> String {
    crate::config::units::format_duration(Duration::from_secs(secs))
}
