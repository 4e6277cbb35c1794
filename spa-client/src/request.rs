//! One SPA request ready to go: where it goes, with which keys, asking for what. Each
//! [`Outgoing::seal`] makes a fresh packet (new nonce and timestamp), so sending again is never
//! a replay; [`Outgoing::explain`] says in words what a packet carries (`-v`, `--dry-run`).

use std::net::{IpAddr, SocketAddr};

use spa_shared::keys::{PrivateKey, PublicKey};
use spa_shared::payload::{Kind, Request};

use crate::resolve::Via;

/// Everything needed to seal and send the request, any number of times.
#[derive(Debug)]
pub struct Outgoing {
    /// The gateway as the user named it, and where that resolved to (and how).
    pub server: String,
    pub to: SocketAddr,
    pub via: Via,
    pub key: PrivateKey,
    pub server_key: PublicKey,
    pub kind: Kind,
    pub services: Vec<String>,
    /// 0: the service's default.
    pub duration_secs: u32,
    pub address: Option<IpAddr>,
    /// Added to the clock (tests of the gateway's skew limits).
    pub time_offset_secs: i64,
}

fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

impl Outgoing {
    /// "open" or "close".
    pub fn verb(&self) -> &'static str {
        if self.kind == Kind::Open {
            "open"
        } else {
            "close"
        }
    }

    /// A fresh packet: new nonce, current time.
    pub fn seal(&self) -> anyhow::Result<(Request, Vec<u8>)> {
        let mut nonce = [0u8; 16];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut nonce);
        let request = Request {
            kind: self.kind,
            timestamp: now_micros()
                .saturating_add_signed(self.time_offset_secs.saturating_mul(1_000_000)),
            nonce,
            duration_secs: self.duration_secs,
            address: self.address,
            services: self.services.clone(),
        };
        let packet =
            spa_shared::packet::seal(&mut rand_core::OsRng, &self.key, &self.server_key, &request)?;
        Ok((request, packet))
    }

    /// Seals a fresh packet and sends it; returns its size.
    pub fn send_fresh(&self) -> anyhow::Result<usize> {
        let (_, packet) = self.seal()?;
        crate::send::datagram(self.to, &packet)?;
        Ok(packet.len())
    }

    /// What a packet carries, one line per fact.
    pub fn explain(&self, request: &Request, packet_len: usize) -> Vec<String> {
        let duration = match (self.kind, self.duration_secs) {
            (Kind::Close, _) => String::new(),
            (_, 0) => ", for the service's default time".into(),
            (_, s) => format!(", for {s}s (the gateway caps it at its limits)"),
        };
        vec![
            format!(
                "gateway {} is {} (via {}), UDP port {}",
                self.server,
                self.to.ip(),
                self.via,
                self.to.port()
            ),
            format!("gateway public key {}", self.server_key),
            format!(
                "this client's public key {} (the gateway's [clients.NAME] public-key must match)",
                self.key.public_key()
            ),
            format!(
                "request: {} {} for {}{duration}",
                self.verb(),
                self.services.join(","),
                self.address
                    .map_or("the packet's source address".into(), |a| a.to_string()),
            ),
            format!(
                "timestamp {} (unix seconds; the gateway accepts about a minute of skew), nonce {}",
                request.timestamp / 1_000_000,
                request.nonce.iter().map(|b| format!("{b:02x}")).collect::<String>()
            ),
            format!(
                "packet: {packet_len} bytes, Noise X (X25519, ChaCha20-Poly1305, BLAKE2s), no reply expected"
            ),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_seal_is_a_fresh_packet_the_gateway_opens() {
        let server = PrivateKey::from_bytes([1; 32]);
        let out = Outgoing {
            server: "gw".into(),
            to: "203.0.113.1:62201".parse().unwrap(),
            via: Via::Literal,
            key: PrivateKey::from_bytes([2; 32]),
            server_key: server.public_key(),
            kind: Kind::Open,
            services: vec!["ssh".into()],
            duration_secs: 30,
            address: None,
            time_offset_secs: 0,
        };
        let (first, a) = out.seal().unwrap();
        let (second, b) = out.seal().unwrap();
        assert_ne!(first.nonce, second.nonce, "a re-send is not a replay");
        let gateway = spa_shared::packet::Server::new(server);
        for (request, packet) in [(&first, &a), (&second, &b)] {
            let opened = gateway.open(packet).unwrap();
            assert_eq!(&opened.request, request);
            assert_eq!(opened.client, out.key.public_key());
        }
        let lines = out.explain(&first, a.len()).join("\n");
        assert!(lines.contains("request: open ssh for the packet's source address, for 30s"));
        assert!(lines.contains(&PrivateKey::from_bytes([2; 32]).public_key().to_string()));
    }
}
