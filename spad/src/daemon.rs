//! The daemon: the capture → decode → policy → firewall pipeline and the loop that drives it.
//!
//! [`Pipeline`] is the testable heart: it takes received packets and a clock reading and does
//! everything except reading the network. [`crate::event_loop`] wires it to real capture
//! sockets, a real firewall, signals and the operator tasks.

use std::net::IpAddr;
use std::path::PathBuf;

use anyhow::Context;
use spa_shared::packet::{Authenticated, OpenError, Server};
use spa_shared::replay::Window;
use spa_shared::Micros;

use crate::capture::{self, frame, Received};
use crate::clock::Clock;
use crate::config::Config;
use crate::firewall::{Access, Firewall};
use crate::flood::{RecentPackets, SourceBuckets};
use crate::knock::engine::Event;
use crate::knock::Knocks;
use crate::log::Logger;
use crate::net::{PortProto, Proto};
use crate::policy::{self, Decision};
use crate::refusal::{Refusal, RefusalCounts};
use crate::state::{Commit, ReplayState, ReplayStore};
use crate::verify::{Batch, Verifier};
use spa_shared::duration;
use std::sync::Arc;

/// How long the firewall transactions that installed grants took (successful ones only).
#[derive(Debug, Clone)]
pub struct FirewallApplies(pub crate::metrics::Histogram);

/// Two runs that made the same decisions are equal: as many transactions timed, whatever
/// each took (the monotonic clock differs run to run).
impl PartialEq for FirewallApplies {
    fn eq(&self, other: &Self) -> bool {
        self.0.count() == other.0.count()
    }
}

impl Eq for FirewallApplies {}

impl Default for FirewallApplies {
    fn default() -> Self {
        Self(crate::metrics::Histogram::with_bounds(
            crate::metrics::APPLY_BUCKETS_MICROS,
        ))
    }
}

/// Counters, logged on exit, shown by `spad status` and exported as metrics.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Stats {
    pub packets: u64,
    pub precheck_dropped: u64,
    pub refused: u64,
    pub granted: u64,
    pub closed: u64,
    pub knocks: u64,
    /// Frames to a port neither the SPA port nor any door watches, which a widened
    /// prefilter passed (more ranges than it holds): dropped before the knock engine, so
    /// they cannot count toward anyone's knock rate.
    pub unwatched: u64,
    pub reloads: u64,
    /// Sources put on the knock blacklist.
    pub blacklistings: u64,
    /// Knock doors completed (open sequence), per door.
    pub door_opens: std::collections::BTreeMap<String, u64>,
    /// Grants installed per (service, service kind).
    pub grants_by_service: std::collections::BTreeMap<(String, &'static str), u64>,
    /// Packet heard → grant in the kernel.
    pub grant_latency: crate::metrics::Histogram,
    /// Each firewall transaction that installed grants: how long it took.
    pub firewall_applies: FirewallApplies,
    /// Of `granted` and `refused`: decisions on fwknop 2.x packets.
    pub fwknop_granted: u64,
    pub fwknop_refused: u64,
    /// Every refused SPA packet, by reason (their sum is `refused`).
    pub refusals: RefusalCounts,
    /// Knocks by what they came to (a copy of the knock engine's tally).
    pub knock_results: crate::knock::results::KnockResults,
    /// The capture's counters, kernel drops included (copied in by the run loop).
    pub capture: capture::stats::CaptureStats,
}

impl Stats {
    /// Every counter as (name, value), in display order. `spad status`, its JSON and the
    /// Prometheus endpoint render this list, so a new counter is one line here. A name may carry
    /// Prometheus labels (`refusals{reason="replay"}`); names are stable (docs/operations.md).
    pub fn counters(&self) -> Vec<(String, u64)> {
        let mut out: Vec<(String, u64)> = [
            ("packets", self.packets),
            ("precheck_dropped", self.precheck_dropped),
            ("refused", self.refused),
            ("granted", self.granted),
            ("closed", self.closed),
            ("knocks", self.knocks),
            ("unwatched", self.unwatched),
            ("reloads", self.reloads),
            ("blacklistings", self.blacklistings),
            ("fwknop_granted", self.fwknop_granted),
            ("fwknop_refused", self.fwknop_refused),
        ]
        .into_iter()
        .map(|(name, value)| (name.to_string(), value))
        .collect();
        out.extend(
            self.refusals
                .iter()
                .map(|(reason, n)| (format!("refusals{{reason=\"{}\"}}", reason.name()), n)),
        );
        out.extend(
            self.knock_results
                .iter()
                .map(|(r, n)| (format!("knock_results{{result=\"{}\"}}", r.name()), n)),
        );
        out.extend([
            ("capture_received".to_string(), self.capture.received),
            ("capture_delivered".to_string(), self.capture.delivered),
            (
                "capture_kernel_packets".to_string(),
                self.capture.kernel_packets,
            ),
            (
                "capture_kernel_drops".to_string(),
                self.capture.kernel_drops,
            ),
            (
                "capture_kernel_source_limited".to_string(),
                self.capture.kernel_source_limited,
            ),
            (
                "capture_kernel_budget_engagements".to_string(),
                self.capture.budget_engagements,
            ),
            (
                "capture_address_reads".to_string(),
                self.capture.address_reads,
            ),
        ]);
        out.extend(capture::stats::DropReason::ALL.into_iter().map(|reason| {
            // Label values in the refusals' style: `not_our_address`.
            let label = reason.name().replace('-', "_");
            (
                format!("capture_dropped{{reason=\"{label}\"}}"),
                self.capture.dropped(reason),
            )
        }));
        out.extend(self.door_opens.iter().map(|(door, n)| {
            let door = crate::metrics::label_value(door);
            (format!("door_opens{{door=\"{door}\"}}"), *n)
        }));
        out.extend(self.grants_by_service.iter().map(|((service, kind), n)| {
            let service = crate::metrics::label_value(service);
            (
                format!("grants_by_service{{service=\"{service}\",kind=\"{kind}\"}}"),
                *n,
            )
        }));
        out
    }
}

/// Everything that decides; no sockets of its own.
pub struct Pipeline<C: Clock> {
    pub config: Config,
    /// Shared with the verifier's pool threads (read-only).
    server: Arc<Server>,
    replay: Box<dyn ReplayState>,
    /// The clients by public key (one lookup per packet, however many clients).
    clients_by_key: ClientsByKey,
    /// Decisions of the current batch, carried out in order by [`Pipeline::flush`] once the
    /// replay journal is durable.
    pending: Vec<Pending>,
    /// Packets authenticated recently: their replays are dropped before any public-key work.
    recent: RecentPackets,
    /// Per-source budget of public-key handshakes.
    buckets: SourceBuckets,
    /// SPA packets of this batch that passed the cheap checks, waiting for their handshakes.
    waiting: Batch,
    /// How many threads open a batch's packets.
    pub verifier: Verifier,
    /// The handshake results of the batch (reused: no allocation per batch).
    opened: Vec<Result<Authenticated, OpenError>>,
    pub firewall: Box<dyn Firewall>,
    pub knocks: Knocks,
    /// The knock ranges exactly (the prefilter may pass more).
    watched: Vec<capture::bpf::Watch>,
    clock: C,
    pub log: Logger,
    pub stats: Stats,
    /// When the packet being handled was heard (for the grant latency histogram).
    received_at: Micros,
    /// Decisions whose journal commit runs in the background, carried out in order when it
    /// is done ([`Pipeline::commit_done`]).
    in_flight: Vec<Pending>,
    /// When the background commit started, if one runs.
    committing_since: Option<Micros>,
    /// A slow background commit was already reported.
    slow_reported: bool,
}

/// A background journal commit running longer than this is reported (once) in the log.
pub const SLOW_COMMIT: Micros = 2_000_000;
/// How long a reload, revoke or flush waits for a journal sync in flight (its grants are
/// refused after that).
pub const SETTLE_AT_MOST: std::time::Duration = std::time::Duration::from_secs(2);

impl<C: Clock> std::fmt::Debug for Pipeline<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

/// A decision waiting for the end of its batch.
#[derive(Debug)]
struct Pending {
    decision: Decision,
    owner: String,
    /// When the packet behind it was heard (for the grant latency).
    heard: Micros,
    /// Accepted replay entries were uncommitted when it was made: it may only be carried out
    /// if the journal commit succeeds.
    needs_commit: bool,
}

/// Most packets decided per journal commit.
pub const BATCH: usize = 512;
/// Most decisions whose grants go into one firewall transaction (bounds the kernel's
/// acknowledgements waiting in the netlink socket).
const GRANTS_PER_TRANSACTION: usize = 128;

/// The configured clients by public key: one hash lookup per authenticated packet, and a
/// shared handle rather than a copy of the client's settings.
type ClientsByKey =
    std::collections::HashMap<spa_shared::keys::PublicKey, Arc<crate::config::Client>>;

fn clients_by_key(config: &Config) -> ClientsByKey {
    config
        .clients
        .values()
        .map(|c| (c.public_key, Arc::new(c.clone())))
        .collect()
}

fn window(config: &Config) -> Window {
    Window {
        max_age: crate::clock::micros(config.server.max_age),
        max_future: crate::clock::micros(config.server.max_future),
    }
}

impl<C: Clock> Pipeline<C> {
    /// Builds the pipeline and installs the firewall ruleset.
    pub fn new(
        config: Config,
        server: Server,
        mut firewall: Box<dyn Firewall>,
        clock: C,
    ) -> anyhow::Result<Self> {
        let mut log = Logger::default();
        let now = clock.now();
        let state_dir = config.server.state_dir.clone();
        let (mut replay, warning) =
            ReplayStore::load(state_dir.join("replay.bin"), window(&config), now);
        if let Some(w) = warning {
            log.line(now, &format!("warning: {w}"));
        }
        let clients = clients_by_key(&config);
        replay.retain_clients(&|k| clients.contains_key(k));
        // Each client's static-static secret once: one X25519 per packet, not two.
        let server = server.restricted_to(clients.keys().copied(), None);
        let kept = firewall
            .install(&config)
            .context("installing the firewall ruleset")?;
        let mut knocks = Knocks::new(&config, &state_dir, now);
        for (address, remaining) in firewall.blacklisted().unwrap_or_default() {
            knocks.restore_blacklist(address, crate::clock::after(now, remaining));
        }
        if let Some(w) = knocks.take_warning() {
            log.line(now, &format!("warning: {w}"));
        }
        log.line(
            now,
            &format!(
                "ruleset installed on {} (table {}), {} services, {} clients, {} doors; kept {kept} live grants",
                firewall.name(),
                config.server.table,
                config.services.len(),
                config.clients.len(),
                config.doors.doors.len() + config.doors.totp.len()
            ),
        );
        let buckets =
            SourceBuckets::new(config.server.handshake_rate, config.server.handshake_burst);
        let watched = crate::knock::watched_ranges(&config);
        Ok(Self {
            config,
            server: Arc::new(server),
            replay: Box::new(replay),
            clients_by_key: clients,
            pending: Vec::new(),
            recent: RecentPackets::default(),
            buckets,
            waiting: Batch::default(),
            verifier: Verifier::single(),
            opened: Vec::new(),
            firewall,
            watched,
            knocks,
            clock,
            log,
            stats: Stats::default(),
            received_at: now,
            in_flight: Vec::new(),
            committing_since: None,
            slow_reported: false,
        })
    }

    /// Replaces the configuration atomically (the old one stays if anything fails).
    pub fn reload(&mut self, config: Config, server: Server) -> anyhow::Result<()> {
        // Grants decided under the old configuration land first, so the new one's pruning
        // sees them (a client removed by this reload must not get in just after it).
        self.settle(SETTLE_AT_MOST);
        let kept = self.firewall.install(&config)?;
        let now = self.clock.now();
        let clients = clients_by_key(&config);
        self.replay.retain_clients(&|k| clients.contains_key(k));
        self.clients_by_key = clients;
        self.buckets =
            SourceBuckets::new(config.server.handshake_rate, config.server.handshake_burst);
        self.knocks.reconfigure(&config, now);
        if let Some(w) = self.knocks.take_warning() {
            self.log.line(now, &format!("warning: {w}"));
        }
        // Unchanged server key: the old secrets are reused (no X25519 for a kept client).
        self.server = Arc::new(
            server.restricted_to(self.clients_by_key.keys().copied(), Some(&*self.server)),
        );
        self.watched = crate::knock::watched_ranges(&config);
        self.config = config;
        self.stats.reloads += 1;
        self.log
            .line(now, &format!("reloaded; kept {kept} live grants"));
        Ok(())
    }

    /// The server that opens spa packets (built with the configured clients' keys).
    pub fn server(&self) -> &Server {
        &self.server
    }

    /// The pipeline's clock reading.
    /// The server's public key (logged at start).
    pub fn server_public_key(&self) -> spa_shared::keys::PublicKey {
        self.server.public_key()
    }

    pub fn now(&self) -> Micros {
        self.clock.now()
    }

    /// Handles one received packet and carries out its decision (a batch of one).
    pub fn handle(&mut self, received: &Received<'_>) {
        self.decide(received);
        self.flush();
    }

    /// Decides one packet of a batch; its grant waits for [`flush`](Self::flush).
    pub fn decide(&mut self, received: &Received<'_>) {
        self.stats.packets += 1;
        match received {
            Received::Udp {
                source, payload, ..
            } => self.handle_spa(*source, payload),
            Received::Ip(bytes) => {
                let Some(f) = frame::parse(bytes) else { return };
                if f.proto == Proto::Udp && f.port == self.config.server.port {
                    self.handle_spa(f.source, f.payload);
                } else if !self
                    .watched
                    .iter()
                    .any(|w| w.proto == f.proto && (w.low..=w.high).contains(&f.port))
                {
                    self.stats.unwatched += 1;
                } else {
                    self.handle_knock(
                        f.source,
                        PortProto {
                            port: f.port,
                            proto: f.proto,
                        },
                        f.tcp_flags,
                    );
                }
            }
        }
    }

    /// Refuses with a free-text reason, counted as [`Refusal::Other`]; prefer
    /// [`refuse_as`](Self::refuse_as) with a named reason.
    #[allow(dead_code)]
    fn refuse(&mut self, source: IpAddr, reason: &str) {
        self.refuse_as(source, Refusal::Other, || reason.to_string());
    }

    /// Counts a refusal under `why` and logs it (the detail is only formatted if the log's
    /// per-second budget allows the line).
    fn refuse_as(&mut self, source: IpAddr, why: Refusal, detail: impl FnOnce() -> String) {
        self.stats.refused += 1;
        self.stats.refusals.add(why);
        let now = self.clock.now();
        self.log.refusal_with(now, || {
            format!("refused from={source} reason=\"{}\"", detail())
        });
    }

    fn handle_spa(&mut self, source: IpAddr, payload: &[u8]) {
        let now = self.clock.now();
        self.received_at = now;
        // Cheap pre-check first: garbage never reaches public-key crypto.
        if let Err(e) = self.server.precheck(payload) {
            // Not spa v1: maybe an unmodified fwknop client (base64 text, its own HMAC pre-check).
            if !self.config.fwknop_clients.is_empty() && crate::fwknop::looks_like(payload) {
                return self.handle_fwknop(source, payload);
            }
            self.stats.precheck_dropped += 1;
            return self.refuse_as(source, Refusal::from(&e), || e.to_string());
        }
        // A replay of a packet authenticated recently: no public-key work either.
        let mut ephemeral = [0u8; 32];
        ephemeral.copy_from_slice(&payload[..32]);
        if self.recent.contains(&ephemeral) {
            return self.refuse_as(source, Refusal::RecentPacket, || {
                "replayed: this exact packet was seen before (dropped before the handshake)".into()
            });
        }
        if !self.buckets.take(source, now) {
            return self.refuse_as(source, Refusal::RateLimited, || {
                "rate limited: too many handshakes from this source (handshake-rate)".into()
            });
        }
        if self.verifier.threads() > 1 {
            // The handshake waits for the end of the batch, where it may run in parallel.
            return self.waiting.push(source, now, ephemeral, payload);
        }
        let opened = self.server.open(payload);
        self.authenticated(source, ephemeral, opened.as_ref());
    }

    /// Opens the batch's waiting packets (in parallel) and finishes each in arrival order.
    fn verify_waiting(&mut self) {
        if self.waiting.is_empty() {
            return;
        }
        let mut opened = std::mem::take(&mut self.opened);
        let waiting = std::mem::take(&mut self.waiting);
        self.verifier
            .open_all(&self.server, &waiting.originals(), &mut opened);
        // Index in `opened` of each original, by position in the batch.
        let mut result_of: Vec<usize> = Vec::with_capacity(waiting.len());
        let mut next = 0;
        for (item, packet) in waiting.iter() {
            let index = match item.copy_of {
                Some(first) => result_of[first],
                None => {
                    next += 1;
                    next - 1
                }
            };
            result_of.push(index);
            self.received_at = item.heard;
            if item.copy_of.is_none() {
                self.authenticated(item.source, item.ephemeral, opened[index].as_ref());
            } else if self.recent.contains(&item.ephemeral) {
                // A copy of a packet just authenticated: a replay, as on one thread.
                self.refuse_as(item.source, Refusal::RecentPacket, || {
                    "replayed: this exact packet was seen before (dropped before the handshake)"
                        .into()
                });
            } else if opened[index].is_ok() {
                // Its original was refused only for its source (and forgotten): this copy,
                // maybe from the right address, gets its own handshake, as on one thread.
                let again = self.server.open(packet);
                self.authenticated(item.source, item.ephemeral, again.as_ref());
            } else {
                // The same bytes fail the same way.
                self.authenticated(item.source, item.ephemeral, opened[index].as_ref());
            }
        }
        self.waiting = waiting;
        self.waiting.clear();
        self.opened = opened;
    }

    /// Everything after the handshake: client, replay rules, policy, the journal record.
    fn authenticated(
        &mut self,
        source: IpAddr,
        ephemeral: [u8; 32],
        opened: Result<&Authenticated, &OpenError>,
    ) {
        let now = self.clock.now();
        let authenticated = match opened {
            Ok(a) => a,
            Err(e) => {
                if let OpenError::UnknownClient(_) = e {
                    // Its client key opened, which takes the ephemeral private key: no one who
                    // merely saw it can have made it, so its replays may cost nothing too.
                    self.recent.insert(ephemeral);
                }
                return self.refuse_as(source, Refusal::from(e), || e.to_string());
            }
        };
        self.recent.insert(ephemeral);
        let Some(client) = self.clients_by_key.get(&authenticated.client).cloned() else {
            let key = authenticated.client;
            return self.refuse_as(source, Refusal::UnknownClient, || {
                format!("unknown client key {key}")
            });
        };
        let request = &authenticated.request;
        if let Err(e) = self
            .replay
            .check(&client.public_key, request.timestamp, now)
        {
            return self.refuse_as(source, Refusal::from(&e), || {
                format!("client={} {e}", client.name)
            });
        }
        let decision = match policy::decide(&self.config, &client, request, source) {
            Ok(d) => d,
            Err(e) => {
                if e.depends_on_source() {
                    self.recent.forget(&ephemeral);
                }
                return self.refuse_as(source, Refusal::Policy, || e.to_string());
            }
        };
        // Recorded now (a second copy in this batch is refused); durable at the end of the
        // batch, before the door opens: not even kill -9 right after lets it through twice.
        if let Err(e) = self
            .replay
            .accept(&client.public_key, request.timestamp, now)
        {
            return self.refuse_as(source, Refusal::from(&e), || {
                format!("client={} {e}", client.name)
            });
        }
        self.apply(decision, &client.name);
    }

    fn refuse_fwknop(&mut self, source: IpAddr, reason: &str) {
        self.stats.refused += 1;
        self.stats.refusals.add(Refusal::Fwknop);
        self.stats.fwknop_refused += 1;
        let now = self.clock.now();
        self.log.refusal_with(now, || {
            format!("refused protocol=fwknop from={source} reason=\"{reason}\"")
        });
    }

    /// The fwknop 2.x path, step for step the spa v1 one: the client's HMAC (the cheap
    /// pre-check) and decryption, replay, policy, durable record, then the firewall.
    fn handle_fwknop(&mut self, source: IpAddr, payload: &[u8]) {
        let now = self.clock.now();
        let opened = match crate::fwknop::open(&self.config.fwknop_clients, payload, now) {
            Ok(o) => o,
            Err(e) => {
                if e.is_precheck() {
                    self.stats.precheck_dropped += 1;
                }
                return self.refuse_fwknop(source, &e.to_string());
            }
        };
        let (client, message) = (opened.client.clone(), opened.message);
        let (digest, keep_until) = (opened.digest, opened.keep_until);
        if let Err(e) = self.replay.check_digest(&digest, now) {
            return self.refuse_fwknop(source, &format!("client={} {e}", client.name));
        }
        let decision = match crate::fwknop::policy::decide(&self.config, &client, &message, source)
        {
            Ok(d) => d,
            Err(e) => return self.refuse_fwknop(source, &format!("client={} {e}", client.name)),
        };
        // Durable before the door opens, as for spa v1.
        if let Err(e) = self.replay.accept_digest(digest, keep_until, now) {
            return self.refuse_fwknop(source, &format!("client={} {e}", client.name));
        }
        // Carried out with the batch, after the digest is durable; counted in `granted()`.
        self.apply(decision, &crate::fwknop::policy::owner(&client));
    }

    /// Carries out a decision, or queues it for the end of the batch if it depends on replay
    /// entries not yet durable or must keep its place behind decisions that do.
    fn apply(&mut self, decision: Decision, owner: &str) {
        let needs_commit = self.replay.uncommitted();
        if !needs_commit && self.pending.is_empty() && self.committing_since.is_none() {
            // Nothing to wait for (a knock door, say): at once, so its log lines stay in order.
            return self.execute(decision, owner);
        }
        self.pending.push(Pending {
            decision,
            owner: owner.to_string(),
            heard: self.received_at,
            needs_commit,
        });
    }

    /// Ends a batch: makes the replay journal durable (one `fdatasync`), then carries out the
    /// batch's decisions in order, each run of grants in one firewall transaction. If the
    /// commit fails, no decision that depends on it is carried out.
    ///
    /// With a store that syncs in the background, the commit is only started here and the
    /// decisions are carried out by [`Pipeline::commit_done`]; while one commit runs, the
    /// next batches' decisions wait and go with the next commit (group commit).
    pub fn flush(&mut self) {
        self.verify_waiting();
        if self.committing_since.is_some() {
            return self.commit_done();
        }
        let now = self.clock.now();
        match self.replay.begin_commit(now) {
            Commit::Started => {
                self.in_flight = std::mem::take(&mut self.pending);
                self.committing_since = Some(now);
            }
            Commit::Nothing => {
                let pending = std::mem::take(&mut self.pending);
                self.carry_out(pending, Ok(()));
            }
            Commit::Done(result) => {
                let pending = std::mem::take(&mut self.pending);
                self.carry_out(pending, result);
            }
        }
    }

    /// Replaces the replay store (tests: one whose syncs a test holds back).
    #[cfg(test)]
    pub(crate) fn use_replay_store(&mut self, store: Box<dyn ReplayState>) {
        self.replay = store;
    }

    /// How long the replay journal's writes took to be durable (for the metrics).
    pub fn replay_sync_times(&self) -> Option<&crate::metrics::Histogram> {
        self.replay.sync_times()
    }

    /// From now on the journal syncs on a thread of its own; `wake` runs when a sync is done
    /// (then call [`Pipeline::commit_done`]). Returns whether the store can.
    pub fn sync_in_background(&mut self, wake: crate::journal_sync::Wake) -> std::io::Result<bool> {
        self.replay.sync_in_background(wake)
    }

    /// Carries out the decisions of a background commit that has finished (a no-op while it
    /// runs), then starts the next one if decisions wait for it.
    pub fn commit_done(&mut self) {
        if self.committing_since.is_none() {
            return;
        }
        let Some(result) = self.replay.poll_commit() else {
            return;
        };
        self.committed(result);
    }

    fn committed(&mut self, result: Result<(), crate::state::ReplayRefusal>) {
        self.committing_since = None;
        self.slow_reported = false;
        let done = std::mem::take(&mut self.in_flight);
        self.carry_out(done, result);
        if !self.pending.is_empty() || self.replay.uncommitted() {
            self.flush();
        }
    }

    /// Carries out every decision already made, waiting (up to `limit` per sync) for the
    /// journal: before a reload, an operator's revoke or flush, and at shutdown, so nothing
    /// decided earlier lands after them.
    pub fn settle(&mut self, limit: std::time::Duration) {
        // It may wait for the disk: the lines logged so far go out first.
        self.log.flush();
        // Bounded: the sync in flight, then at most one for what waited behind it (which
        // `committed` starts), then nothing is left.
        for _ in 0..4 {
            if self.committing_since.is_some() {
                self.finish_commit(limit);
            } else if !self.pending.is_empty() || self.replay.uncommitted() {
                self.flush();
            } else {
                return;
            }
        }
    }

    /// Waits up to `limit` for a background commit and carries out its decisions (refused if
    /// it did not finish in time).
    pub fn finish_commit(&mut self, limit: std::time::Duration) {
        if self.committing_since.is_none() {
            return;
        }
        let result = self.replay.wait_commit(limit).unwrap_or_else(|| {
            Err(crate::state::ReplayRefusal::Persist(format!(
                "the journal's sync did not finish within {} s",
                limit.as_secs()
            )))
        });
        self.committed(result);
    }

    /// Reports (once) a background commit that is taking long: its grants wait for it.
    fn report_slow_commit(&mut self, now: Micros) {
        if let Some(since) = self.committing_since {
            if !self.slow_reported && now.saturating_sub(since) >= SLOW_COMMIT {
                self.slow_reported = true;
                self.log.line(
                    now,
                    &format!(
                        "warning: the replay journal's sync has taken {} ms so far; SPA grants wait for it (is the state directory's disk slow?)",
                        now.saturating_sub(since) / 1000
                    ),
                );
            }
        }
    }

    /// Carries out decisions in order once their commit has `result`ed: each run of grants in
    /// one firewall transaction; nothing that needed the commit if it failed.
    fn carry_out(&mut self, items: Vec<Pending>, result: Result<(), crate::state::ReplayRefusal>) {
        let now = self.clock.now();
        let durable = match result {
            Ok(()) => true,
            Err(e) => {
                self.log.line(now, &format!("error: {e}"));
                false
            }
        };
        let mut opens: Vec<(IpAddr, Vec<Access>, String, Micros)> = Vec::new();
        for item in items {
            if item.needs_commit && !durable {
                self.stats.refused += 1;
                self.stats.refusals.add(Refusal::Persist);
                self.log.line(
                    now,
                    &format!(
                        "refused owner={} reason=\"cannot persist the replay record\"",
                        item.owner
                    ),
                );
                continue;
            }
            match item.decision {
                Decision::Open { address, grants } => {
                    opens.push((address, grants, item.owner, item.heard))
                }
                close => {
                    self.open_all(std::mem::take(&mut opens));
                    self.execute(close, &item.owner);
                }
            }
        }
        self.open_all(opens);
    }

    /// Installs several decisions' grants in one firewall transaction (one by one if that
    /// fails, so one bad grant does not hold back the others).
    fn open_all(&mut self, mut opens: Vec<(IpAddr, Vec<Access>, String, Micros)>) {
        while opens.len() > GRANTS_PER_TRANSACTION {
            let rest = opens.split_off(GRANTS_PER_TRANSACTION);
            self.open_all(std::mem::replace(&mut opens, rest));
        }
        if opens.len() > 1 {
            let all: Vec<Access> = opens.iter().flat_map(|o| o.1.iter().cloned()).collect();
            if self.timed_grant(&all).is_ok() {
                for (address, grants, owner, heard) in &opens {
                    self.received_at = *heard;
                    self.granted(*address, grants, owner);
                }
                return;
            }
        }
        for (address, grants, owner, heard) in opens {
            self.received_at = heard;
            self.execute(Decision::Open { address, grants }, &owner);
        }
    }

    fn granted(&mut self, address: IpAddr, grants: &[Access], owner: &str) {
        let now = self.clock.now();
        self.stats.granted += 1;
        if owner.starts_with("fwknop:") {
            self.stats.fwknop_granted += 1;
        }
        self.record_grant(grants);
        let detail: Vec<String> = grants
            .iter()
            .map(|g| match g.idle {
                Some(idle) => format!(
                    "{}({}, idle {})",
                    g.service,
                    duration::format(g.timeout),
                    duration::format(idle)
                ),
                None => format!("{}({})", g.service, duration::format(g.timeout)),
            })
            .collect();
        let longest = grants.iter().map(|g| g.timeout).max().unwrap_or_default();
        let until = crate::log::timestamp(crate::clock::after(now, longest));
        self.log.line(
            now,
            &format!(
                "granted owner={owner} address={address} services={} until={until}",
                detail.join(",")
            ),
        );
    }

    /// The firewall transaction for `grants`, timed (on the monotonic clock, as the journal's
    /// syncs are) when it succeeds.
    fn timed_grant(&mut self, grants: &[Access]) -> anyhow::Result<()> {
        let started = std::time::Instant::now();
        self.firewall.grant(grants)?;
        let took = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.stats.firewall_applies.0.observe(took);
        Ok(())
    }

    fn execute(&mut self, decision: Decision, owner: &str) {
        let now = self.clock.now();
        match decision {
            Decision::Open { address, grants } => match self.timed_grant(&grants) {
                Ok(()) => self.granted(address, &grants, owner),
                Err(e) => self.log.line(
                    now,
                    &format!("error: grant for owner={owner} address={address} failed: {e:#}"),
                ),
            },
            Decision::Close { address, services } => match self.firewall.revoke(address, &services)
            {
                Ok(()) => {
                    self.stats.closed += 1;
                    self.log.line(
                        now,
                        &format!(
                            "closed owner={owner} address={address} services={}",
                            services.join(",")
                        ),
                    );
                }
                Err(e) => self.log.line(
                    now,
                    &format!("error: close for owner={owner} address={address} failed: {e:#}"),
                ),
            },
        }
    }

    /// Counts a grant per service and its latency since the packet was heard.
    fn record_grant(&mut self, grants: &[Access]) {
        let now = self.clock.now();
        self.stats
            .grant_latency
            .observe(now.saturating_sub(self.received_at));
        for g in grants {
            let kind = self
                .config
                .services
                .get(&g.service)
                .map_or("unknown", |s| crate::status::kind_name(s.kind));
            *self
                .stats
                .grants_by_service
                .entry((g.service.clone(), kind))
                .or_default() += 1;
        }
    }

    fn handle_knock(&mut self, source: IpAddr, port: PortProto, flags: u8) {
        let now = self.clock.now();
        self.received_at = now;
        self.stats.knocks += 1;
        let events = self.knocks.knock(source, port, flags, now);
        self.stats.knock_results = self.knocks.engine().results().clone();
        self.apply_knock_events(events);
    }

    fn apply_knock_events(&mut self, events: Vec<Event>) {
        let now = self.clock.now();
        for event in events {
            match event {
                Event::Log(line) => self.log.line(now, &line),
                Event::Open {
                    door,
                    address,
                    services,
                } => {
                    *self.stats.door_opens.entry(door.clone()).or_default() += 1;
                    let mut grants = Vec::new();
                    for name in &services {
                        let Some(service) = self.config.services.get(name) else {
                            continue;
                        };
                        if let Err(e) = policy::family_ok(service, address) {
                            self.log.line(now, &format!("{address}: door {door}: {e}"));
                            continue;
                        }
                        grants.push(Access {
                            address,
                            service: name.clone(),
                            timeout: service.timeout,
                            idle: service.idle_timeout,
                            owner: format!("door:{door}"),
                        });
                    }
                    if !grants.is_empty() {
                        self.apply(Decision::Open { address, grants }, &format!("door:{door}"));
                    }
                }
                Event::Close {
                    door,
                    address,
                    services,
                } => {
                    self.apply(
                        Decision::Close { address, services },
                        &format!("door:{door}"),
                    );
                }
                Event::Command {
                    argv,
                    env,
                    keep_capabilities,
                } => self.spawn(&argv, &env, keep_capabilities),
                // Made durable by the knock driver before the open they allow.
                Event::TotpUsed { .. } | Event::OneTimeUsed { .. } => {}
                Event::Blacklist { address, duration } => {
                    self.stats.blacklistings += 1;
                    if let Err(e) = self.firewall.blacklist(address, duration) {
                        self.log
                            .line(now, &format!("error: blacklisting {address}: {e:#}"));
                    }
                }
            }
        }
    }

    /// Runs a knockd-style command without a shell; its exit is reaped on a helper thread.
    fn spawn(&mut self, argv: &[String], env: &[(String, String)], keep_capabilities: bool) {
        let now = self.clock.now();
        let Some((program, args)) = argv.split_first() else {
            return;
        };
        let mut command = std::process::Command::new(program);
        command
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(std::process::Stdio::null());
        if !keep_capabilities {
            crate::privilege::without_capabilities(&mut command);
        }
        match command.spawn() {
            Ok(mut child) => {
                self.log
                    .line(now, &format!("command started: {}", argv.join(" ")));
                std::thread::spawn(move || child.wait());
            }
            Err(e) => self
                .log
                .line(now, &format!("error: command {program}: {e}")),
        }
    }

    /// Periodic work: knock timers (stop commands, expired progress).
    pub fn tick(&mut self) {
        let now = self.clock.now();
        let events = self.knocks.tick(now);
        self.apply_knock_events(events);
        self.flush();
        self.report_slow_commit(now);
    }
}

/// Options the command line may override.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub state_dir: Option<PathBuf>,
}

/// Loads config and key; nothing is touched if either is bad.
pub fn load(
    config_path: &std::path::Path,
    overrides: &Overrides,
) -> anyhow::Result<(Config, Server)> {
    let config = load_config(config_path, overrides)?;
    let key = crate::keyfile::read_private_key(&config.server.private_key)?;
    Ok((config, Server::new(key)))
}

/// Loads the config with the command line's overrides applied (no key): the one loader the
/// daemon and every command share.
pub fn load_config(config_path: &std::path::Path, overrides: &Overrides) -> anyhow::Result<Config> {
    let mut config = Config::load(config_path)?;
    if let Some(dir) = &overrides.state_dir {
        config.server.state_dir = dir.clone();
    }
    Ok(config)
}

/// Ports the capture must see: the SPA port and every knock range.
pub fn watches(config: &Config) -> Vec<capture::bpf::Watch> {
    let mut out = vec![capture::bpf::Watch {
        proto: Proto::Udp,
        low: config.server.port,
        high: config.server.port,
    }];
    out.extend(crate::knock::watched_ranges(config));
    out
}

/// Creates the state directory (0700) if missing.
pub(crate) fn create_state_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating state dir {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::firewall::memory::Memory;
    use spa_shared::keys::PrivateKey;
    use spa_shared::payload::{Kind, Request};
    use spa_shared::Micros;

    const NOW: Micros = 1_763_726_400_000_000;

    fn setup(clock: &ManualClock) -> (Pipeline<&ManualClock>, PrivateKey, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!(
            "spad-pipeline-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let client = PrivateKey::from_bytes([1; 32]);
        let text = format!(
            "[server]\nprivate-key = \"k\"\nstate-dir = \"{}\"\n[services.ssh]\nkind = \"management\"\nports = [\"22/tcp\"]\ntimeout = \"30s\"\nmax-timeout = \"1h\"\n[clients.alice]\npublic-key = \"{}\"\nservices = [\"ssh\"]\n",
            dir.display(),
            client.public_key()
        );
        let config = Config::parse(&dir.join("spad.toml"), &text).unwrap();
        let server = Server::new(PrivateKey::from_bytes([2; 32]));
        let pipeline = Pipeline::new(config, server, Box::new(Memory::default()), clock).unwrap();
        (pipeline, client, dir)
    }

    /// A frame a widened prefilter passed for a port nothing watches is dropped and counted
    /// before the knock engine: it cannot count toward anyone's knock rate.
    #[test]
    fn a_frame_to_a_port_nothing_watches_never_reaches_the_knock_engine() {
        let clock = ManualClock::new(NOW);
        let (mut p, _, _dir) = setup(&clock);
        let frame = crate::capture::frame::build::tcp(
            "203.0.113.7".parse().unwrap(),
            "198.51.100.1".parse().unwrap(),
            40000,
            10000,
            0x02,
        );
        for _ in 0..100 {
            p.handle(&capture::Received::Ip(&frame));
        }
        assert_eq!(p.stats.unwatched, 100);
        assert_eq!(p.stats.knocks, 0);
        assert_eq!(p.stats.packets, 100);
    }

    /// [`setup`], with `require-address = true` for alice.
    fn setup_require_address(
        clock: &ManualClock,
    ) -> (Pipeline<&ManualClock>, PrivateKey, std::path::PathBuf) {
        let (p, client, dir) = setup(clock);
        drop(p);
        let text = format!(
            "[server]\nprivate-key = \"k\"\nstate-dir = \"{}\"\n[services.ssh]\nkind = \"management\"\nports = [\"22/tcp\"]\ntimeout = \"30s\"\n[clients.alice]\npublic-key = \"{}\"\nservices = [\"ssh\"]\nrequire-address = true\n",
            dir.display(),
            client.public_key()
        );
        let config = Config::parse(&dir.join("spad.toml"), &text).unwrap();
        let server = Server::new(PrivateKey::from_bytes([2; 32]));
        let p = Pipeline::new(config, server, Box::new(Memory::default()), clock).unwrap();
        (p, client, dir)
    }

    fn packet(client: &PrivateKey, kind: Kind, timestamp: Micros, duration_secs: u32) -> Vec<u8> {
        let request = Request {
            kind,
            timestamp,
            nonce: [7; 16],
            duration_secs,
            address: None,
            services: vec!["ssh".into()],
        };
        let server = PrivateKey::from_bytes([2; 32]).public_key();
        spa_shared::packet::seal(&mut rand_core::OsRng, client, &server, &request).unwrap()
    }

    fn udp<'a>(payload: &'a [u8], source: &str) -> Received<'a> {
        Received::Udp {
            source: source.parse().unwrap(),
            source_port: 40000,
            port: 62201,
            payload,
        }
    }

    #[test]
    fn a_packet_raced_from_another_address_does_not_lock_its_owner_out() {
        // The man-on-the-side re-sends a withheld require-address packet from his own address
        // first: refused there, and the owner's copy must still reach the handshake.
        let clock = ManualClock::new(NOW);
        let (mut p, client, dir) = setup_require_address(&clock);
        let request = Request {
            kind: Kind::Open,
            timestamp: NOW,
            nonce: [9; 16],
            duration_secs: 0,
            address: Some("198.51.100.7".parse().unwrap()),
            services: vec!["ssh".into()],
        };
        let server_key = PrivateKey::from_bytes([2; 32]).public_key();
        let bytes = spa_shared::packet::seal(&mut rand_core::OsRng, &client, &server_key, &request)
            .unwrap();
        p.handle(&udp(&bytes, "198.51.100.66"));
        assert_eq!(p.stats.granted, 0, "refused from the thief's address");
        p.handle(&udp(&bytes, "198.51.100.7"));
        assert_eq!(p.stats.granted, 1, "the owner still gets in");
        p.handle(&udp(&bytes, "198.51.100.7"));
        assert_eq!(
            p.stats.refusals.get(crate::refusal::Refusal::RecentPacket),
            1,
            "a true replay is still dropped before the handshake"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_batch_verified_on_several_threads_is_decided_exactly_as_on_one() {
        // One batch, in one order, through a one-thread and a three-thread pipeline: the
        // same grants, the same refusals by reason, the same journal.
        let run = |threads: usize| {
            let clock = ManualClock::new(NOW);
            let (mut p, client, dir) = setup_require_address(&clock);
            p.verifier = Verifier::new(threads);
            let server_key = PrivateKey::from_bytes([2; 32]).public_key();
            let sealed = |timestamp: Micros, address: Option<&str>| {
                let request = Request {
                    kind: Kind::Open,
                    timestamp,
                    nonce: [timestamp as u8; 16],
                    duration_secs: 0,
                    address: address.map(|a| a.parse().unwrap()),
                    services: vec!["ssh".into()],
                };
                let mut rng = rand_core::OsRng;
                spa_shared::packet::seal(&mut rng, &client, &server_key, &request).unwrap()
            };
            let fresh: Vec<Vec<u8>> = (0..12)
                .map(|n| sealed(NOW - 1_000 * n, Some("198.51.100.20")))
                .collect();
            let withheld = sealed(NOW - 50_000, Some("198.51.100.7"));
            let broken = forged(5); // a valid mac1 on bytes no client sealed
            let mut batch: Vec<(&[u8], &str)> = Vec::new();
            for (n, packet) in fresh.iter().enumerate() {
                batch.push((packet, "198.51.100.20"));
                if n % 4 == 0 {
                    batch.push((packet, "198.51.100.21")); // an in-batch replay
                }
            }
            batch.push((&withheld, "198.51.100.66")); // the thief, first
            batch.push((&withheld, "198.51.100.7")); // then its owner
            batch.push((&withheld, "198.51.100.7")); // then a true replay
            batch.push((&broken, "198.51.100.30"));
            batch.push((&broken, "198.51.100.31"));
            for (packet, source) in &batch {
                p.decide(&udp(packet, source));
            }
            p.flush();
            // And a replay in the next batch.
            p.handle(&udp(&fresh[3], "198.51.100.22"));
            let mut grants = p.firewall.list().unwrap();
            grants.sort_by_key(|g| format!("{g:?}"));
            let journal = std::fs::read(dir.join("replay.bin")).unwrap();
            std::fs::remove_dir_all(dir).unwrap();
            (p.stats.clone(), grants.len(), journal.len())
        };
        let one = run(1);
        assert_eq!(
            one.0.granted, 13,
            "12 fresh packets and the withheld one from its owner"
        );
        assert_eq!(
            one.0.refusals.get(Refusal::RecentPacket),
            5,
            "3 in-batch copies, 1 true replay, 1 next batch"
        );
        assert_eq!(one.0.refusals.get(Refusal::Policy), 1, "the thief");
        assert_eq!(
            one.0.refusals.get(Refusal::Handshake),
            2,
            "the broken packet and its copy"
        );
        assert_eq!(run(3), one);
    }

    #[test]
    fn grants_for_the_source_with_the_requested_duration_capped() {
        let clock = ManualClock::new(NOW);
        let (mut p, client, dir) = setup(&clock);
        p.handle(&udp(
            &packet(&client, Kind::Open, NOW, 7200),
            "198.51.100.7",
        ));
        let grants = p.firewall.list().unwrap();
        assert_eq!(grants.len(), 1);
        assert_eq!(grants[0].address.to_string(), "198.51.100.7");
        assert_eq!(
            grants[0].remaining,
            std::time::Duration::from_secs(3600),
            "capped at max-timeout"
        );
        assert_eq!(p.stats.granted, 1);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn garbage_replay_and_stale_are_refused_without_grants() {
        let clock = ManualClock::new(NOW);
        let (mut p, client, dir) = setup(&clock);
        p.handle(&udp(&[0u8; 200], "198.51.100.9"));
        assert_eq!(p.stats.precheck_dropped, 1);
        let good = packet(&client, Kind::Open, NOW, 0);
        p.handle(&udp(&good, "198.51.100.7"));
        p.firewall
            .revoke("198.51.100.7".parse().unwrap(), &["ssh".into()])
            .unwrap();
        p.handle(&udp(&good, "198.51.100.8"));
        clock.advance(120_000_000);
        p.handle(&udp(&packet(&client, Kind::Open, NOW, 0), "198.51.100.7"));
        assert!(p.firewall.list().unwrap().is_empty());
        assert_eq!((p.stats.granted, p.stats.refused), (1, 3));
        assert_eq!(
            p.stats.refusals.to_string(),
            "mac1=1 recent_packet=1 stale=1",
            "each drop counted by its reason"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn close_revokes_and_replay_state_survives_a_new_pipeline() {
        let clock = ManualClock::new(NOW);
        let (mut p, client, dir) = setup(&clock);
        let open = packet(&client, Kind::Open, NOW, 0);
        p.handle(&udp(&open, "198.51.100.7"));
        p.handle(&udp(
            &packet(&client, Kind::Close, NOW + 1, 0),
            "198.51.100.7",
        ));
        assert!(p.firewall.list().unwrap().is_empty());
        assert_eq!(p.stats.closed, 1);
        // A fresh pipeline (a restart) on the same state directory still refuses the packet.
        let (config, server) = (
            p.config.clone(),
            Server::new(PrivateKey::from_bytes([2; 32])),
        );
        drop(p);
        let mut again = Pipeline::new(config, server, Box::new(Memory::default()), &clock).unwrap();
        again.handle(&udp(&open, "198.51.100.7"));
        assert_eq!((again.stats.granted, again.stats.refused), (0, 1));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_batch_grants_once_per_packet_in_order_after_one_commit() {
        let clock = ManualClock::new(NOW);
        let (mut p, client, dir) = setup(&clock);
        let open = packet(&client, Kind::Open, NOW, 0);
        let close = packet(&client, Kind::Close, NOW + 1, 0);
        let other = packet(&client, Kind::Open, NOW + 2, 0);
        // Two copies of one packet, then a close and another open, all in one batch.
        p.decide(&udp(&open, "198.51.100.7"));
        p.decide(&udp(&open, "198.51.100.8"));
        p.decide(&udp(&close, "198.51.100.7"));
        p.decide(&udp(&other, "198.51.100.9"));
        assert!(
            p.firewall.list().unwrap().is_empty(),
            "nothing before the commit"
        );
        p.flush();
        let live: Vec<String> = p
            .firewall
            .list()
            .unwrap()
            .iter()
            .map(|g| g.address.to_string())
            .collect();
        assert_eq!(
            live,
            ["198.51.100.9"],
            "opened, closed in order, copy refused"
        );
        assert_eq!(
            (p.stats.granted, p.stats.closed, p.stats.refused),
            (2, 1, 1)
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// The journal syncing on its own thread: grants wait for their sync while the pipeline
    /// keeps deciding; what was decided meanwhile goes with the next sync, in order; a failed
    /// sync refuses its grants and the next packet is granted again.
    #[test]
    fn grants_wait_for_their_background_sync_and_the_pipeline_keeps_deciding() {
        let clock = ManualClock::new(NOW);
        let (mut p, client, dir) = setup(&clock);
        let mut store = ReplayStore::load(dir.join("bg.bin"), window(&p.config), NOW).0;
        let (woke, wakes) = std::sync::mpsc::channel::<()>();
        let woke = std::sync::Mutex::new(woke);
        let wake: crate::journal_sync::Wake = Arc::new(move || {
            let _ = woke.lock().map(|w| w.send(()));
        });
        let gate = store.gate_background_syncs(wake);
        p.replay = Box::new(store);
        let live = |p: &mut Pipeline<&ManualClock>| {
            let mut v: Vec<String> = p
                .firewall
                .list()
                .unwrap()
                .iter()
                .map(|g| g.address.to_string())
                .collect();
            v.sort();
            v
        };
        let wait_for_sync = |p: &mut Pipeline<&ManualClock>| {
            wakes
                .recv_timeout(std::time::Duration::from_secs(10))
                .expect("the sync thread woke us");
            p.commit_done();
        };

        let first = packet(&client, Kind::Open, NOW, 0);
        p.handle(&udp(&first, "198.51.100.1"));
        assert!(live(&mut p).is_empty(), "not granted before its sync");
        // Meanwhile: its replay is refused at once, and a new packet is decided and waits.
        p.handle(&udp(&first, "198.51.100.66"));
        assert_eq!(p.stats.refusals.get(Refusal::RecentPacket), 1);
        let second = packet(&client, Kind::Open, NOW + 1, 0);
        p.handle(&udp(&second, "198.51.100.2"));
        assert!(live(&mut p).is_empty());
        // A sync that takes long is reported once by the housekeeping tick.
        p.tick();
        assert!(!p.slow_reported);
        clock.advance(SLOW_COMMIT);
        p.tick();
        assert!(p.slow_reported, "a slow sync is reported");
        gate.send(true).unwrap();
        wait_for_sync(&mut p);
        assert_eq!(
            live(&mut p),
            ["198.51.100.1"],
            "the first sync's grant only"
        );
        gate.send(true).unwrap();
        wait_for_sync(&mut p);
        assert_eq!(live(&mut p), ["198.51.100.1", "198.51.100.2"]);

        // A sync that fails: its grant is refused; the next packet is granted (the journal is
        // rewritten on the spot).
        let third = packet(&client, Kind::Open, NOW + 2, 0);
        p.handle(&udp(&third, "198.51.100.3"));
        gate.send(false).unwrap();
        wait_for_sync(&mut p);
        assert_eq!(p.stats.refusals.get(Refusal::Persist), 1);
        let fourth = packet(&client, Kind::Open, NOW + 3, 0);
        p.handle(&udp(&fourth, "198.51.100.4"));
        assert_eq!(
            live(&mut p),
            ["198.51.100.1", "198.51.100.2", "198.51.100.4"],
            "the failed sync's grant never opened"
        );
        assert_eq!((p.stats.granted, p.stats.refused), (3, 2));
        drop(gate);
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A reload that removes a client while that client's grant waits for its journal sync:
    /// the grant lands first and the reload prunes it; it never lands after the reload.
    #[test]
    fn a_reload_settles_grants_in_flight_before_it_prunes() {
        let clock = ManualClock::new(NOW);
        let (mut p, client, dir) = setup(&clock);
        let mut store = ReplayStore::load(dir.join("bg.bin"), window(&p.config), NOW).0;
        let gate = store.gate_background_syncs(Arc::new(|| {}));
        p.replay = Box::new(store);
        p.handle(&udp(&packet(&client, Kind::Open, NOW, 0), "198.51.100.1"));
        assert!(
            p.firewall.list().unwrap().is_empty(),
            "waiting for its sync"
        );
        // The operator removes alice and reloads; the sync completes meanwhile.
        let text = format!(
            "[server]\nprivate-key = \"k\"\nstate-dir = \"{}\"\n[services.ssh]\nkind = \"management\"\nports = [\"22/tcp\"]\ntimeout = \"30s\"\n",
            dir.display()
        );
        let config = Config::parse(&dir.join("spad.toml"), &text).unwrap();
        gate.send(true).unwrap();
        p.reload(config, Server::new(PrivateKey::from_bytes([2; 32])))
            .unwrap();
        assert_eq!(p.stats.granted, 1, "granted under the old configuration");
        p.commit_done();
        p.flush();
        assert!(
            p.firewall.list().unwrap().is_empty(),
            "alice's grant must not outlive the reload that removed her"
        );
        drop(gate);
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A store whose commits fail (a full disk).
    #[derive(Debug)]
    struct FullDisk(ReplayStore);
    impl ReplayState for FullDisk {
        fn window(&self) -> Window {
            self.0.window()
        }
        fn check(
            &self,
            c: &spa_shared::keys::PublicKey,
            t: Micros,
            now: Micros,
        ) -> Result<(), crate::state::ReplayRefusal> {
            self.0.check(c, t, now)
        }
        fn accept(
            &mut self,
            c: &spa_shared::keys::PublicKey,
            t: Micros,
            now: Micros,
        ) -> Result<(), crate::state::ReplayRefusal> {
            self.0.accept(c, t, now)
        }
        fn check_digest(
            &self,
            d: &[u8; 32],
            now: Micros,
        ) -> Result<(), crate::state::ReplayRefusal> {
            self.0.check_digest(d, now)
        }
        fn accept_digest(
            &mut self,
            d: [u8; 32],
            until: Micros,
            now: Micros,
        ) -> Result<(), crate::state::ReplayRefusal> {
            self.0.accept_digest(d, until, now)
        }
        fn uncommitted(&self) -> bool {
            self.0.uncommitted()
        }
        fn commit(&mut self, _now: Micros) -> Result<(), crate::state::ReplayRefusal> {
            Err(crate::state::ReplayRefusal::Persist(
                "No space left on device".into(),
            ))
        }
        fn retain_clients(&mut self, keep: &dyn Fn(&spa_shared::keys::PublicKey) -> bool) {
            self.0.retain_clients(keep)
        }
    }

    #[test]
    fn nothing_opens_when_the_journal_cannot_be_made_durable() {
        let clock = ManualClock::new(NOW);
        let (mut p, client, dir) = setup(&clock);
        let path = dir.join("other.bin");
        p.replay = Box::new(FullDisk(ReplayStore::load(path, window(&p.config), NOW).0));
        p.handle(&udp(&packet(&client, Kind::Open, NOW, 0), "198.51.100.7"));
        assert!(p.firewall.list().unwrap().is_empty());
        assert_eq!((p.stats.granted, p.stats.refused), (0, 1));
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// Valid mac1 (anyone who knows the server's public key can make one), junk inside.
    fn forged(n: u8) -> Vec<u8> {
        let server = PrivateKey::from_bytes([2; 32]).public_key();
        let mut body = vec![n; spa_shared::packet::MIN_LEN - spa_shared::mac::MAC_LEN];
        body[..32].copy_from_slice(PrivateKey::from_bytes([n; 32]).public_key().as_bytes());
        let tag = spa_shared::mac::PrecheckKey::new(&server).tag(&body);
        body.extend_from_slice(&tag);
        body
    }

    #[test]
    fn a_replayed_valid_packet_is_dropped_before_the_handshake_from_any_source() {
        let clock = ManualClock::new(NOW);
        let (mut p, client, dir) = setup(&clock);
        let good = packet(&client, Kind::Open, NOW, 0);
        p.handle(&udp(&good, "198.51.100.7"));
        for i in 0..50 {
            p.handle(&udp(&good, &format!("198.51.100.{}", 100 + i)));
        }
        assert_eq!(p.stats.granted, 1);
        assert_eq!(p.stats.refusals.get(Refusal::RecentPacket), 50);
        assert_eq!(p.stats.refusals.get(Refusal::Handshake), 0);
        assert_eq!(p.stats.refusals.get(Refusal::Replayed), 0);
        // Sources that only replayed spent no handshake budget.
        assert_eq!(p.buckets.sources(), 1);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn one_source_spending_its_handshake_budget_does_not_starve_another() {
        let clock = ManualClock::new(NOW);
        let (mut p, client, dir) = setup(&clock);
        p.buckets = SourceBuckets::new(10, 20);
        for n in 0..100 {
            p.handle(&udp(&forged(n), "198.51.100.66"));
        }
        assert_eq!(p.stats.refusals.get(Refusal::Handshake), 20, "the burst");
        assert_eq!(p.stats.refusals.get(Refusal::RateLimited), 80);
        p.handle(&udp(&packet(&client, Kind::Open, NOW, 0), "198.51.100.7"));
        assert_eq!(p.stats.granted, 1, "another source is served");
        clock.advance(100_000);
        p.handle(&udp(&forged(200), "198.51.100.66"));
        assert_eq!(
            p.stats.refusals.get(Refusal::Handshake),
            21,
            "refilled at the rate"
        );
        assert_eq!(p.stats.refused, p.stats.refusals.total());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
