//! iptables + ipset backend (placeholder until implemented).
use std::net::IpAddr;
use std::time::Duration;

use super::{Access, Firewall, LiveGrant};
use crate::config::Config;

#[derive(Debug)]
pub struct Iptables;

impl Iptables {
    pub fn open(_table: &str) -> anyhow::Result<Self> {
        anyhow::bail!("the iptables backend is not available yet")
    }
}

impl Firewall for Iptables {
    fn name(&self) -> &'static str {
        "iptables"
    }
    fn install(&mut self, _: &Config) -> anyhow::Result<usize> {
        unreachable!()
    }
    fn grant(&mut self, _: &[Access]) -> anyhow::Result<()> {
        unreachable!()
    }
    fn revoke(&mut self, _: IpAddr, _: &[String]) -> anyhow::Result<()> {
        unreachable!()
    }
    fn list(&mut self) -> anyhow::Result<Vec<LiveGrant>> {
        unreachable!()
    }
    fn blacklist(&mut self, _: IpAddr, _: Duration) -> anyhow::Result<()> {
        unreachable!()
    }
    fn blacklisted(&mut self) -> anyhow::Result<Vec<(IpAddr, Duration)>> {
        unreachable!()
    }
    fn remove(&mut self) -> anyhow::Result<()> {
        unreachable!()
    }
}
