//! An in-memory firewall for unit tests of the pipeline (never used by end-to-end tests).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use std::sync::{mpsc, Arc, Mutex};

use super::{Access, Firewall, KernelReader, KernelView, LiveGrant};
use crate::config::Config;

/// Records grants in a map; time does not pass here, tests inspect what was asked.
#[derive(Debug, Default)]
pub struct Memory {
    pub grants: BTreeMap<(IpAddr, String), Access>,
    pub blacklist: BTreeMap<IpAddr, Duration>,
    pub installs: usize,
    pub fail_next_grant: bool,
    /// When set, [`Firewall::reader`] hands out readers that each wait for the view a test
    /// sends here (to hold a read of the kernel while the loop goes on).
    pub gated_reads: Option<Arc<Mutex<mpsc::Receiver<KernelView>>>>,
}

/// A reader that returns whatever view the test sends, when it sends it.
struct GatedReader(Arc<Mutex<mpsc::Receiver<KernelView>>>);

impl KernelReader for GatedReader {
    fn read(&mut self) -> anyhow::Result<KernelView> {
        let gate = self
            .0
            .lock()
            .map_err(|_| anyhow::anyhow!("gate poisoned"))?;
        gate.recv()
            .map_err(|_| anyhow::anyhow!("the test dropped the gate"))
    }
}

impl Firewall for Memory {
    fn name(&self) -> &'static str {
        "memory"
    }
    fn attach(&mut self, _config: &Config) {}
    fn install(&mut self, config: &Config) -> anyhow::Result<usize> {
        self.installs += 1;
        self.grants.retain(|(_, service), a| {
            super::still_allowed(
                config,
                &LiveGrant {
                    address: a.address,
                    service: service.clone(),
                    remaining: a.timeout,
                    owner: a.owner.clone(),
                },
            )
        });
        Ok(self.grants.len())
    }
    fn grant(&mut self, grants: &[Access]) -> anyhow::Result<()> {
        if std::mem::take(&mut self.fail_next_grant) {
            anyhow::bail!("injected failure");
        }
        for g in grants {
            self.grants
                .insert((g.address, g.service.clone()), g.clone());
        }
        Ok(())
    }
    fn revoke(&mut self, address: IpAddr, services: &[String]) -> anyhow::Result<()> {
        for s in services {
            self.grants.remove(&(address, s.clone()));
        }
        Ok(())
    }
    fn list(&mut self) -> anyhow::Result<Vec<LiveGrant>> {
        Ok(self
            .grants
            .values()
            .map(|a| LiveGrant {
                address: a.address,
                service: a.service.clone(),
                remaining: a.timeout,
                owner: a.owner.clone(),
            })
            .collect())
    }
    fn blacklist(&mut self, address: IpAddr, duration: Duration) -> anyhow::Result<()> {
        self.blacklist.insert(address, duration);
        Ok(())
    }
    fn blacklisted(&mut self) -> anyhow::Result<Vec<(IpAddr, Duration)>> {
        Ok(self.blacklist.iter().map(|(a, d)| (*a, *d)).collect())
    }
    fn flush(&mut self) -> anyhow::Result<()> {
        self.grants.clear();
        Ok(())
    }
    fn protection(&mut self) -> anyhow::Result<String> {
        Ok(format!("installed {}", self.installs))
    }
    fn reader(&self) -> Option<Box<dyn KernelReader>> {
        let gate = self.gated_reads.as_ref()?;
        Some(Box::new(GatedReader(Arc::clone(gate))))
    }
    fn remove(&mut self) -> anyhow::Result<()> {
        self.grants.clear();
        Ok(())
    }
}
