//! Prometheus metrics: the text exposition format rendered from the daemon's counters, and a
//! tiny HTTP/1.0 responder for `metrics = "ADDR:PORT"` in `[server]` (opt-in).
//!
//! The responder is a task of the daemon's event loop and owns no state: each scrape is forwarded to the
//! daemon's loop as a [`crate::control::Request::Metrics`] call over the same channel the control
//! socket uses, so the single-threaded pipeline is never shared. Requests are bounded in size
//! and time; anything but `GET /metrics` gets a 404.

use std::fmt::Write as _;
use std::net::SocketAddr;

use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use spa_shared::Micros;

/// Upper bounds of the grant latency histogram, in microseconds (packet heard → grant in the
/// kernel).
pub const LATENCY_BUCKETS_MICROS: &[u64] = &[
    100, 150, 200, 250, 300, 400, 500, 750, 1_000, 1_500, 2_000, 3_000, 5_000, 10_000, 25_000,
    50_000, 100_000, 250_000, 1_000_000,
];

/// Upper bounds of the journal sync histogram, in microseconds (one write and `fdatasync`):
/// fine below a few milliseconds, where a healthy disk is, so its median and tail can be told
/// apart from the grant latency they bound.
pub const SYNC_BUCKETS_MICROS: &[u64] = &[
    50, 100, 150, 200, 250, 300, 400, 500, 750, 1_000, 1_500, 2_000, 3_000, 5_000, 10_000, 25_000,
    100_000, 1_000_000, 10_000_000,
];

/// Upper bounds of the firewall apply histogram, in microseconds (one transaction that puts
/// grants in the kernel): tens of microseconds over netlink, milliseconds when `iptables`
/// and `ipset` run as processes.
pub const APPLY_BUCKETS_MICROS: &[u64] = &[
    10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000,
    500_000, 1_000_000,
];

/// A fixed-bucket histogram of microsecond values (cumulative counts are made when rendering).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Histogram {
    bounds: &'static [u64],
    /// Per bucket of `bounds`, plus one for values above the last bound.
    counts: Vec<u64>,
    sum_micros: u64,
}

impl Default for Histogram {
    /// The grant latency histogram.
    fn default() -> Self {
        Self::with_bounds(LATENCY_BUCKETS_MICROS)
    }
}

impl Histogram {
    /// An empty histogram with these (ascending) upper bounds.
    pub fn with_bounds(bounds: &'static [u64]) -> Self {
        Self {
            bounds,
            counts: vec![0; bounds.len() + 1],
            sum_micros: 0,
        }
    }

    pub fn observe(&mut self, micros: Micros) {
        let index = self
            .bounds
            .iter()
            .position(|&bound| micros <= bound)
            .unwrap_or(self.bounds.len());
        self.counts[index] = self.counts[index].saturating_add(1);
        self.sum_micros = self.sum_micros.saturating_add(micros);
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().fold(0u64, |a, b| a.saturating_add(*b))
    }

    pub fn sum_micros(&self) -> u64 {
        self.sum_micros
    }

    /// Appends the histogram as Prometheus family `name` (in seconds).
    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0u64;
        for (bound, count) in self.bounds.iter().zip(&self.counts) {
            cumulative = cumulative.saturating_add(*count);
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{}\"}} {cumulative}",
                seconds(*bound)
            );
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{le=\"+Inf\"}} {}\n{name}_sum {}\n{name}_count {}",
            self.count(),
            seconds(self.sum_micros),
            self.count()
        );
    }
}

/// Escapes a Prometheus label value (`\`, `"` and newlines).
pub fn label_value(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Help text for the counters [`crate::daemon::Stats::counters`] reports; unknown ones get a
/// generic line so a new counter is exported without touching this file.
fn counter_help(base: &str) -> String {
    match base {
        "packets" => "Packets heard (SPA datagrams and knock segments).".into(),
        "precheck_dropped" => {
            "SPA packets dropped by the keyed pre-check (no public-key work).".into()
        }
        "refused" => "SPA packets refused for any reason (pre-check included).".into(),
        "granted" => "Grants installed (SPA and knock doors).".into(),
        "closed" => "Grants closed on request (SPA close or close sequence).".into(),
        "knocks" => "Knock segments seen on watched ports.".into(),
        "unwatched" => {
            "Frames to a port nothing watches, passed by a widened prefilter; dropped before the knock engine.".into()
        }
        "reloads" => "Configuration reloads that took effect.".into(),
        "blacklistings" => "Sources put on the knock blacklist.".into(),
        "door_opens" => "Knock doors completed (open sequence heard), per door.".into(),
        "grants_by_service" => "Grants installed, per service and service kind.".into(),
        "knock_results" => "Knocks by what they came to (progress, open, reset, ...).".into(),
        "capture_received" => "Frames the capture read (own outgoing frames excluded).".into(),
        "capture_delivered" => "Frames the capture handed to the daemon.".into(),
        "capture_kernel_packets" => "Frames the kernel passed through the BPF prefilter.".into(),
        "capture_kernel_drops" => "Frames the kernel dropped: capture receive queue full.".into(),
        "capture_kernel_source_limited" => {
            "Frames the kernel's prefilter dropped: their source was over packet-rate.".into()
        }
        "capture_kernel_budget_engagements" => {
            "Times the per-source packet budget was engaged because spad fell behind.".into()
        }
        "capture_dropped" => "Frames the capture dropped in userspace, by reason.".into(),
        "capture_address_reads" => {
            "Reads of the host's address table (at start and when addresses change).".into()
        }
        other => format!("spad counter `{other}` (see docs/operations.md)."),
    }
}

/// What a scrape shows besides the counters.
#[derive(Debug, Clone, Default)]
pub struct Gauges {
    /// Live grants per service, from the kernel.
    pub active_grants: Vec<(String, u64)>,
    pub blacklisted: u64,
    pub start_time: Micros,
    pub config_load_time: Micros,
    /// The kernel's per-source packet budget: loaded, and engaged now.
    pub kernel_budget: (bool, bool),
    /// How long the replay journal's syncs took (stores that sync a local file).
    pub journal_syncs: Option<Histogram>,
    /// How long each firewall transaction that installed grants took.
    pub firewall_applies: Option<Histogram>,
}

/// Renders the whole scrape in the Prometheus text format (version 0.0.4).
pub fn render(counters: &[(String, u64)], latency: &Histogram, gauges: &Gauges) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP spad_build_info Build of the running spad.\n# TYPE spad_build_info gauge\nspad_build_info{{version=\"{}\"}} 1",
        label_value(env!("CARGO_PKG_VERSION"))
    );
    // Counters, grouped into families by the name before any `{labels}`.
    let mut families: Vec<(&str, Vec<(&str, u64)>)> = Vec::new();
    for (name, value) in counters {
        let (base, labels) = match name.find('{') {
            Some(i) => (&name[..i], &name[i..]),
            None => (name.as_str(), ""),
        };
        match families.iter_mut().find(|(b, _)| *b == base) {
            Some((_, samples)) => samples.push((labels, *value)),
            None => families.push((base, vec![(labels, *value)])),
        }
    }
    for (base, samples) in families {
        let _ = writeln!(
            out,
            "# HELP spad_{base}_total {}\n# TYPE spad_{base}_total counter",
            counter_help(base)
        );
        for (labels, value) in samples {
            let _ = writeln!(out, "spad_{base}_total{labels} {value}");
        }
    }
    latency.render(
        &mut out,
        "spad_grant_latency_seconds",
        "Time from hearing a packet to its grant being in the kernel.",
    );
    if let Some(syncs) = &gauges.journal_syncs {
        syncs.render(
            &mut out,
            "spad_journal_sync_seconds",
            "Time one replay journal write took to be durable (write and fdatasync): the floor under the grant latency.",
        );
    }
    if let Some(applies) = &gauges.firewall_applies {
        applies.render(
            &mut out,
            "spad_firewall_apply_seconds",
            "Time one firewall transaction that installs grants took (a netlink batch, or the iptables and ipset tools): with the journal sync, the part of the grant latency spent outside spad's own work.",
        );
    }
    let _ = writeln!(
        out,
        "# HELP spad_active_grants Grants live in the kernel now, per service.\n# TYPE spad_active_grants gauge"
    );
    for (service, n) in &gauges.active_grants {
        let _ = writeln!(
            out,
            "spad_active_grants{{service=\"{}\"}} {n}",
            label_value(service)
        );
    }
    let _ = writeln!(
        out,
        "# HELP spad_blacklisted_sources Sources on the knock blacklist now.\n# TYPE spad_blacklisted_sources gauge\nspad_blacklisted_sources {}",
        gauges.blacklisted
    );
    let _ = writeln!(
        out,
        "# HELP spad_capture_kernel_budget_loaded The per-source packet budget is loaded in the kernel (1) or not (0: none configured, or refused: see the log).\n# TYPE spad_capture_kernel_budget_loaded gauge\nspad_capture_kernel_budget_loaded {}\n# HELP spad_capture_kernel_budget_engaged The per-source packet budget is enforced now, because spad fell behind (1) or not (0).\n# TYPE spad_capture_kernel_budget_engaged gauge\nspad_capture_kernel_budget_engaged {}",
        u8::from(gauges.kernel_budget.0),
        u8::from(gauges.kernel_budget.1)
    );
    let _ = writeln!(
        out,
        "# HELP spad_start_time_seconds When this spad started (Unix time).\n# TYPE spad_start_time_seconds gauge\nspad_start_time_seconds {}",
        seconds(gauges.start_time)
    );
    let _ = writeln!(
        out,
        "# HELP spad_config_load_time_seconds When the running configuration was loaded (Unix time).\n# TYPE spad_config_load_time_seconds gauge\nspad_config_load_time_seconds {}",
        seconds(gauges.config_load_time)
    );
    out
}

/// Microseconds as decimal seconds without float rounding noise (`2500` → `0.0025`).
fn seconds(micros: u64) -> String {
    let whole = micros / 1_000_000;
    let frac = micros % 1_000_000;
    if frac == 0 {
        return whole.to_string();
    }
    let digits = format!("{frac:06}");
    format!("{whole}.{}", digits.trim_end_matches('0'))
}

/// Longest request head accepted; a scrape's is a few hundred bytes.
const MAX_REQUEST: usize = 8 * 1024;
/// How long one scrape may take to send its request or read the answer.
const IO_TIMEOUT: Duration = Duration::from_secs(2);

/// The bound metrics listener, before its task is started.
#[derive(Debug)]
pub struct Endpoint {
    listener: std::net::TcpListener,
}

impl Endpoint {
    /// Binds `address` (done before privileges are dropped).
    pub fn bind(address: SocketAddr) -> anyhow::Result<Self> {
        use anyhow::Context;
        let listener = std::net::TcpListener::bind(address)
            .with_context(|| format!("binding the metrics listener on {address}"))?;
        listener.set_nonblocking(true)?;
        Ok(Self { listener })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves scrapes as a task of the running event loop, one at a time; each asks `ask`
    /// for the current text.
    pub fn spawn<F, A>(self, ask: A) -> std::io::Result<()>
    where
        A: Fn() -> F + Send + Sync + 'static,
        F: std::future::Future<Output = Option<String>> + Send,
    {
        let listener = TcpListener::from_std(self.listener)?;
        tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        // Bounded in time: a stalled scraper cannot hold the endpoint.
                        let _ = tokio::time::timeout(IO_TIMEOUT * 2, serve_one(stream, &ask)).await;
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        Ok(())
    }
}

/// Reads a request head (bounded), answers `GET /metrics` with the text from `ask`.
async fn serve_one<F, A>(mut stream: TcpStream, ask: &A) -> std::io::Result<()>
where
    A: Fn() -> F,
    F: std::future::Future<Output = Option<String>>,
{
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        let n = tokio::time::timeout(IO_TIMEOUT, stream.read(&mut buf))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > MAX_REQUEST {
            return respond(
                &mut stream,
                "413 Payload Too Large",
                "text/plain",
                "too large\n",
            )
            .await;
        }
    }
    let first = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let first = String::from_utf8_lossy(first);
    let mut parts = first.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    if method != "GET" || path != "/metrics" {
        return respond(
            &mut stream,
            "404 Not Found",
            "text/plain",
            "try GET /metrics\n",
        )
        .await;
    }
    match ask().await {
        Some(text) => {
            respond(
                &mut stream,
                "200 OK",
                "text/plain; version=0.0.4; charset=utf-8",
                &text,
            )
            .await
        }
        None => {
            respond(
                &mut stream,
                "503 Service Unavailable",
                "text/plain",
                "spad is busy or stopping\n",
            )
            .await
        }
    }
}

async fn respond(
    stream: &mut TcpStream,
    status: &str,
    kind: &str,
    body: &str,
) -> std::io::Result<()> {
    let text = format!(
        "HTTP/1.0 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    tokio::time::timeout(IO_TIMEOUT, async {
        stream.write_all(text.as_bytes()).await?;
        stream.flush().await
    })
    .await
    .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_seconds_exact() {
        let mut h = Histogram::default();
        for v in [50, 100, 101, 3_000, 2_000_000] {
            h.observe(v);
        }
        let text = render(
            &[
                ("granted".into(), 3),
                (
                    "grants_by_service{service=\"ssh\",kind=\"management\"}".into(),
                    2,
                ),
                ("grants_by_service{service=\"vpn\",kind=\"vpn\"}".into(), 1),
            ],
            &h,
            &Gauges::default(),
        );
        assert!(
            text.contains("spad_grant_latency_seconds_bucket{le=\"0.0001\"} 2\n"),
            "{text}"
        );
        assert!(text.contains("spad_grant_latency_seconds_bucket{le=\"0.00025\"} 3\n"));
        assert!(text.contains("spad_grant_latency_seconds_bucket{le=\"0.005\"} 4\n"));
        assert!(text.contains("spad_grant_latency_seconds_bucket{le=\"1\"} 4\n"));
        assert!(text.contains("spad_grant_latency_seconds_bucket{le=\"+Inf\"} 5\n"));
        assert!(text.contains("spad_grant_latency_seconds_sum 2.003251\n"));
        assert!(text.contains("spad_granted_total 3\n"));
        // One family header for the labelled samples.
        assert_eq!(
            text.matches("# TYPE spad_grants_by_service_total counter")
                .count(),
            1
        );
        assert!(text.contains("spad_grants_by_service_total{service=\"vpn\",kind=\"vpn\"} 1\n"));
        assert!(
            !text.contains("spad_journal_sync_seconds"),
            "no journal, no sync family"
        );
    }

    /// The journal's syncs are their own family, with the finer buckets a disk needs.
    #[test]
    fn journal_syncs_are_a_histogram_of_their_own() {
        let mut syncs = Histogram::with_bounds(SYNC_BUCKETS_MICROS);
        for v in [120, 180, 190, 900, 40_000] {
            syncs.observe(v);
        }
        let gauges = Gauges {
            journal_syncs: Some(syncs),
            ..Gauges::default()
        };
        let text = render(&[], &Histogram::default(), &gauges);
        assert_eq!(
            text.matches("# TYPE spad_journal_sync_seconds histogram")
                .count(),
            1,
            "{text}"
        );
        for line in [
            "spad_journal_sync_seconds_bucket{le=\"0.0001\"} 0\n",
            "spad_journal_sync_seconds_bucket{le=\"0.00015\"} 1\n",
            "spad_journal_sync_seconds_bucket{le=\"0.0002\"} 3\n",
            "spad_journal_sync_seconds_bucket{le=\"0.001\"} 4\n",
            "spad_journal_sync_seconds_bucket{le=\"0.025\"} 4\n",
            "spad_journal_sync_seconds_bucket{le=\"0.1\"} 5\n",
            "spad_journal_sync_seconds_bucket{le=\"+Inf\"} 5\n",
            "spad_journal_sync_seconds_count 5\n",
            "spad_journal_sync_seconds_sum 0.04139\n",
        ] {
            assert!(text.contains(line), "{line}in\n{text}");
        }
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label_value("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
