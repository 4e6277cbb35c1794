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
    monitor: Option<Monitor>,
    interval: Duration,
    next_check: Instant,
    table: String,
}

impl Guard {
    /// Starts watching the protection `firewall` has just installed for `config`.
    pub fn new(firewall: &mut dyn Firewall, config: &Config) -> (Self, Option<String>) {
        let nft = firewall.name() == "nftables";
        let (monitor, warning) = if nft {
            match Monitor::open(NFNLGRP_NFTABLES) {
                Ok(m) => (Some(m), None),
                Err(e) => (
                    None,
                    Some(format!(
                        "warning: no nftables monitor ({e}); checking the ruleset every {}s",
                        POLL_IPTABLES.as_secs_f32()
                    )),
                ),
            }
        } else {
            (None, None)
        };
        let interval = if monitor.is_some() {
            POLL_NFTABLES
        } else {
            POLL_IPTABLES
        };
        let mut guard = Self {
            expected: String::new(),
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
    pub fn rearm(&mut self, firewall: &mut dyn Firewall) {
        if let Ok(fingerprint) = firewall.protection() {
            self.expected = fingerprint;
        }
        self.next_check = Instant::now() + self.interval;
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
                for (kind, body) in &events {
                    if let Some((added, elements)) = element_changes(*kind, body, &self.table) {
                        for element in &elements {
                            firewall.observe_element(added, element);
                        }
                    }
                }
                events
                    .iter()
                    .any(|(kind, body)| touches_table(*kind, body, &self.table))
            }
            // Lost events (ENOBUFS) or a broken socket: re-read the live grants (an element
            // event may be among those lost), then check.
            Err(_) => {
                let _ = firewall.resync_grants();
                true
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
        let what = if current.is_empty() {
            "removed"
        } else {
            "altered"
        };
        let mut lines = vec![format!(
            "error: the protection (table {}) on {} was {what} outside spad; reinstalling it",
            self.table,
            firewall.name()
        )];
        match firewall.repair(config) {
            Ok(kept) => {
                self.rearm(firewall);
                lines.push(format!(
                    "protection reinstalled on {}; kept {kept} live grants",
                    firewall.name()
                ));
            }
            Err(e) => {
                // Retry on the next turn of the loop.
                self.next_check = now;
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

    #[test]
    fn damage_is_repaired_and_logged_once() {
        let config = Config::parse(
            std::path::Path::new("t.toml"),
            "[server]\nprivate-key = \"k\"\n[services.ssh]\nkind = \"management\"\nports = [\"22/tcp\"]\ntimeout = \"30s\"\n",
        )
        .unwrap();
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
