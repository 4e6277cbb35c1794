//! The daemon's event loop: a current-thread tokio runtime around the synchronous
//! [`Pipeline`].
//!
//! One task, this loop, owns the pipeline and waits on everything that can move it:
//!
//! - the capture sockets, through [`AsyncFd`] (a readable socket means frames are waiting:
//!   they are drained in batches of up to [`BATCH`], then one journal commit and one firewall
//!   transaction for the batch);
//! - the journal's sync thread ([`crate::journal_sync`]): the loop starts a batch's commit and
//!   goes on; when the `fdatasync` is done the thread notifies the loop, which installs that
//!   batch's grants and starts the next commit for whatever was decided meanwhile. A slow or
//!   hung disk delays SPA grants only, never the capture, the guard or the control socket;
//! - the signals (`SIGTERM`/`SIGINT` stop, `SIGHUP` reloads) through `tokio::signal`;
//! - requests from the control socket and the metrics endpoint, each its own task
//!   ([`crate::control`], [`crate::metrics`]) that hands the loop a [`Call`] and awaits the
//!   answer, so the pipeline is never shared;
//! - the ruleset guard: the nftables netlink monitor through [`AsyncFd`], and its timer;
//! - a 200 ms housekeeping tick (knock timers, capture counters).
//!
//! The systemd watchdog is a task of its own: on one thread it only runs when this loop
//! yields, so a loop stuck in a system call stops the pings and systemd restarts spad.
//!
//! Nothing here allocates per packet: a received frame is borrowed from the capture ring
//! and handed to [`Pipeline::decide`].

use std::future::poll_fn;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::task::{Context as TaskContext, Poll, Waker};
use std::time::Duration;

use anyhow::Context;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::mpsc;

use crate::capture::{self, stats::CaptureStats, stats::DropWatch, Source};
use crate::clock::{Clock, SystemClock};
use crate::config::{CaptureMode, Config};
use crate::control::{Call, Hub};
use crate::daemon::{load, watches, Overrides, Pipeline, BATCH};
use crate::firewall::guard::Guard;

/// How often the loop does its housekeeping when no packet wakes it.
const TICK: Duration = Duration::from_millis(200);
/// A batch at least this big that emptied the ring means the source is busy ...
const HOLD_OFF_AFTER: usize = 16;
/// ... so the loop waits this long before it sleeps in epoll, letting frames gather in the
/// ring (4,096 slots: 10 ms of a 400k/s flood), as NAPI does for a network card. Each wake-up
/// costs a context switch; under a flood, taking a few frames per wake-up made the switches
/// a third of spad's CPU, and the hold-off nearly doubles the frames handled per
/// core-second (README, "Performance"). Legitimate packets wait at most this much longer, and
/// only under load; the operator tasks wait with them.
const HOLD_OFF: Duration = Duration::from_micros(200);
/// How long stopping waits for a journal sync in flight (its grants are refused after that).
const STOP_WAITS_FOR_SYNC: Duration = Duration::from_secs(2);
/// Requests from the operator tasks that may wait for the loop at once.
const CALL_QUEUE: usize = 16;

/// Runs until SIGTERM/SIGINT. SIGHUP reloads the config file.
pub fn run(config_path: PathBuf, overrides: Overrides) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .context("starting the event loop")?;
    let result = runtime.block_on(serve(config_path, overrides));
    // A read of the kernel for a control call may still run on a blocking thread (a hung
    // `ipset save`, say): exit without waiting long for it.
    runtime.shutdown_timeout(SHUTDOWN_WAITS_FOR_READS);
    result
}

/// How long exiting waits for the control calls' kernel reads still running.
const SHUTDOWN_WAITS_FOR_READS: Duration = Duration::from_secs(1);

/// Registers a duplicate of `fd` with the reactor, for readability. The duplicate shares
/// the socket (its readiness and its queue) and belongs to the returned `AsyncFd` alone.
fn watch(fd: BorrowedFd<'_>) -> std::io::Result<AsyncFd<OwnedFd>> {
    let owned = fd.try_clone_to_owned()?;
    // `owned` is moved into the `AsyncFd`, which alone can close it: it stays open, keeps its
    // number and refers to the same file description until the `AsyncFd` drops it.
    // SAFETY: that is what `register_with_interest` requires of the descriptor.
    let registered = unsafe { AsyncFd::register_with_interest(owned, Interest::READABLE) };
    Ok(registered?)
}

/// A packet source and the reactor registrations of its sockets.
struct Capture {
    /// Duplicates of the source's sockets, registered with the reactor.
    wakers: Vec<AsyncFd<OwnedFd>>,
    source: Box<dyn Source>,
}

impl Capture {
    fn new(source: Box<dyn Source>) -> std::io::Result<Self> {
        let wakers = source
            .wake_fds()
            .into_iter()
            .map(watch)
            .collect::<std::io::Result<_>>()?;
        Ok(Self { wakers, source })
    }

    /// Resolves when any socket of the source may have frames waiting.
    async fn readable(&self) -> std::io::Result<()> {
        poll_fn(|cx| {
            for waker in &self.wakers {
                match waker.poll_read_ready(cx) {
                    // Dropping the guard keeps the readiness: it is cleared by `ran_dry`.
                    Poll::Ready(Ok(_)) => return Poll::Ready(Ok(())),
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {}
                }
            }
            Poll::Pending
        })
        .await
    }

    /// After the source reported nothing waiting: forget the readiness, so the loop sleeps
    /// until the kernel signals a new frame. No await separates the empty read from this, so
    /// the reactor cannot have taken in a newer event that this would wrongly clear (tokio
    /// clears only the readiness it handed out).
    fn ran_dry(&self) {
        let mut cx = TaskContext::from_waker(Waker::noop());
        for waker in &self.wakers {
            if let Poll::Ready(Ok(mut guard)) = waker.poll_read_ready(&mut cx) {
                guard.clear_ready();
            }
        }
    }
}

/// The signals the daemon answers.
struct Signals {
    terminate: Signal,
    interrupt: Signal,
    hangup: Signal,
}

impl Signals {
    fn install() -> std::io::Result<Self> {
        Ok(Self {
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
            hangup: signal(SignalKind::hangup())?,
        })
    }
}

/// Opens the packet source the config asks for, its prefilter passing `ports` (the config's
/// own, or while a reload is pending [`capture::pending_watches`]). An AF_PACKET capture gets
/// the daemon's one eBPF prefilter, loaded by the first capture (before the privilege drop)
/// and attached by every later one (see [`capture::program`]).
fn open_source(
    config: &Config,
    ports: &(Vec<capture::bpf::Watch>, bool),
    program: &mut capture::program::OneProgram,
) -> anyhow::Result<Box<dyn Source>> {
    Ok(match config.server.capture {
        CaptureMode::AfPacket => Box::new(capture::AfPacket::open(
            &config.server.interfaces,
            &ports.0,
            ports.1,
            capture::slot_size(config),
            capture::afpacket::Prefilter::Ebpf(
                program.get().map_err(|e| e.to_string()),
                config.server.packet_budget(),
            ),
        )?),
        CaptureMode::Udp => Box::new(
            capture::UdpListener::open(config.server.port).context("binding the UDP listener")?,
        ),
    })
}

fn describe_capture(config: &Config) -> String {
    match config.server.capture {
        CaptureMode::AfPacket if config.server.interfaces.is_empty() => {
            "af-packet on all interfaces".to_string()
        }
        CaptureMode::AfPacket => format!("af-packet on {}", config.server.interfaces.join(",")),
        CaptureMode::Udp => "udp listener".to_string(),
    }
}

/// Warns when a newly opened capture could not put the per-source budget in the kernel.
fn say_if_budget_refused(source: &dyn capture::Source, log: &mut crate::log::Logger) {
    if let Some(why) = source.budget_refused() {
        log.line(
            SystemClock.now(),
            &format!("warning: packet-rate is not enforced in the kernel ({why}); spad's own per-source limits still apply"),
        );
    }
}

/// What the log says about the kernel's per-source budget: one line when it engages, and
/// one when it has stayed released for [`BUDGET_QUIET`]. Under a long flood it engages and
/// releases every few seconds (see `capture::pressure`); the log says so once, not each time.
#[derive(Debug, Default)]
struct BudgetLog {
    said_engaged: bool,
    released_since: Option<std::time::Instant>,
}

/// How long the budget must stay released before the log says so.
const BUDGET_QUIET: Duration = Duration::from_secs(30);

impl BudgetLog {
    /// The line to log for the budget's state now, if any.
    fn observe(
        &mut self,
        engaged: bool,
        now: std::time::Instant,
        rate: u32,
        engagements: u64,
        cut: u64,
    ) -> Option<String> {
        if engaged {
            self.released_since = None;
            if !self.said_engaged {
                self.said_engaged = true;
                return Some(format!("capture: spad is falling behind; the per-source packet budget is engaged ({rate}/s per source, while spad falls behind)"));
            }
            return None;
        }
        if !self.said_engaged {
            return None;
        }
        let since = *self.released_since.get_or_insert(now);
        if now.duration_since(since) < BUDGET_QUIET {
            return None;
        }
        self.said_engaged = false;
        self.released_since = None;
        Some(format!(
            "capture: the per-source packet budget has stayed released for {} s (engaged {engagements} times in all, {cut} frames cut)",
            BUDGET_QUIET.as_secs()
        ))
    }
}

/// Everything the loop owns.
struct Daemon {
    config_path: PathBuf,
    overrides: Overrides,
    pipeline: Pipeline<SystemClock>,
    capture: Capture,
    /// The capture's eBPF prefilter, loaded once for the daemon's life: a capture a reload
    /// opens after the privilege drop attaches it again.
    program: capture::program::OneProgram,
    /// Counters of capture sources replaced by a reload, so `spad status` never goes back.
    retired_capture: CaptureStats,
    capture_drops: DropWatch,
    budget_said: BudgetLog,
    /// The ports the capture was last given (with SYN-only). Kept, not recomputed from the
    /// running config: the watches read a one-time sequence file, so recomputing them would
    /// see a re-armed file as no change.
    applied_watches: (Vec<capture::bpf::Watch>, bool),
    /// The guard's netlink monitor, registered with the reactor (nftables only).
    guard_events: Option<AsyncFd<OwnedFd>>,
    guard: Guard,
    hub: Hub,
    /// Notified by the journal's sync thread when a sync is done.
    synced: std::sync::Arc<tokio::sync::Notify>,
}

async fn serve(config_path: PathBuf, overrides: Overrides) -> anyhow::Result<()> {
    let (config, server) = load(&config_path, &overrides)?;
    crate::daemon::create_state_dir(&config.server.state_dir)?;
    // One daemon per state directory and table, before anything is opened or installed.
    let _locks = (
        crate::firewall::lock::StateLock::acquire(&config.server.state_dir)?,
        crate::firewall::lock::StateLock::acquire_table(&config.server.table)?,
    );
    // Before anything is touched: refuses if another spad answers on this state directory.
    let hub = Hub::bind(&config, &config_path, SystemClock.now())?;
    let mut program = capture::program::OneProgram::default();
    let ports = (watches(&config), crate::knock::syn_only(&config));
    let source = open_source(&config, &ports, &mut program)?;
    let firewall = crate::firewall::open(&config)?;
    // Subscribed before the install, so a change anyone makes around it is seen (`Guard::rearm`).
    let subscription = crate::firewall::guard::Subscription::open(firewall.name());
    let capture_desc = describe_capture(&config);
    let mut pipeline = Pipeline::new(config, server, firewall, SystemClock)?;
    pipeline.verifier = crate::verify::Verifier::for_this_machine();
    let public = pipeline.server_public_key();
    pipeline.log.line(
        SystemClock.now(),
        &format!(
            "listening port={}/udp capture={capture_desc} server-key={public} verify-threads={}",
            pipeline.config.server.port,
            pipeline.verifier.threads()
        ),
    );
    say_if_budget_refused(&*source, &mut pipeline.log);
    // Not fatal: a daemon that cannot give CAP_BPF up (a system-call filter that refuses
    // capset) still guards the bastion; it says so, and keeps one capability too many.
    match crate::privilege::shed_bpf() {
        Ok(true) => pipeline.log.line(
            SystemClock.now(),
            "gave up CAP_BPF (needed only to load the capture's prefilter)",
        ),
        Ok(false) => {}
        Err(e) => pipeline.log.line(
            SystemClock.now(),
            &format!("warning: could not give up CAP_BPF, running with it: {e:#} (allow capset in the unit's SystemCallFilter)"),
        ),
    }
    if let Some(user) = pipeline.config.server.user.clone() {
        let account = crate::privilege::lookup_user(&user)?;
        crate::privilege::drop_to(&account, &pipeline.config.server.state_dir)?;
        pipeline.log.line(
            SystemClock.now(),
            &format!(
                "running as {user} (uid {}) with CAP_NET_ADMIN and CAP_NET_RAW only",
                account.uid
            ),
        );
    }
    // The handshake pool, and the journal's syncs, leave the loop: after the privilege drop,
    // which refuses to run with other threads (they would keep root), so no thread holds more
    // than the loop does. The pool starts now rather than with the first busy batch.
    pipeline.verifier.start_pool();
    let synced = std::sync::Arc::new(tokio::sync::Notify::new());
    let wake = std::sync::Arc::clone(&synced);
    pipeline
        .sync_in_background(std::sync::Arc::new(move || wake.notify_one()))
        .context("starting the journal's sync thread")?;
    hold_before_the_guard(&mut pipeline);
    let (guard, warning) = Guard::watching(subscription, &mut *pipeline.firewall, &pipeline.config);
    if let Some(w) = warning {
        pipeline.log.line(SystemClock.now(), &w);
    }
    let mut signals = Signals::install().context("installing signal handlers")?;
    let (calls_in, calls) = mpsc::channel(CALL_QUEUE);
    let mut daemon = Daemon {
        config_path,
        overrides,
        capture: Capture::new(source).context("watching the capture sockets")?,
        program,
        retired_capture: CaptureStats::default(),
        capture_drops: DropWatch::default(),
        budget_said: BudgetLog::default(),
        applied_watches: (
            watches(&pipeline.config),
            crate::knock::syn_only(&pipeline.config),
        ),
        guard_events: guard
            .event_fd()
            .map(watch)
            .transpose()
            .context("watching the nftables monitor")?,
        guard,
        pipeline,
        hub,
        synced,
    };
    daemon
        .hub
        .start(calls_in)
        .context("starting the control socket, metrics and watchdog tasks")?;
    daemon.hub.ready(&daemon.pipeline);
    daemon.pipeline.log.hold_lines(true);
    daemon.run(&mut signals, calls).await;
    daemon.stop()
}

impl Daemon {
    /// The loop. Arms are polled in order (`biased`): signals, operator calls, the guard and
    /// the housekeeping tick come before the capture, so a flood that keeps the capture
    /// always ready delays them by one batch at most, never starves them.
    async fn run(&mut self, signals: &mut Signals, mut calls: mpsc::Receiver<Call>) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let guard_due = tokio::time::Instant::from_std(self.guard.next_check());
            tokio::select! {
                biased;
                _ = signals.terminate.recv() => return,
                _ = signals.interrupt.recv() => return,
                _ = signals.hangup.recv() => self.reload(),
                () = self.synced.notified() => self.pipeline.commit_done(),
                Some(call) = calls.recv() => {
                    self.refresh_capture_stats();
                    self.hub.answer(&mut self.pipeline, call);
                }
                Some(()) = guard_event(self.guard_events.as_ref()) => self.check_guard(),
                () = tokio::time::sleep_until(guard_due) => self.check_guard(),
                _ = tick.tick() => self.housekeeping(),
                ready = self.capture.readable() => match ready {
                    Ok(()) => self.drain_batch(),
                    Err(e) => self.capture_failed(e).await,
                },
            }
            // Whatever this turn logged, in one write (see `Logger::hold_lines`).
            self.pipeline.log.flush();
        }
    }

    /// A batch: whatever is waiting, up to [`BATCH`] frames; one journal commit and one
    /// firewall transaction for all of it.
    fn drain_batch(&mut self) {
        let mut taken = 0;
        let mut dry = false;
        while taken < BATCH {
            match self.capture.source.recv(Duration::ZERO) {
                Ok(Some(received)) => {
                    self.pipeline.decide(&received);
                    taken += 1;
                }
                Ok(None) => {
                    dry = true;
                    break;
                }
                Err(e) => {
                    self.pipeline
                        .log
                        .line(SystemClock.now(), &format!("error: capture: {e}"));
                    dry = true;
                    break;
                }
            }
        }
        if taken > 0 {
            self.pipeline.flush();
        }
        if dry {
            self.capture.ran_dry();
            if taken >= HOLD_OFF_AFTER {
                // Under load: let the ring fill before the next wake (see `HOLD_OFF`).
                std::thread::sleep(HOLD_OFF);
            }
        }
    }

    /// A capture socket reported an error: logged, and the loop backs off for a moment.
    async fn capture_failed(&mut self, e: std::io::Error) {
        self.pipeline
            .log
            .line(SystemClock.now(), &format!("error: capture: {e}"));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    fn check_guard(&mut self) {
        // A repair runs `nft`: what this turn logged so far goes out first.
        self.pipeline.log.flush();
        for line in self
            .guard
            .poll(&mut *self.pipeline.firewall, &self.pipeline.config)
        {
            self.pipeline.log.line(SystemClock.now(), &line);
        }
        if let Some(events) = &self.guard_events {
            // The monitor was drained by `poll`: sleep until the kernel sends more.
            let mut cx = TaskContext::from_waker(Waker::noop());
            if let Poll::Ready(Ok(mut guard)) = events.poll_read_ready(&mut cx) {
                guard.clear_ready();
            }
        }
    }

    fn refresh_capture_stats(&mut self) {
        self.pipeline.stats.capture = self.retired_capture.clone();
        self.pipeline
            .stats
            .capture
            .add(&self.capture.source.stats());
        let capture = &self.pipeline.stats.capture;
        if let Some(line) = self.budget_said.observe(
            capture.budget_engaged,
            std::time::Instant::now(),
            self.pipeline.config.server.packet_rate,
            capture.budget_engagements,
            capture.kernel_source_limited,
        ) {
            self.pipeline.log.line(SystemClock.now(), &line);
        }
    }

    fn housekeeping(&mut self) {
        self.pipeline.tick();
        self.capture.source.housekeeping();
        if let Some(line) = self
            .capture_drops
            .check(&mut *self.capture.source, std::time::Instant::now())
        {
            self.pipeline.log.line(SystemClock.now(), &line);
        }
        self.refresh_capture_stats();
    }

    /// SIGHUP: a new config and key, and a new capture if what it must see changed. On any
    /// error the running config stays.
    fn reload(&mut self) {
        self.pipeline.log.flush();
        self.hub.reloading();
        if let Err(e) = self.try_reload() {
            self.pipeline.log.line(
                SystemClock.now(),
                &format!("error: reload failed, keeping the running config: {e:#}"),
            );
        }
        self.hub.reloaded(&self.pipeline);
        self.guard.rearm(&mut *self.pipeline.firewall);
    }

    fn try_reload(&mut self) -> anyhow::Result<()> {
        let (config, server) = load(&self.config_path, &self.overrides)?;
        let running = &self.pipeline.config;
        // What only a new capture can change: the kind, the interfaces, the slot size, and
        // the port a UDP listener is bound to.
        let structural = config.server.capture != running.server.capture
            || config.server.interfaces != running.server.interfaces
            || capture::slot_size(&config) != capture::slot_size(running)
            || (config.server.capture == CaptureMode::Udp
                && config.server.port != running.server.port);
        // New ports and a new budget go into a loaded eBPF prefilter's control map: no new
        // program, so they work after the privilege drop too. Otherwise a new capture.
        let new_watches = (watches(&config), crate::knock::syn_only(&config));
        let old_watches = self.applied_watches.clone();
        let ports_changed = new_watches != old_watches;
        let (new_budget, old_budget) = (
            config.server.packet_budget(),
            running.server.packet_budget(),
        );
        let budget_changed = new_budget != old_budget;
        // Until the reload has taken effect (or been refused), the prefilter passes the
        // ports of both configs: neither one's knocks are dropped in the kernel meanwhile.
        let pending = capture::pending_watches(&old_watches, &new_watches);
        let recapture = structural
            || (ports_changed && !self.capture.source.set_watches(&pending.0, pending.1))
            || (budget_changed && !self.capture.source.set_budget(new_budget));
        // On any error below: what went into the running prefilter goes back out.
        let restore = |source: &mut dyn capture::Source| {
            capture::restore_prefilter(source, &old_watches.0, old_watches.1, old_budget);
        };
        let capture = if recapture {
            match open_source(&config, &pending, &mut self.program)
                .and_then(|source| Ok(Capture::new(source)?))
            {
                Ok(capture) => Some(capture),
                Err(e) => {
                    restore(&mut *self.capture.source);
                    return Err(e);
                }
            }
        } else {
            None
        };
        if let Err(e) = self.pipeline.reload(config, server) {
            // The new capture goes first: the running one takes its program's control back.
            drop(capture);
            restore(&mut *self.capture.source);
            return Err(e);
        }
        if let Some(capture) = capture {
            say_if_budget_refused(&*capture.source, &mut self.pipeline.log);
            let old = std::mem::replace(&mut self.capture, capture);
            let retired = capture::retire(
                old.source,
                &mut *self.capture.source,
                &new_watches,
                new_budget,
            );
            self.retired_capture.add(&retired);
        } else if ports_changed {
            // In place: narrowed to the new ports (a memory write that worked a moment ago).
            self.capture
                .source
                .set_watches(&new_watches.0, new_watches.1);
        }
        self.applied_watches = new_watches;
        Ok(())
    }

    /// After the loop: final counters, and the grants closed or left to expire.
    fn stop(mut self) -> anyhow::Result<()> {
        self.pipeline.log.hold_lines(false);
        self.hub.stopping();
        // Grants whose journal sync is running are installed if it finishes in time.
        self.pipeline.settle(STOP_WAITS_FOR_SYNC);
        let now = SystemClock.now();
        // The counters below include the capture's as of now, not as of the last tick.
        self.refresh_capture_stats();
        // Every capture of this run, those replaced by reloads included.
        let capture = self.pipeline.stats.capture.clone();
        self.pipeline.log.line(now, &format!("capture: {capture}"));
        let counters: Vec<String> = self
            .pipeline
            .stats
            .counters()
            .iter()
            .map(|(name, value)| format!("{name}={value}"))
            .collect();
        self.pipeline
            .log
            .line(now, &format!("stopping: {}", counters.join(" ")));
        if self.pipeline.config.server.flush_on_exit {
            self.pipeline.firewall.flush()?;
            self.pipeline.log.line(
                now,
                "flush-on-exit: all grants closed; the protection stays (`spad uninstall` removes it)",
            );
        } else {
            self.pipeline.log.line(
                now,
                "grants stay in the kernel until they expire (flush-on-exit = false)",
            );
        }
        Ok(())
    }
}

/// Tests only (debug builds): `SPAD_TEST_HOLD_BEFORE_GUARD_MS` widens the moment between
/// the install and the guard's start, so a test can change the table inside it. Release
/// builds have no such variable.
fn hold_before_the_guard<C: crate::clock::Clock>(pipeline: &mut Pipeline<C>) {
    if !cfg!(debug_assertions) {
        return;
    }
    let Some(ms) = std::env::var("SPAD_TEST_HOLD_BEFORE_GUARD_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    else {
        return;
    };
    pipeline.log.line(
        SystemClock.now(),
        &format!("test hook: holding {ms} ms before the guard starts"),
    );
    std::thread::sleep(Duration::from_millis(ms.min(10_000)));
}

/// Resolves when the guard's netlink monitor has events; never without a monitor.
async fn guard_event(events: Option<&AsyncFd<OwnedFd>>) -> Option<()> {
    match events {
        Some(events) => events.readable().await.ok().map(|_| ()),
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_is_said_engaged_once_and_released_after_a_quiet_spell() {
        let start = std::time::Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut said = BudgetLog::default();
        assert_eq!(said.observe(false, at(0), 20_000, 0, 0), None);
        let line = said.observe(true, at(100), 20_000, 1, 0).unwrap();
        assert!(line.contains("engaged (20000/s per source"), "{line}");
        assert_eq!(said.observe(true, at(200), 20_000, 1, 10), None);
        // Released for less than the quiet spell, engaged again: nothing more to say.
        assert_eq!(said.observe(false, at(2_200), 20_000, 1, 10), None);
        assert_eq!(said.observe(false, at(20_000), 20_000, 1, 10), None);
        assert_eq!(said.observe(true, at(21_000), 20_000, 2, 20), None);
        // Released for the whole quiet spell: said once, with the totals.
        assert_eq!(said.observe(false, at(23_000), 20_000, 2, 30), None);
        let line = said.observe(false, at(53_000), 20_000, 2, 30).unwrap();
        assert!(
            line.contains("released for 30 s (engaged 2 times in all, 30 frames cut)"),
            "{line}"
        );
        assert_eq!(said.observe(false, at(60_000), 20_000, 2, 30), None);
        assert!(said.observe(true, at(61_000), 20_000, 3, 30).is_some());
    }
    use crate::capture::UdpListener;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    }

    /// Drains like the loop does; returns how many packets were read.
    fn drain(capture: &mut Capture) -> usize {
        let mut n = 0;
        while let Ok(Some(_)) = capture.source.recv(Duration::ZERO) {
            n += 1;
        }
        capture.ran_dry();
        n
    }

    #[test]
    fn every_packet_after_the_source_ran_dry_wakes_the_loop_and_an_idle_loop_sleeps() {
        runtime().block_on(async {
            let listener = UdpListener::open(0).expect("bind");
            let port = listener.local_addr().expect("addr").port();
            let mut capture = Capture::new(Box::new(listener)).expect("register");
            let sender = std::net::UdpSocket::bind("127.0.0.1:0").expect("sender");
            let wait = Duration::from_secs(2);
            for round in 0..200usize {
                let burst = 1 + round % 3;
                for _ in 0..burst {
                    sender.send_to(b"knock", ("127.0.0.1", port)).expect("send");
                }
                let mut got = 0;
                // Bounded: at most `burst` wake-ups are needed; each must come within 2 s.
                while got < burst {
                    tokio::time::timeout(wait, capture.readable())
                        .await
                        .unwrap_or_else(|_| panic!("round {round}: a packet did not wake the loop"))
                        .expect("readable");
                    got += drain(&mut capture);
                }
                assert_eq!(got, burst, "round {round}");
            }
            // Nothing sent: the readiness was cleared, so the loop sleeps instead of spinning.
            let idle = tokio::time::timeout(Duration::from_millis(100), capture.readable()).await;
            assert!(idle.is_err(), "an empty source must not report readiness");
        });
    }
}
