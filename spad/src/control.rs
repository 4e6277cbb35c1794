//! The control socket: how `spad status`, `list`, `revoke` and `flush` talk to the running
//! daemon, so they work while the config on disk is broken and keep the daemon's view in sync.
//!
//! Server side: a Unix stream socket `control.sock` in the state directory (mode 0660, group
//! `spad` when that group exists; the directory gets `g+x` for it). A task of the event loop
//! accepts connections (at most [`CONNECTIONS`] at once), reads one JSON request line (at most
//! [`MAX_REQUEST`] bytes, within [`IO_TIMEOUT`]) and forwards it over a bounded channel to the
//! daemon's loop, which answers between batches ([`Hub::answer`]): the single-threaded pipeline
//! is never shared. The metrics endpoint uses the same channel. A call that reads every live
//! grant (`status`, `list`, metrics) leaves that read to another thread ([`prepare`]).
//!
//! Client side: the `spad` subcommands send a request and print the answer; when nothing
//! answers they say so and read the kernel directly with the config on disk.

use std::io::{Read, Write};
use std::net::IpAddr;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use spa_shared::Micros;

use crate::clock::Clock;
use crate::config::Config;
use crate::daemon::Pipeline;
use crate::firewall::{Firewall, KernelView, LiveGrant};
use crate::status::{Blacklisted, Grant, Info, Listing, Revoked, Status};

/// Longest request accepted on the control socket.
pub const MAX_REQUEST: usize = 4096;
/// How long a client may take to send its request or read the answer.
pub const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a connection waits for the daemon's loop to answer.
/// Connections served at once; more wait in the listen queue.
pub const CONNECTIONS: usize = 8;
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// Where the daemon's state lives when the config cannot say.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/spad";
/// The group whose members may use the control socket.
pub const GROUP: &str = "spad";

/// The control socket of a daemon whose state directory is `state_dir`.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join("control.sock")
}

/// One request on the control socket (one JSON line), e.g. `{"command":"status"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    Status,
    List,
    Revoke {
        #[serde(default)]
        address: Option<IpAddr>,
        #[serde(default)]
        client: Option<String>,
        #[serde(default)]
        services: Vec<String>,
    },
    /// Removes every grant; the protection stays.
    Flush,
    /// The Prometheus text (used by the metrics endpoint).
    Metrics,
}

/// A request waiting for the loop's answer.
#[derive(Debug)]
pub struct Call {
    pub request: Request,
    reply: oneshot::Sender<String>,
}

/// Lists grants and blacklisted sources from `firewall`.
pub fn listing(firewall: &mut dyn Firewall, source: &str) -> anyhow::Result<Listing> {
    Ok(listing_of(firewall.view()?, source))
}

/// The listing of what the kernel holds.
fn listing_of(view: KernelView, source: &str) -> Listing {
    Listing {
        source: source.into(),
        grants: view.grants.iter().map(Grant::from).collect(),
        blacklist: view
            .blacklisted
            .into_iter()
            .map(|(address, left)| Blacklisted {
                address,
                remaining_seconds: left.as_secs(),
            })
            .collect(),
    }
}

/// Revokes the grants of `address` (or of `client`) for `services` (all if empty) and returns
/// those that were live before and are gone after: what was actually removed.
pub fn revoke(
    firewall: &mut dyn Firewall,
    config: &Config,
    address: Option<IpAddr>,
    client: Option<&str>,
    services: &[String],
) -> anyhow::Result<Vec<LiveGrant>> {
    for s in services {
        if !config.services.contains_key(s) {
            bail!("unknown service `{s}`");
        }
    }
    let wanted: Vec<String> = if services.is_empty() {
        config.services.keys().cloned().collect()
    } else {
        services.to_vec()
    };
    let before = firewall.list()?;
    let targets: Vec<(IpAddr, Vec<String>)> = match (address, client) {
        (Some(address), _) => vec![(address, wanted)],
        (None, Some(client)) => {
            if !config.clients.contains_key(client) {
                bail!("unknown client `{client}`");
            }
            before
                .iter()
                .filter(|g| g.owner == client && wanted.contains(&g.service))
                .map(|g| (g.address, vec![g.service.clone()]))
                .collect()
        }
        (None, None) => bail!("give --address or --client"),
    };
    for (address, services) in &targets {
        firewall.revoke(*address, services)?;
    }
    removed(firewall, before, |g| {
        targets
            .iter()
            .any(|(a, s)| *a == g.address && s.contains(&g.service))
    })
}

/// Revokes every live grant (the ruleset, and so the protection, stays).
pub fn flush_grants(firewall: &mut dyn Firewall) -> anyhow::Result<Vec<LiveGrant>> {
    let before = firewall.list()?;
    let mut by_address: Vec<(IpAddr, Vec<String>)> = Vec::new();
    for g in &before {
        match by_address.iter_mut().find(|(a, _)| *a == g.address) {
            Some((_, services)) => services.push(g.service.clone()),
            None => by_address.push((g.address, vec![g.service.clone()])),
        }
    }
    for (address, services) in &by_address {
        firewall.revoke(*address, services)?;
    }
    removed(firewall, before, |_| true)
}

/// The grants of `before` that `targeted` selects and that the kernel no longer has.
fn removed(
    firewall: &mut dyn Firewall,
    before: Vec<LiveGrant>,
    targeted: impl Fn(&LiveGrant) -> bool,
) -> anyhow::Result<Vec<LiveGrant>> {
    let after = firewall.list()?;
    Ok(before
        .into_iter()
        .filter(|g| {
            targeted(g)
                && !after
                    .iter()
                    .any(|x| x.address == g.address && x.service == g.service)
        })
        .collect())
}

/// Answers one request with the pipeline's state: a JSON object `{"ok":true,"result":…}` or
/// `{"ok":false,"error":"…"}` (for `Metrics`, the Prometheus text).
pub fn answer<C: Clock>(pipeline: &mut Pipeline<C>, info: &Info, request: &Request) -> String {
    prepare(pipeline, info, request).text()
}

/// The answer to a call, as far as the loop goes: ready, or waiting for a read of the kernel
/// that another thread does (a dump of every grant must not stall the packets).
pub enum Answer {
    Now(String),
    Later(Box<dyn FnOnce() -> String + Send>),
}

impl std::fmt::Debug for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Now(text) => f.debug_tuple("Now").field(text).finish(),
            Self::Later(_) => f.write_str("Later(..)"),
        }
    }
}

impl Answer {
    /// The text, reading the kernel here if that is what is left to do.
    pub fn text(self) -> String {
        match self {
            Self::Now(text) => text,
            Self::Later(read) => read(),
        }
    }
}

fn ok_json(value: anyhow::Result<serde_json::Value>) -> String {
    match value {
        Ok(value) => serde_json::json!({ "ok": true, "result": value }),
        Err(e) => serde_json::json!({ "ok": false, "error": format!("{e:#}") }),
    }
    .to_string()
}

/// What finishes a call once the kernel has been read.
type WithKernel = Box<dyn FnOnce(anyhow::Result<KernelView>) -> String + Send>;

/// Does the loop's part of a call. `status`, `list` and a metrics scrape take what the loop
/// knows (counters, config) now and leave the kernel's part (every live grant) to a
/// [`crate::firewall::KernelReader`] on another thread, when the backend has one; without
/// one the kernel is read here. Revoke and flush change the kernel: on the loop, always.
pub fn prepare<C: Clock>(pipeline: &mut Pipeline<C>, info: &Info, request: &Request) -> Answer {
    let finish: WithKernel = match request {
        Request::Status => {
            let mut status = Status::running(
                info,
                &pipeline.config,
                pipeline.firewall.name(),
                pipeline.stats.counters(),
                pipeline.now(),
                None,
            );
            status.kernel_budget =
                Some(crate::status::kernel_budget_state(&pipeline.stats.capture).to_string());
            Box::new(move |view| {
                if let Ok(view) = view {
                    status.live_grants = Some(view.grants.len());
                    status.blacklisted = Some(view.blacklisted.len());
                }
                ok_json(serde_json::to_value(status).map_err(Into::into))
            })
        }
        Request::List => Box::new(|view| {
            ok_json(
                view.map(|view| listing_of(view, "daemon"))
                    .and_then(|l| Ok(serde_json::to_value(l)?)),
            )
        }),
        Request::Metrics => metrics_with_kernel(pipeline, info),
        Request::Revoke { .. } | Request::Flush => {
            return Answer::Now(change_on_the_loop(pipeline, request))
        }
    };
    match pipeline.firewall.reader() {
        Some(mut reader) => Answer::Later(Box::new(move || finish(reader.read()))),
        None => Answer::Now(finish(pipeline.firewall.view())),
    }
}

/// Revoke and flush, on the loop: they change the kernel.
fn change_on_the_loop<C: Clock>(pipeline: &mut Pipeline<C>, request: &Request) -> String {
    // A grant whose journal sync is still running must not land after the revoke.
    pipeline.settle(crate::daemon::SETTLE_AT_MOST);
    let result: anyhow::Result<serde_json::Value> = (|| match request {
        Request::Revoke {
            address,
            client,
            services,
        } => {
            let gone = revoke(
                &mut *pipeline.firewall,
                &pipeline.config,
                *address,
                client.as_deref(),
                services,
            )?;
            log_removed(pipeline, "revoked", &gone);
            Ok(serde_json::to_value(Revoked {
                source: "daemon".into(),
                revoked: gone.iter().map(Grant::from).collect(),
            })?)
        }
        Request::Flush => {
            let gone = flush_grants(&mut *pipeline.firewall)?;
            log_removed(pipeline, "flushed", &gone);
            Ok(serde_json::to_value(Revoked {
                source: "daemon".into(),
                revoked: gone.iter().map(Grant::from).collect(),
            })?)
        }
        Request::Status | Request::List | Request::Metrics => {
            bail!("not a change: answered by `prepare`")
        }
    })();
    ok_json(result)
}

fn log_removed<C: Clock>(pipeline: &mut Pipeline<C>, what: &str, gone: &[LiveGrant]) {
    let now = pipeline.now();
    let items: Vec<String> = gone
        .iter()
        .map(|g| format!("{}:{}", g.address, g.service))
        .collect();
    pipeline.log.line(
        now,
        &format!(
            "{what} by operator: {}",
            if items.is_empty() {
                "nothing".to_string()
            } else {
                items.join(" ")
            }
        ),
    );
}

/// The Prometheus text: counters and the latency histogram from the loop, the live grants
/// per service and the blacklist from the kernel.
fn metrics_with_kernel<C: Clock>(pipeline: &Pipeline<C>, info: &Info) -> WithKernel {
    let capture = &pipeline.stats.capture;
    let mut gauges = crate::metrics::Gauges {
        start_time: info.started,
        config_load_time: info.config_loaded,
        kernel_budget: (capture.kernel_budget, capture.budget_engaged),
        journal_syncs: pipeline.replay_sync_times().cloned(),
        firewall_applies: Some(pipeline.stats.firewall_applies.0.clone()),
        ..Default::default()
    };
    let services: Vec<String> = pipeline.config.services.keys().cloned().collect();
    let counters = pipeline.stats.counters();
    let latency = pipeline.stats.grant_latency.clone();
    Box::new(move |view| {
        let view = view.ok();
        let mut active: std::collections::BTreeMap<String, u64> =
            services.into_iter().map(|s| (s, 0)).collect();
        for g in view.iter().flat_map(|v| &v.grants) {
            *active.entry(g.service.clone()).or_default() += 1;
        }
        gauges.active_grants = active.into_iter().collect();
        gauges.blacklisted = view.map_or(0, |v| v.blacklisted.len() as u64);
        crate::metrics::render(&counters, &latency, &gauges)
    })
}

/// The bound control socket, before its thread starts.
#[derive(Debug)]
pub struct ControlSocket {
    listener: UnixListener,
}

impl ControlSocket {
    /// Binds `path` (refusing if another daemon answers there), mode 0660, group `spad`.
    pub fn bind(path: &Path) -> anyhow::Result<Self> {
        use std::os::unix::fs::PermissionsExt;
        if path.exists() {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                bail!(
                    "another spad answers on {}; stop it first (`spad status -c …` shows its pid)",
                    path.display()
                );
            }
            std::fs::remove_file(path)
                .with_context(|| format!("removing the stale socket {}", path.display()))?;
        }
        let listener = UnixListener::bind(path)
            .with_context(|| format!("binding the control socket {}", path.display()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
        if let Some(gid) = crate::privilege::group_id(GROUP) {
            // chown only where needed: under systemd (User=spad) both already have the group
            // and the system-call filter refuses chown. A daemon started as another user
            // that cannot give the group away keeps its own group: root and that group only.
            use std::os::unix::fs::MetadataExt;
            let dir = path.parent().unwrap_or(Path::new("."));
            let mut grouped = true;
            for p in [path, dir] {
                if std::fs::metadata(p)?.gid() != gid {
                    if let Err(e) = std::os::unix::fs::chown(p, None, Some(gid)) {
                        if rustix::process::geteuid().is_root() {
                            return Err(e).with_context(|| {
                                format!("giving {} to group {GROUP}", p.display())
                            });
                        }
                        grouped = false;
                    }
                }
            }
            let mode = std::fs::metadata(dir)?.permissions().mode() & 0o7777;
            if grouped && mode & 0o010 == 0 {
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode | 0o010))?;
            }
        }
        Ok(Self { listener })
    }

    /// Serves connections as tasks of the running event loop (at most [`CONNECTIONS`] at
    /// once, each bounded in time), forwarding requests to `calls`.
    pub fn spawn(self, calls: mpsc::Sender<Call>) -> std::io::Result<()> {
        self.listener.set_nonblocking(true)?;
        let listener = tokio::net::UnixListener::from_std(self.listener)?;
        let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(CONNECTIONS));
        tokio::spawn(async move {
            loop {
                let Ok(slot) = std::sync::Arc::clone(&slots).acquire_owned().await else {
                    return;
                };
                match listener.accept().await {
                    Ok((stream, _)) => {
                        let calls = calls.clone();
                        tokio::spawn(async move {
                            let _ = tokio::time::timeout(
                                IO_TIMEOUT * 2 + ANSWER_TIMEOUT,
                                serve_one(stream, &calls),
                            )
                            .await;
                            drop(slot);
                        });
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        Ok(())
    }
}

/// Reads one request line (bounded in size and time), waits for the loop's answer, writes it.
async fn serve_one(mut stream: UnixStream, calls: &mpsc::Sender<Call>) {
    let answer = match read_request(&mut stream).await {
        Ok(request) => ask(calls, request).await.unwrap_or_else(|| {
            serde_json::json!({"ok": false, "error": "the daemon did not answer in time"})
                .to_string()
        }),
        Err(e) => serde_json::json!({"ok": false, "error": e}).to_string(),
    };
    let _ = tokio::time::timeout(IO_TIMEOUT, async {
        stream.write_all(answer.as_bytes()).await?;
        stream.write_all(b"\n").await
    })
    .await;
}

async fn read_request(stream: &mut UnixStream) -> Result<Request, String> {
    let mut line = Vec::with_capacity(128);
    let mut buf = [0u8; 512];
    loop {
        let n = tokio::time::timeout(IO_TIMEOUT, stream.read(&mut buf))
            .await
            .map_err(|_| "reading the request: timed out".to_string())?
            .map_err(|e| format!("reading the request: {e}"))?;
        if n == 0 {
            break;
        }
        line.extend_from_slice(&buf[..n]);
        if line.len() > MAX_REQUEST {
            return Err(format!("request longer than {MAX_REQUEST} bytes"));
        }
        if line.contains(&b'\n') {
            break;
        }
    }
    let end = line.iter().position(|&b| b == b'\n').unwrap_or(line.len());
    serde_json::from_slice(&line[..end]).map_err(|e| format!("bad request: {e}"))
}

/// Forwards `request` to the loop and waits (bounded) for the answer.
pub async fn ask(calls: &mpsc::Sender<Call>, request: Request) -> Option<String> {
    let (reply, answer) = oneshot::channel();
    calls
        .send_timeout(Call { request, reply }, ANSWER_TIMEOUT)
        .await
        .ok()?;
    tokio::time::timeout(ANSWER_TIMEOUT, answer)
        .await
        .ok()?
        .ok()
}

/// The daemon's operator interfaces, driven from its loop: control socket, metrics endpoint
/// and systemd notifications.
#[derive(Debug)]
pub struct Hub {
    control: Option<ControlSocket>,
    metrics: Option<crate::metrics::Endpoint>,
    socket_file: PathBuf,
    pub info: Info,
    pub notify: crate::notify::Notifier,
    reloads_seen: u64,
}

impl Hub {
    /// Binds the control socket and (if configured) the metrics listener. Call while still
    /// privileged, before [`crate::privilege`] drops, and before any thread starts.
    pub fn bind(config: &Config, config_path: &Path, now: Micros) -> anyhow::Result<Self> {
        let (notify, problem) = crate::notify::Notifier::from_env();
        if let Some(p) = problem {
            crate::log::Logger::default().line(now, &p);
        }
        let socket_file = socket_path(&config.server.state_dir);
        let control = ControlSocket::bind(&socket_file)?;
        let metrics = config
            .server
            .metrics
            .map(crate::metrics::Endpoint::bind)
            .transpose()?;
        Ok(Self {
            control: Some(control),
            metrics,
            socket_file,
            info: Info {
                pid: std::process::id(),
                started: now,
                config_path: std::fs::canonicalize(config_path)
                    .unwrap_or_else(|_| config_path.to_path_buf()),
                config_loaded: now,
            },
            notify,
            reloads_seen: 0,
        })
    }

    /// Starts the operator tasks on the running event loop: the control socket, the metrics
    /// endpoint and the watchdog. Their requests arrive on the receiving end of `calls`.
    pub fn start(&mut self, calls: mpsc::Sender<Call>) -> std::io::Result<()> {
        if let Some(control) = self.control.take() {
            control.spawn(calls.clone())?;
        }
        if let Some(metrics) = self.metrics.take() {
            metrics.spawn(move || {
                let calls = calls.clone();
                async move { ask(&calls, Request::Metrics).await }
            })?;
        }
        self.notify.spawn_watchdog()
    }

    /// Tells systemd the daemon is ready (the ruleset is installed).
    pub fn ready<C: Clock>(&mut self, pipeline: &Pipeline<C>) {
        self.reloads_seen = pipeline.stats.reloads;
        self.notify.ready(&summary(pipeline));
    }

    pub fn reloading(&mut self) {
        self.notify.reloading();
    }

    /// After a reload attempt: records the load time if it took effect; READY=1 either way.
    pub fn reloaded<C: Clock>(&mut self, pipeline: &Pipeline<C>) {
        let ok = pipeline.stats.reloads != self.reloads_seen;
        self.reloads_seen = pipeline.stats.reloads;
        if ok {
            self.info.config_loaded = pipeline.now();
        }
        let status = if ok {
            summary(pipeline)
        } else {
            format!(
                "reload failed, running the previous config; {}",
                summary(pipeline)
            )
        };
        self.notify.ready(&status);
    }

    /// Answers one request from an operator task (the caller may have given up waiting).
    /// Answers a call: at once, or, for a read of every grant, from a blocking-pool thread
    /// while the loop goes back to the packets.
    pub fn answer<C: Clock>(&mut self, pipeline: &mut Pipeline<C>, call: Call) {
        match prepare(pipeline, &self.info, &call.request) {
            Answer::Now(text) => {
                let _ = call.reply.send(text);
            }
            Answer::Later(read) => {
                let reply = call.reply;
                tokio::task::spawn_blocking(move || {
                    let _ = reply.send(read());
                });
            }
        }
    }

    pub fn stopping(&mut self) {
        self.notify.stopping();
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.socket_file);
    }
}

fn summary<C: Clock>(pipeline: &Pipeline<C>) -> String {
    format!(
        "listening on {}/udp; {} services, {} clients; {} grants so far",
        pipeline.config.server.port,
        pipeline.config.services.len(),
        pipeline.config.clients.len(),
        pipeline.stats.granted
    )
}

// ---- client side (the `spad` subcommands) ----

/// The control socket for a config file: `--state-dir`, else the file's `state-dir` read
/// leniently (a config that fails validation still names it), else the default.
pub fn socket_for(config: &Path, state_dir: Option<&Path>) -> PathBuf {
    if let Some(dir) = state_dir {
        return socket_path(dir);
    }
    let dir = std::fs::read_to_string(config)
        .ok()
        .and_then(|text| text.parse::<toml::Table>().ok())
        .map(|table| {
            let value = table
                .get("server")
                .and_then(|s| s.get("state-dir"))
                .and_then(|v| v.as_str())
                .unwrap_or(DEFAULT_STATE_DIR)
                .to_string();
            let base = config.parent().unwrap_or(Path::new(""));
            crate::config::resolve(base, &value)
        })
        .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
    socket_path(&dir)
}

/// Sends `request` to the daemon on `socket`. `Ok(None)`: no daemon listens there.
pub fn request(socket: &Path, request: &Request) -> anyhow::Result<Option<serde_json::Value>> {
    use std::io::ErrorKind;
    let mut stream = match std::os::unix::net::UnixStream::connect(socket) {
        Ok(s) => s,
        Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::ConnectionRefused) => {
            return Ok(None)
        }
        Err(e) if e.kind() == ErrorKind::PermissionDenied => bail!(
            "cannot use {}: permission denied (run as root or as a member of group `{GROUP}`)",
            socket.display()
        ),
        Err(e) => return Err(e).with_context(|| format!("connecting to {}", socket.display())),
    };
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    stream.set_read_timeout(Some(ANSWER_TIMEOUT + IO_TIMEOUT))?;
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    stream.write_all(&line)?;
    let mut text = String::new();
    stream
        .take(64 << 20)
        .read_to_string(&mut text)
        .with_context(|| format!("reading the answer on {}", socket.display()))?;
    let value: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("the daemon on {} sent a bad answer", socket.display()))?;
    if value["ok"] != serde_json::Value::Bool(true) {
        bail!(
            "the daemon refused: {}",
            value["error"].as_str().unwrap_or("no reason given")
        );
    }
    Ok(Some(value["result"].clone()))
}

fn print_json(value: &impl Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn no_daemon(socket: &Path) {
    eprintln!(
        "spad: no daemon answers on {}; reading the kernel directly with the config on disk",
        socket.display()
    );
}

fn config_on_disk(config: &Path, state_dir: Option<&Path>) -> anyhow::Result<Config> {
    let overrides = crate::daemon::Overrides {
        state_dir: state_dir.map(Path::to_path_buf),
    };
    crate::daemon::load_config(config, &overrides)
}

/// `spad status`.
pub fn status_command(config: &Path, state_dir: Option<&Path>, json: bool) -> anyhow::Result<()> {
    let socket = socket_for(config, state_dir);
    let status = match request(&socket, &Request::Status)? {
        Some(value) => serde_json::from_value(value)?,
        None => {
            let mut status = Status {
                socket: socket.display().to_string(),
                ..Status::default()
            };
            // Best effort: what the kernel holds, if the config on disk can say where.
            if let Ok(c) = config_on_disk(config, state_dir) {
                status.table = Some(c.server.table.clone());
                if let Ok(mut fw) = crate::firewall::open(&c) {
                    if let (Ok(g), Ok(b)) = (fw.list(), fw.blacklisted()) {
                        status.live_grants = Some(g.len());
                        status.blacklisted = Some(b.len());
                    }
                }
            }
            status
        }
    };
    if json {
        print_json(&status)?;
    } else {
        print!("{}", status.text());
    }
    if status.running {
        Ok(())
    } else {
        Err(NotRunning.into())
    }
}

/// `spad status` found no daemon: exit status 3 (as `systemctl status` for an inactive unit),
/// after printing the status.
#[derive(Debug, thiserror::Error)]
#[error("no daemon is running")]
pub struct NotRunning;

impl NotRunning {
    /// The exit status `spad status` gives when no daemon answers.
    pub const EXIT_CODE: u8 = 3;
}

/// `spad list`.
pub fn list_command(config: &Path, state_dir: Option<&Path>, json: bool) -> anyhow::Result<()> {
    let socket = socket_for(config, state_dir);
    let listing: Listing = match request(&socket, &Request::List)? {
        Some(value) => serde_json::from_value(value)?,
        None => {
            no_daemon(&socket);
            let c = config_on_disk(config, state_dir)?;
            listing(&mut *crate::firewall::open(&c)?, "kernel")?
        }
    };
    if json {
        print_json(&listing)
    } else {
        print!("{}", listing.text());
        Ok(())
    }
}

/// `spad revoke`.
pub fn revoke_command(
    config: &Path,
    state_dir: Option<&Path>,
    address: Option<IpAddr>,
    client: Option<String>,
    services: Vec<String>,
    json: bool,
) -> anyhow::Result<()> {
    let socket = socket_for(config, state_dir);
    let ask = Request::Revoke {
        address,
        client: client.clone(),
        services: services.clone(),
    };
    let revoked: Revoked = match request(&socket, &ask)? {
        Some(value) => serde_json::from_value(value)?,
        None => {
            no_daemon(&socket);
            let c = config_on_disk(config, state_dir)?;
            let mut fw = crate::firewall::open(&c)?;
            let gone = revoke(&mut *fw, &c, address, client.as_deref(), &services)?;
            Revoked {
                source: "kernel".into(),
                revoked: gone.iter().map(Grant::from).collect(),
            }
        }
    };
    if json {
        print_json(&revoked)
    } else {
        print!("{}", revoked.text());
        Ok(())
    }
}

/// `spad flush` through the daemon: every grant removed, protection kept. `Ok(false)` when no
/// daemon answers (the caller then acts on the kernel itself).
pub fn flush_via_daemon(
    config: &Path,
    state_dir: Option<&Path>,
    json: bool,
) -> anyhow::Result<bool> {
    let socket = socket_for(config, state_dir);
    let Some(value) = request(&socket, &Request::Flush)? else {
        no_daemon(&socket);
        return Ok(false);
    };
    let revoked: Revoked = serde_json::from_value(value)?;
    if json {
        print_json(&revoked)?;
    } else {
        print!("{}", revoked.text());
        println!("(the ruleset stays installed: protected ports remain closed to others)");
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::firewall::memory::Memory;
    use crate::firewall::Access;
    use spa_shared::keys::PrivateKey;
    use spa_shared::packet::Server;

    const NOW: Micros = 1_763_726_400_000_000;

    fn pipeline<'a>(clock: &'a ManualClock, name: &str) -> (Pipeline<&'a ManualClock>, PathBuf) {
        pipeline_with(clock, name, Memory::default())
    }

    fn pipeline_with<'a>(
        clock: &'a ManualClock,
        name: &str,
        firewall: Memory,
    ) -> (Pipeline<&'a ManualClock>, PathBuf) {
        let dir = std::env::temp_dir().join(format!("spad-control-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let text = format!(
            "[server]\nprivate-key = \"k\"\nstate-dir = \"{}\"\n[services.ssh]\nkind = \"management\"\nports = [\"22/tcp\"]\ntimeout = \"30s\"\n[services.vpn]\nkind = \"vpn\"\nports = [\"51820/udp\"]\ntimeout = \"30s\"\n[clients.alice]\npublic-key = \"{}\"\nservices = [\"ssh\", \"vpn\"]\n",
            dir.display(),
            PrivateKey::from_bytes([1; 32]).public_key()
        );
        let config = Config::parse(&dir.join("spad.toml"), &text).unwrap();
        let server = Server::new(PrivateKey::from_bytes([2; 32]));
        let p = Pipeline::new(config, server, Box::new(firewall), clock).unwrap();
        (p, dir)
    }

    /// Alice's SPA packet opening `service`, from 198.51.100.7, through the whole pipeline.
    fn alice_opens(p: &mut Pipeline<&ManualClock>, service: &str) {
        alice_opens_at(p, service, NOW);
    }

    fn alice_opens_at(p: &mut Pipeline<&ManualClock>, service: &str, timestamp: Micros) {
        use spa_shared::payload::{Kind, Request as SpaRequest};
        let request = SpaRequest {
            kind: Kind::Open,
            timestamp,
            nonce: [7; 16],
            duration_secs: 0,
            address: None,
            services: vec![service.into()],
        };
        let packet = spa_shared::packet::seal(
            &mut rand_core::OsRng,
            &PrivateKey::from_bytes([1; 32]),
            &PrivateKey::from_bytes([2; 32]).public_key(),
            &request,
        )
        .unwrap();
        p.handle(&crate::capture::Received::Udp {
            source: "198.51.100.7".parse().unwrap(),
            source_port: 40000,
            port: 62201,
            payload: &packet,
        });
    }

    fn grant(p: &mut Pipeline<&ManualClock>, address: &str, service: &str) {
        p.firewall
            .grant(&[Access {
                address: address.parse().unwrap(),
                service: service.into(),
                timeout: Duration::from_secs(30),
                idle: None,
                owner: "alice".into(),
            }])
            .unwrap();
    }

    fn info() -> Info {
        Info {
            pid: 42,
            started: NOW,
            config_path: "/etc/spad/spad.toml".into(),
            config_loaded: NOW,
        }
    }

    fn call(p: &mut Pipeline<&ManualClock>, request: Request) -> serde_json::Value {
        let text = answer(p, &info(), &request);
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["ok"], true, "{text}");
        v["result"].clone()
    }

    #[test]
    fn revoke_reports_only_what_was_removed() {
        let clock = ManualClock::new(NOW);
        let (mut p, dir) = pipeline(&clock, "revoke");
        grant(&mut p, "198.51.100.7", "ssh");
        let r = call(
            &mut p,
            Request::Revoke {
                address: Some("198.51.100.7".parse().unwrap()),
                client: None,
                services: vec![],
            },
        );
        let r: Revoked = serde_json::from_value(r).unwrap();
        assert_eq!(r.revoked.len(), 1, "ssh was live, vpn was not: {r:?}");
        assert_eq!(r.revoked[0].service, "ssh");
        let again = call(
            &mut p,
            Request::Revoke {
                address: Some("198.51.100.7".parse().unwrap()),
                client: None,
                services: vec![],
            },
        );
        assert_eq!(again["revoked"].as_array().unwrap().len(), 0);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn status_and_flush_through_the_loop() {
        let clock = ManualClock::new(NOW);
        let (mut p, dir) = pipeline(&clock, "status");
        grant(&mut p, "198.51.100.7", "ssh");
        grant(&mut p, "198.51.100.8", "vpn");
        clock.advance(90_000_000);
        let s: Status = serde_json::from_value(call(&mut p, Request::Status)).unwrap();
        assert!(s.running);
        assert_eq!((s.pid, s.uptime_seconds), (Some(42), Some(90)));
        assert_eq!((s.live_grants, s.blacklisted), (Some(2), Some(0)));
        assert_eq!(s.backend.as_deref(), Some("memory"));
        assert!(s.counters.iter().any(|c| c.name == "packets"));
        let f: Revoked = serde_json::from_value(call(&mut p, Request::Flush)).unwrap();
        assert_eq!(f.revoked.len(), 2);
        assert!(p.firewall.list().unwrap().is_empty());
        let bad = answer(
            &mut p,
            &info(),
            &Request::Revoke {
                address: None,
                client: Some("nobody".into()),
                services: vec![],
            },
        );
        assert!(
            bad.contains("\"ok\":false") && bad.contains("unknown client"),
            "{bad}"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// An operator's revoke while the client's grant still waits for its journal sync: the
    /// grant lands first and the revoke removes it; it never lands after the revoke.
    /// `status`, `list` and a metrics scrape leave their read of the kernel (every grant) to
    /// another thread: while that read is held, the loop decides and grants a packet; the
    /// answers then carry what the reader saw. Revoke and flush stay on the loop.
    #[test]
    fn status_list_and_metrics_read_the_kernel_off_the_loop() {
        let clock = ManualClock::new(NOW);
        let (views, gate) = std::sync::mpsc::channel();
        let firewall = Memory {
            gated_reads: Some(std::sync::Arc::new(std::sync::Mutex::new(gate))),
            ..Memory::default()
        };
        let (mut p, dir) = pipeline_with(&clock, "offloop", firewall);
        let seen = KernelView {
            grants: vec![LiveGrant {
                address: "203.0.113.9".parse().unwrap(),
                service: "vpn".into(),
                remaining: Duration::from_secs(20),
                owner: "bob".into(),
            }],
            blacklisted: vec![("192.0.2.66".parse().unwrap(), Duration::from_secs(60))],
        };
        let requests = [Request::Status, Request::List, Request::Metrics];
        for (n, request) in requests.into_iter().enumerate() {
            let answer = prepare(&mut p, &info(), &request);
            assert!(
                matches!(answer, Answer::Later(_)),
                "{request:?}: {answer:?}"
            );
            let reading = std::thread::spawn(move || answer.text());
            // The read waits for the gate; the loop is free meanwhile.
            let service = ["ssh", "vpn", "ssh"][n];
            if n > 0 {
                clock.advance(1_000_000);
            }
            alice_opens_at(&mut p, service, NOW + n as u64 * 1_000_000);
            assert!(
                p.firewall
                    .list()
                    .unwrap()
                    .iter()
                    .any(|g| g.service == service),
                "granted while {request:?} reads the kernel"
            );
            views.send(seen.clone()).unwrap();
            let text = reading.join().unwrap();
            match request {
                Request::Status => {
                    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
                    assert_eq!(v["result"]["live_grants"], 1, "{text}");
                    assert_eq!(v["result"]["blacklisted"], 1, "{text}");
                }
                Request::List => {
                    assert!(
                        text.contains("203.0.113.9") && text.contains("192.0.2.66"),
                        "{text}"
                    );
                }
                _ => {
                    assert!(
                        text.contains("spad_active_grants{service=\"vpn\"} 1"),
                        "{text}"
                    );
                    assert!(
                        text.contains("spad_active_grants{service=\"ssh\"} 0"),
                        "{text}"
                    );
                    assert!(text.contains("spad_blacklisted_sources 1"), "{text}");
                }
            }
        }
        for request in [
            Request::Flush,
            Request::Revoke {
                address: None,
                client: Some("alice".into()),
                services: Vec::new(),
            },
        ] {
            let answer = prepare(&mut p, &info(), &request);
            assert!(
                matches!(answer, Answer::Now(_)),
                "{request:?} changes the kernel: on the loop"
            );
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_revoke_settles_a_grant_waiting_for_its_sync_first() {
        let clock = ManualClock::new(NOW);
        let (mut p, dir) = pipeline(&clock, "settle");
        let mut store = crate::state::ReplayStore::load(
            dir.join("bg.bin"),
            spa_shared::replay::Window::default(),
            NOW,
        )
        .0;
        let gate = store.gate_background_syncs(std::sync::Arc::new(|| {}));
        p.use_replay_store(Box::new(store));
        alice_opens(&mut p, "ssh");
        assert!(
            p.firewall.list().unwrap().is_empty(),
            "waiting for its sync"
        );
        gate.send(true).unwrap();
        let text = answer(
            &mut p,
            &info(),
            &Request::Revoke {
                address: None,
                client: Some("alice".into()),
                services: Vec::new(),
            },
        );
        assert!(
            text.contains("198.51.100.7"),
            "the revoke removed it: {text}"
        );
        p.commit_done();
        p.flush();
        assert!(
            p.firewall.list().unwrap().is_empty(),
            "the grant must not land after the revoke"
        );
        drop(gate);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_grant_shows_in_the_metrics_by_service_with_its_latency_and_firewall_time() {
        let clock = ManualClock::new(NOW);
        let (mut p, dir) = pipeline(&clock, "metrics");
        alice_opens(&mut p, "vpn");
        let text = answer(&mut p, &info(), &Request::Metrics);
        for needle in [
            "spad_granted_total 1\n",
            "spad_grants_by_service_total{service=\"vpn\",kind=\"vpn\"} 1\n",
            "spad_grant_latency_seconds_count 1\n",
            "spad_firewall_apply_seconds_count 1\n",
            "# TYPE spad_firewall_apply_seconds histogram\n",
            "spad_active_grants{service=\"vpn\"} 1\n",
            "spad_active_grants{service=\"ssh\"} 0\n",
            "spad_start_time_seconds 1763726400\n",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn requests_are_bounded_and_parsed_over_a_real_socket() {
        let dir = std::env::temp_dir().join(format!("spad-control-sock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = socket_path(&dir);
        let socket = ControlSocket::bind(&path).unwrap();
        assert!(
            ControlSocket::bind(&path).is_err(),
            "a second daemon must not steal the socket"
        );
        // The socket's task on an event loop of its own thread, with a stand-in for the
        // daemon's loop that answers every call with its request's debug form.
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let (tx, mut rx) = mpsc::channel::<Call>(4);
                socket.spawn(tx).unwrap();
                ready_tx.send(()).unwrap();
                while let Some(call) = rx.recv().await {
                    let _ = call.reply.send(
                        serde_json::json!({"ok": true, "result": format!("{:?}", call.request)})
                            .to_string(),
                    );
                }
            });
        });
        ready_rx.recv().unwrap();
        let got = request(&path, &Request::List).unwrap().unwrap();
        assert_eq!(got, "List");
        // Oversized and malformed requests get an error, not a hang or a crash.
        let mut s = std::os::unix::net::UnixStream::connect(&path).unwrap();
        let _ = s.write_all(&vec![b'x'; MAX_REQUEST + 10]);
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        assert!(text.contains("longer than"), "{text}");
        let mut s = std::os::unix::net::UnixStream::connect(&path).unwrap();
        s.write_all(b"{\"command\":\"reboot\"}\n").unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        assert!(text.contains("bad request"), "{text}");
        // No daemon: None, so the CLI falls back.
        assert!(request(&dir.join("none.sock"), &Request::Status)
            .unwrap()
            .is_none());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_socket_is_found_from_a_config_that_fails_validation() {
        let dir = std::env::temp_dir().join(format!("spad-control-find-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("spad.toml");
        std::fs::write(&config, "[server]\nstate-dir = \"st\"\nbogus = 1\n").unwrap();
        assert!(Config::load(&config).is_err());
        assert_eq!(socket_for(&config, None), dir.join("st/control.sock"));
        std::fs::write(&config, "not toml [").unwrap();
        assert_eq!(
            socket_for(&config, None),
            Path::new(DEFAULT_STATE_DIR).join("control.sock")
        );
        assert_eq!(
            socket_for(&config, Some(Path::new("/x"))),
            Path::new("/x/control.sock")
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
