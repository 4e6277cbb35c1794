//! Keeps the protection in place while spad runs: if anyone deletes or alters spad's table,
//! a chain, a set or a jump, the guard notices, logs an error and rebuilds it from the
//! configuration, keeping the grants that survived.
//!
//! It compares the backend's [`Firewall::protection`] fingerprint (everything but set
//! elements) with the one taken after spad's own last install. nftables announces every
//! committed change on the `NFNLGRP_NFTABLES` netlink group, so a change to spad's table is
//! checked at once; iptables and ipset send no such events and are checked periodically.
//! A slow periodic check runs on nftables too, in case events were lost.

use std::time::{Duration, Instant};

use super::netlink::Monitor;
use super::nftables::Carried;
use super::Firewall;
use crate::config::Config;

/// `NFNLGRP_NFTABLES`.
const NFNLGRP_NFTABLES: u32 = 7;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFPROTO_INET: u8 = 1;
/// nftables messages that change a table, chain, rule or set (not elements: those are grants).
const STRUCTURAL: [u16; 8] = [0, 2, 3, 5, 6, 8, 9, 11];
/// How often the fingerprint is compared without an event (iptables: the only way).
pub const POLL_IPTABLES: Duration = Duration::from_millis(700);
pub const POLL_NFTABLES: Duration = Duration::from_secs(5);

/// `NFT_MSG_NEWSETELEM` / `NFT_MSG_DELSETELEM`: grants added or removed (by spad, or by
/// `spad revoke` in another process).
const NEWSETELEM: u16 = 12;
const DELSETELEM: u16 = 14;
/// `NFT_MSG_NEWGEN`: sent after each committed transaction, after its other events, from
/// the netlink port of the socket that committed it.
const NEWGEN: u16 = 15;
/// The most monitor reads a re-arm makes to empty the queue (each up to a batch of them).
const REARM_DRAINS: usize = 64;
/// What the guard expects when it may not trust the kernel's protection: it matches nothing,
/// so the next check repairs.
const UNTRUSTED: &str = "(untrusted: changed by another process around spad's own install)";

/// A monitor message: `(nlmsg type, sender's netlink port, body)`.
type Event = (u16, u32, Vec<u8>);

/// Why a reading of the protection was not taken as the norm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Distrust {
    /// Nothing installed, or another process changed the table's structure last.
    Another,
    /// The monitor lost events (ENOBUFS, or a failed read): who changed what is unknown.
    Lost,
}
/// Readings distrusted in a row that are repaired at once; after them, at most one repair per
/// [`RETRY_AFTER`] (someone keeps changing the table, or spad cannot tell its own `nft` runs
/// apart): never trusted, never a busy loop.
const DISTRUSTS_AT_ONCE: u32 = 3;
/// How soon a failed or repeated repair is tried again.
const RETRY_AFTER: Duration = Duration::from_millis(500);
/// `NFTA_SET_ELEM_LIST_SET`.
const SET_ATTR: u16 = 2;

/// Whether a monitor message is a structural change to `table` of the inet family.
pub fn touches_table(kind: u16, body: &[u8], table: &str) -> bool {
    STRUCTURAL.contains(&(kind & 0xff)) && of_table(kind, body, table)
}

/// The elements a monitor message adds (`true`) or removes (`false`) in `table`.
pub fn element_changes(kind: u16, body: &[u8], table: &str) -> Option<(bool, Vec<Carried>)> {
    let added = match kind & 0xff {
        NEWSETELEM => true,
        DELSETELEM => false,
        _ => return None,
    };
    if !of_table(kind, body, table) {
        return None;
    }
    let set = super::netlink::attributes(body.get(4..)?)
        .into_iter()
        .find(|(k, _)| *k == SET_ATTR)
        .map(|(_, v)| {
            String::from_utf8_lossy(v.split(|b| *b == 0).next().unwrap_or_default()).into_owned()
        })?;
    Some((
        added,
        super::nftables::parse_element_dump(&set, &[body.to_vec()]),
    ))
}

/// Whether a monitor message is the end of a committed transaction (`NFT_MSG_NEWGEN`).
fn ends_transaction(kind: u16) -> bool {
    kind >> 8 == NFNL_SUBSYS_NFTABLES && kind & 0xff == NEWGEN
}

/// Whether, in `events` (`(kind, sender port, body)` in the kernel's order), the last
/// transaction that changed `table`'s structure came from a netlink port `ours` does not know:
/// then a fingerprint of the protection read before these events may already hold that
/// change. A process's first netlink socket gets its process id as port (as `nft` does), so
/// spad knows the ports of the `nft` runs it started; a port it cannot place (a clash gives a
/// random one) makes it repair once more, never less.
pub fn changed_by_another(events: &[Event], table: &str, ours: impl Fn(u32) -> bool) -> bool {
    let mut touched = false;
    let mut another = false;
    for (kind, sender, body) in events {
        if touches_table(*kind, body, table) {
            touched = true;
        } else if ends_transaction(*kind) {
            if touched {
                another = !ours(*sender);
            }
            touched = false;
        }
    }
    another
}

fn of_table(kind: u16, body: &[u8], table: &str) -> bool {
    if kind >> 8 != NFNL_SUBSYS_NFTABLES {
        return false;
    }
    if body.first() != Some(&NFPROTO_INET) {
        return false;
    }
    // Attribute 1 is the table name in table, chain, rule and set messages alike.
    super::netlink::attributes(body.get(4..).unwrap_or_default())
        .into_iter()
        .find(|(k, _)| *k == 1)
        .is_some_and(|(_, v)| v.split(|b| *b == 0).next() == Some(table.as_bytes()))
}

/// The watcher: owned by the daemon loop, polled when the monitor has events and when the
/// periodic check is due.
#[derive(Debug)]
pub struct Guard {
    expected: String,
    /// Re-arms in a row that did not trust the kernel (see [`Guard::rearm`]).
    distrusts: u32,
    /// Why the last re-arm did not trust the kernel, if it did not.
    untrusted: Option<Distrust>,
    monitor: Option<Monitor>,
    interval: Duration,
    next_check: Instant,
    table: String,
}

/// The guard's subscription to the kernel's ruleset events, taken before spad installs its
/// protection, so no change made around the install goes unseen.
#[derive(Debug)]
pub struct Subscription {
    monitor: Option<Monitor>,
    warning: Option<String>,
}

impl Subscription {
    /// Subscribes for a backend named `backend` (only nftables announces changes).
    pub fn open(backend: &str) -> Self {
        if backend != "nftables" {
            return Self {
                monitor: None,
                warning: None,
            };
        }
        match Monitor::open(NFNLGRP_NFTABLES) {
            Ok(m) => Self {
                monitor: Some(m),
                warning: None,
            },
            Err(e) => Self {
                monitor: None,
                warning: Some(format!(
                    "warning: no nftables monitor ({e}); checking the ruleset every {}s",
                    POLL_IPTABLES.as_secs_f32()
                )),
            },
        }
    }
}

impl Guard {
    /// Starts watching the protection `firewall` has just installed for `config`, subscribing
    /// only now (see [`Guard::watching`] for a subscription taken before the install).
    pub fn new(firewall: &mut dyn Firewall, config: &Config) -> (Self, Option<String>) {
        Self::watching(Subscription::open(firewall.name()), firewall, config)
    }

    /// Starts watching the protection `firewall` has installed for `config` since
    /// `subscription` was taken.
    pub fn watching(
        subscription: Subscription,
        firewall: &mut dyn Firewall,
        config: &Config,
    ) -> (Self, Option<String>) {
        let Subscription { monitor, warning } = subscription;
        let interval = if monitor.is_some() {
            POLL_NFTABLES
        } else {
            POLL_IPTABLES
        };
        let mut guard = Self {
            expected: String::new(),
            distrusts: 0,
            untrusted: None,
            monitor,
            interval,
            next_check: Instant::now(),
            table: config.server.table.clone(),
        };
        guard.rearm(firewall);
        (guard, warning)
    }

    /// The monitor's socket, readable when the kernel announced a change (nftables only).
    pub fn event_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.monitor.as_ref().map(Monitor::fd)
    }

    /// When the next periodic check is due, events or not.
    pub fn next_check(&self) -> Instant {
        self.next_check
    }

    /// Takes the current protection as the reference: after spad's own install or reload.
    ///
    /// The fingerprint is read first, then the events queued since are looked at: if another
    /// process changed the table's structure after spad's own last change (say, someone
    /// deleted the table between spad's install and this read), the fingerprint may hold that
    /// change, and is not trusted: the next check, at once, repairs. An empty reading (nothing
    /// installed, right after spad installed) is never trusted either, nor one taken while
    /// the monitor lost events (a change by anyone may be among them).
    pub fn rearm(&mut self, firewall: &mut dyn Firewall) {
        let fingerprint = firewall.protection();
        let mut events = Vec::new();
        let mut lost = false;
        if let Some(monitor) = &mut self.monitor {
            for _ in 0..REARM_DRAINS {
                match monitor.drain() {
                    Ok(batch) if batch.is_empty() => break,
                    Ok(batch) => events.extend(batch),
                    Err(_) => {
                        lost = true;
                        break;
                    }
                }
            }
        }
        self.observe_elements(firewall, &events);
        if lost {
            // An element event may be among those lost.
            let _ = firewall.resync_grants();
        }
        self.adopt(fingerprint, &events, lost);
    }

    /// Takes `fingerprint`, read before `events` (drained from the monitor; `lost`: some were
    /// lost), as the norm, or distrusts it. A distrusted reading is repaired at once, three
    /// times in a row at most, then once per [`RETRY_AFTER`]. Lost events are repaired at once
    /// the first time in a row only, then once per interval (5 s): the loss may come from
    /// spad's own rebuild of many grants where the kernel kept the monitor's buffer small,
    /// and a rebuild must not feed the next one.
    fn adopt(&mut self, fingerprint: anyhow::Result<String>, events: &[Event], lost: bool) {
        let now = Instant::now();
        let fingerprint = match fingerprint {
            Ok(fingerprint) => fingerprint,
            Err(_) => {
                self.next_check = now + self.interval;
                return;
            }
        };
        let distrust = if fingerprint.is_empty() {
            Some(Distrust::Another)
        } else if lost {
            Some(Distrust::Lost)
        } else if changed_by_another(events, &self.table, super::changed_by_us) {
            Some(Distrust::Another)
        } else {
            None
        };
        self.untrusted = distrust;
        let Some(distrust) = distrust else {
            self.distrusts = 0;
            self.expected = fingerprint;
            self.next_check = now + self.interval;
            return;
        };
        self.distrusts = self.distrusts.saturating_add(1);
        self.expected = UNTRUSTED.to_string();
        let (at_once, then_every) = match distrust {
            Distrust::Another => (DISTRUSTS_AT_ONCE, RETRY_AFTER),
            Distrust::Lost => (1, self.interval),
        };
        self.next_check = if self.distrusts <= at_once {
            now
        } else {
            now + then_every
        };
    }

    /// Drains the monitor: whether the protection must be checked now. Element changes are
    /// passed to the backend, so what it remembers of its grants follows the kernel (a grant
    /// revoked by another process is not restored by a later repair).
    fn event_seen(&mut self, firewall: &mut dyn Firewall) -> bool {
        let Some(monitor) = &mut self.monitor else {
            return false;
        };
        match monitor.drain() {
            Ok(events) => {
                self.observe_elements(firewall, &events);
                events
                    .iter()
                    .any(|(kind, _, body)| touches_table(*kind, body, &self.table))
            }
            // Lost events (ENOBUFS) or a broken socket: re-read the live grants (an element
            // event may be among those lost), then check.
            Err(_) => {
                let _ = firewall.resync_grants();
                true
            }
        }
    }

    /// Passes the element changes among `events` to the backend, so what it remembers of its
    /// grants follows the kernel.
    fn observe_elements(&self, firewall: &mut dyn Firewall, events: &[Event]) {
        for (kind, _, body) in events {
            if let Some((added, elements)) = element_changes(*kind, body, &self.table) {
                for element in &elements {
                    firewall.observe_element(added, element);
                }
            }
        }
    }

    /// Checks the protection if an event or the timer says so; repairs it if it was damaged.
    /// Returns the log lines to write.
    pub fn poll(&mut self, firewall: &mut dyn Firewall, config: &Config) -> Vec<String> {
        let now = Instant::now();
        if !self.event_seen(firewall) && now < self.next_check {
            return Vec::new();
        }
        self.next_check = now + self.interval;
        let current = match firewall.protection() {
            Ok(c) => c,
            Err(e) => {
                return vec![format!(
                    "error: cannot read the firewall to check it: {e:#}"
                )]
            }
        };
        if current == self.expected {
            return Vec::new();
        }
        let first = if self.untrusted == Some(Distrust::Lost) && !current.is_empty() {
            format!(
                "warning: kernel events were lost around spad's own change, so the protection (table {}) on {} cannot be verified; reinstalling it",
                self.table,
                firewall.name()
            )
        } else {
            let what = if current.is_empty() {
                "removed"
            } else {
                "altered"
            };
            format!(
                "error: the protection (table {}) on {} was {what} outside spad; reinstalling it",
                self.table,
                firewall.name()
            )
        };
        let mut lines = vec![first];
        match firewall.repair(config) {
            Ok(kept) => {
                self.rearm(firewall);
                lines.push(format!(
                    "protection reinstalled on {}; kept {kept} live grants",
                    firewall.name()
                ));
            }
            Err(e) => {
                // Retry soon, not on every turn of the loop: the guard comes before the
                // capture in the loop's order, and a failing `nft` must not starve it.
                self.next_check = now + RETRY_AFTER;
                lines.push(format!("error: reinstalling the protection failed: {e:#}"));
            }
        }
        lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firewall::memory::Memory;
    use crate::firewall::netlink::Message;

    /// Who made the last structural change to the table decides; element changes, other
    /// tables and transactions without structural changes do not count.
    #[test]
    fn the_last_structural_change_names_its_sender() {
        let structural = |table: &str| {
            let mut m = Message::new((NFNL_SUBSYS_NFTABLES << 8) | 2, 0, NFPROTO_INET, 0);
            m.attr_str(1, table);
            ((NFNL_SUBSYS_NFTABLES << 8) | 2, m.finish(1)[16..].to_vec())
        };
        let element = {
            let mut m = Message::new((NFNL_SUBSYS_NFTABLES << 8) | NEWSETELEM, 0, NFPROTO_INET, 0);
            m.attr_str(1, "spad");
            (
                (NFNL_SUBSYS_NFTABLES << 8) | NEWSETELEM,
                m.finish(1)[16..].to_vec(),
            )
        };
        let gen = ((NFNL_SUBSYS_NFTABLES << 8) | NEWGEN, vec![1, 0, 0, 0]);
        let from = |event: &(u16, Vec<u8>), sender: u32| (event.0, sender, event.1.clone());
        let ours = |port: u32| port == 100;
        let spad = structural("spad");
        let other = structural("other");
        // spad's install, then someone deletes a chain of it: another's.
        let events = vec![
            from(&spad, 100),
            from(&gen, 100),
            from(&spad, 7),
            from(&gen, 7),
        ];
        assert!(changed_by_another(&events, "spad", ours));
        // Someone's change first, then spad's install over it: spad's.
        let events = vec![
            from(&spad, 7),
            from(&gen, 7),
            from(&spad, 100),
            from(&gen, 100),
        ];
        assert!(!changed_by_another(&events, "spad", ours));
        // After spad's install: others' grants, another table, a transaction of elements only.
        let events = vec![
            from(&spad, 100),
            from(&gen, 100),
            from(&element, 7),
            from(&gen, 7),
            from(&other, 8),
            from(&gen, 8),
        ];
        assert!(!changed_by_another(&events, "spad", ours));
        assert!(!changed_by_another(&[], "spad", ours));
    }

    #[test]
    fn structural_events_of_our_inet_table_only() {
        let event = |kind: u16, family: u8, table: &str| {
            let mut m = Message::new((NFNL_SUBSYS_NFTABLES << 8) | kind, 0, family, 0);
            m.attr_str(1, table);
            m.finish(1)[16..].to_vec()
        };
        let ours = |kind, family, table| {
            touches_table(
                (NFNL_SUBSYS_NFTABLES << 8) | kind,
                &event(kind, family, table),
                "spad",
            )
        };
        assert!(ours(2, 1, "spad"), "table deleted");
        assert!(ours(8, 1, "spad"), "rule deleted");
        assert!(ours(11, 1, "spad"), "set deleted");
        assert!(
            !ours(12, 1, "spad"),
            "element added: a grant, not protection"
        );
        assert!(!ours(8, 1, "other"), "another table");
        assert!(!ours(8, 2, "spad"), "an ip-family table of the same name");
        assert!(!ours(8, 1, "spadx"));
        assert!(
            !touches_table(0x0102, &[1, 0, 0, 0], "spad"),
            "another subsystem"
        );
    }

    fn ssh_config() -> Config {
        Config::parse(
            std::path::Path::new("t.toml"),
            "[server]\nprivate-key = \"k\"\n[services.ssh]\nkind = \"management\"\nports = [\"22/tcp\"]\ntimeout = \"30s\"\n",
        )
        .unwrap()
    }

    /// Another process alters the table around spad's own change and the events that would
    /// say so are lost: the reading, which already holds the change, is not taken as the
    /// norm; the next check rebuilds at once and says why, and the rebuilt protection is
    /// trusted. Losses in a row rebuild once per interval, never in a loop. (The monitor is a
    /// kernel socket; the decision after a drain is what is tested here.)
    #[test]
    fn a_reading_taken_while_events_were_lost_is_rebuilt_not_trusted() {
        let config = ssh_config();
        let mut fw = Memory::default();
        fw.install(&config).unwrap();
        let (mut guard, _) = Guard::new(&mut fw, &config);
        fw.installs += 5;
        let reading = fw.protection();
        guard.adopt(reading, &[], true);
        assert!(guard.next_check() <= Instant::now(), "checked at once");
        let lines = guard.poll(&mut fw, &config);
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(
            lines[0].starts_with("warning: kernel events were lost"),
            "{lines:?}"
        );
        assert!(lines[1].starts_with("protection reinstalled"), "{lines:?}");
        guard.next_check = Instant::now();
        assert!(
            guard.poll(&mut fw, &config).is_empty(),
            "the rebuild is trusted"
        );
        // Lost again, twice in a row: the second waits for the interval.
        guard.adopt(fw.protection(), &[], true);
        assert!(guard.next_check() <= Instant::now());
        let before = Instant::now();
        guard.adopt(fw.protection(), &[], true);
        assert!(guard.next_check() >= before + guard.interval);
        assert!(guard.poll(&mut fw, &config).is_empty(), "not due yet");
        // A missing table is never waited for like a loss: at once, three times in a row.
        guard.distrusts = 0;
        for _ in 0..DISTRUSTS_AT_ONCE {
            guard.adopt(Ok(String::new()), &[], true);
            assert!(guard.next_check() <= Instant::now());
        }
        let before = Instant::now();
        guard.adopt(Ok(String::new()), &[], true);
        assert!(guard.next_check() >= before + RETRY_AFTER);
        assert!(guard.next_check() < before + guard.interval);
    }

    /// The same against the real kernel, in a network namespace of the test's own (needs
    /// root and `nft`; says so and passes without): after spad's install, the monitor's
    /// buffer overflows (another table's elements) and another process flushes spad's input
    /// chain. The guard's first reading holds the flushed chain and its drain meets ENOBUFS:
    /// the next check rebuilds the chain.
    #[test]
    fn a_flushed_chain_hidden_by_lost_events_is_put_back() {
        use crate::firewall::nftables::{self, Nftables};
        if !rustix::process::geteuid().is_root() || !nftables::available() {
            eprintln!("skipped: needs root and nft");
            return;
        }
        let run = || -> anyhow::Result<()> {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)?;
            let config = Config::parse(
                std::path::Path::new("t.toml"),
                "[server]\nprivate-key = \"k\"\ntable = \"spadlost\"\n[services.ssh]\nkind = \"management\"\nports = [\"22/tcp\"]\ntimeout = \"30s\"\n",
            )?;
            let nft = |input: &str| -> anyhow::Result<()> {
                let mut child = std::process::Command::new("nft")
                    .args(["-f", "-"])
                    .stdin(std::process::Stdio::piped())
                    .spawn()?;
                use std::io::Write as _;
                child
                    .stdin
                    .take()
                    .expect("stdin")
                    .write_all(input.as_bytes())?;
                anyhow::ensure!(child.wait()?.success(), "nft failed");
                Ok(())
            };
            let rules = || -> anyhow::Result<usize> {
                let out = std::process::Command::new("nft")
                    .args(["list", "chain", "inet", "spadlost", "input"])
                    .output()?;
                Ok(String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .filter(|l| {
                        !l.contains("policy") && (l.contains("accept") || l.contains("drop"))
                    })
                    .count())
            };
            let subscription = Subscription::open("nftables");
            let monitor = subscription.monitor.as_ref().expect("a monitor");
            // The smallest buffer the kernel allows: a few events fill it.
            nix::sys::socket::setsockopt(&monitor.fd(), nix::sys::socket::sockopt::RcvBuf, &1)?;
            let mut fw = Nftables::open("spadlost")?;
            fw.install(&config)?;
            let installed = rules()?;
            assert!(installed > 0);
            let elements: Vec<String> = (0..500)
                .map(|i| format!("10.9.{}.{}", i / 250, i % 250))
                .collect();
            nft(&format!(
                "table inet other {{\n  set flood {{ type ipv4_addr; elements = {{ {} }}; }}\n}}\n",
                elements.join(", ")
            ))?;
            nft("flush chain inet spadlost input")?;
            assert_eq!(rules()?, 0);
            let (mut guard, _) = Guard::watching(subscription, &mut fw, &config);
            assert_eq!(guard.untrusted, Some(Distrust::Lost), "events were lost");
            let lines = guard.poll(&mut fw, &config);
            assert!(
                lines
                    .iter()
                    .any(|l| l.starts_with("protection reinstalled")),
                "{lines:?}"
            );
            assert_eq!(rules()?, installed, "the flushed chain is back");
            Ok(())
        };
        std::thread::spawn(run).join().unwrap().unwrap();
    }

    #[test]
    fn damage_is_repaired_and_logged_once() {
        let config = ssh_config();
        let mut fw = Memory::default();
        fw.install(&config).unwrap();
        let (mut guard, warning) = Guard::new(&mut fw, &config);
        assert!(warning.is_none());
        guard.next_check = Instant::now();
        assert!(guard.poll(&mut fw, &config).is_empty(), "intact");
        // Someone else changes it (the memory fingerprint counts installs).
        fw.installs += 5;
        guard.next_check = Instant::now();
        let lines = guard.poll(&mut fw, &config);
        assert!(lines[0].starts_with("error: the protection"), "{lines:?}");
        assert!(lines[1].starts_with("protection reinstalled"), "{lines:?}");
        guard.next_check = Instant::now();
        assert!(guard.poll(&mut fw, &config).is_empty(), "repaired");
    }
}
