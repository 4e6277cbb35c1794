//! The fwknopd side of the load benchmark: the same offered-rate ladder sent to fwknop 2.x's
//! daemon, when `fwknopd` and `fwknop` are installed (Debian `fwknop-server`, `fwknop-client`).
//!
//! fwknopd runs inside the gateway namespace in UDP-server mode (its fastest: no libpcap
//! block timeout; `--fwknopd-pcap` measures its default pcap mode instead) with a generated fwknopd.conf /
//! access.conf (one Rijndael + HMAC key pair), a private run directory and digest cache, all
//! in the benchmark's temporary directory. Its firewall is `iptables`, which on this machine is
//! iptables-nft: each access rule it adds is an nftables `NEWRULE` event on the same netlink
//! group the spad side listens to, and the source address is read from the rule's `cmp`
//! expression. Packets are pre-built with the real client (`fwknop -T -B FILE -b`), one
//! `fwknop` run per packet, each with its own `-a` allow address = its spoofed source.
//! Nothing here is needed by the tests or CI.

use std::io::Read;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use spa_e2e::wait_until;

/// fwknopd's own chain, flushed between steps so every source is granted anew.
const CHAIN: &str = "FWKNOP_INPUT";
/// `NFT_MSG_NEWRULE` in the nftables netlink subsystem.
pub const NFT_MSG_NEWRULE: u16 = (10 << 8) | 6;
/// Packets per step at most: each costs one `fwknop` run to build (~5 ms), and fwknopd
/// grants on the order of 100 per second, so more would only lengthen the run.
pub const MAX_PER_STEP: usize = 1_000;

/// Whether both fwknop programs are on PATH.
pub fn installed() -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    ["fwknopd", "fwknop"]
        .iter()
        .all(|program| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

/// A running fwknopd in the gateway namespace; killed on drop.
pub struct Fwknopd {
    gw: String,
    dir: PathBuf,
    key: String,
    hmac_key: String,
    child: Option<Child>,
}

impl Drop for Fwknopd {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Fwknopd {
    /// Writes the configuration under `dir` and starts fwknopd for UDP `port`: as a UDP
    /// server (`udp_server`), or sniffing `eth0` with libpcap.
    pub fn start(gw: &str, dir: &Path, port: u16, udp_server: bool) -> Result<Fwknopd, String> {
        let dir = dir.join("fwknopd");
        std::fs::create_dir_all(dir.join("run")).map_err(|e| e.to_string())?;
        let (key, hmac_key) = generate_keys(&dir)?;
        let run = dir.join("run");
        let conf = format!(
            "PCAP_INTF eth0;\nPCAP_FILTER udp port {port};\nENABLE_UDP_SERVER {};\nUDPSERV_PORT {port};\nFWKNOP_RUN_DIR {};\n",
            if udp_server { "Y" } else { "N" },
            run.display()
        );
        let access = format!(
            "SOURCE ANY\nKEY_BASE64 {key}\nHMAC_KEY_BASE64 {hmac_key}\nOPEN_PORTS tcp/22\nFW_ACCESS_TIMEOUT 600\n"
        );
        for (name, text) in [("fwknopd.conf", conf), ("access.conf", access)] {
            write_private(&dir.join(name), &text)?;
        }
        let log = std::fs::File::create(dir.join("fwknopd.log")).map_err(|e| e.to_string())?;
        let arg = |name: &str| dir.join(name).display().to_string();
        let child = Command::new("ip")
            .args(["netns", "exec", gw, "fwknopd", "--foreground"])
            .args(["-c", &arg("fwknopd.conf"), "-a", &arg("access.conf")])
            .args(["-r", &arg("run"), "-d", &arg("run/digest.cache")])
            .args(["-p", &arg("run/fwknopd.pid")])
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("fwknopd: {e}"))?;
        let mut daemon = Fwknopd {
            gw: gw.to_string(),
            dir,
            key,
            hmac_key,
            child: Some(child),
        };
        if !wait_until(Duration::from_secs(20), || {
            let log = daemon.log();
            log.contains(if udp_server {
                "Kicking off UDP server"
            } else {
                "Sniffing interface"
            })
        }) {
            daemon.stop();
            return Err(format!("fwknopd did not start:\n{}", daemon.log()));
        }
        Ok(daemon)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("fwknopd.log")).unwrap_or_default()
    }

    /// Removes every access rule fwknopd added, so the next step's sources are granted anew.
    pub fn flush(&self) {
        let _ = Command::new("ip")
            .args(["netns", "exec", &self.gw, "iptables", "-F", CHAIN])
            .status();
    }

    /// Builds one SPA packet per source with the real client, on two threads; each packet
    /// asks for tcp/22 for its own source (`-a`).
    pub fn packets(&self, sources: &[Ipv4Addr], gw: Ipv4Addr) -> Result<Vec<Vec<u8>>, String> {
        let half = sources.len() / 2;
        let (first, second) = sources.split_at(half);
        let (a, b) = std::thread::scope(|s| {
            let a = s.spawn(|| self.build(first, gw, "packets-a"));
            let b = self.build(second, gw, "packets-b");
            (a.join().unwrap(), b)
        });
        let mut all = a?;
        all.extend(b?);
        Ok(all)
    }

    fn build(
        &self,
        sources: &[Ipv4Addr],
        gw: Ipv4Addr,
        name: &str,
    ) -> Result<Vec<Vec<u8>>, String> {
        let file = self.dir.join(name);
        let _ = std::fs::remove_file(&file);
        let target = gw.to_string();
        for source in sources {
            let status = Command::new("fwknop")
                .env("HOME", &self.dir)
                .args(["-A", "tcp/22", "-a", &source.to_string(), "-D", &target])
                .args(["--use-hmac", "--key-base64-rijndael", &self.key])
                .args(["--key-base64-hmac", &self.hmac_key, "--no-save-args", "-T"])
                .args(["-B", &file.display().to_string(), "-b"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map_err(|e| format!("fwknop: {e}"))?;
            if !status.success() {
                return Err(format!("fwknop failed for {source}: {status}"));
            }
        }
        let mut text = String::new();
        if !sources.is_empty() {
            std::fs::File::open(&file)
                .and_then(|mut f| f.read_to_string(&mut text))
                .map_err(|e| format!("{}: {e}", file.display()))?;
        }
        let packets: Vec<Vec<u8>> = text
            .lines()
            .filter(|l| !l.is_empty())
            .map(|l| l.as_bytes().to_vec())
            .collect();
        if packets.len() != sources.len() {
            return Err(format!(
                "fwknop wrote {} packets for {} sources",
                packets.len(),
                sources.len()
            ));
        }
        Ok(packets)
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: signalling our own child (`ip netns exec` execs fwknopd).
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while std::time::Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A fresh Rijndael + HMAC key pair from `fwknop --key-gen`.
fn generate_keys(dir: &Path) -> Result<(String, String), String> {
    let out = Command::new("fwknop")
        .env("HOME", dir)
        .args(["--key-gen", "--no-save-args"])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("fwknop --key-gen: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
            .ok_or_else(|| format!("fwknop --key-gen printed no {name}:\n{text}"))
    };
    Ok((field("KEY_BASE64:")?, field("HMAC_KEY_BASE64:")?))
}

fn write_private(path: &Path, text: &str) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    file.write_all(text.as_bytes())
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// The 4-byte values a `NEWRULE` message's `cmp` expressions compare against: for an
/// iptables-nft rule `-s A/32 ...` one of them is A. `body` is what follows the nfgenmsg.
pub fn rule_addresses(body: &[u8]) -> Vec<u32> {
    let mut out = Vec::new();
    // NFTA_RULE_EXPRESSIONS (4) → NFTA_LIST_ELEM (1) → NFTA_EXPR_NAME (1) "cmp" and
    // NFTA_EXPR_DATA (2) → NFTA_CMP_DATA (3) → NFTA_DATA_VALUE (1).
    for (_, expressions) in super::attrs(body).filter(|a| a.0 == 4) {
        for (_, expression) in super::attrs(expressions).filter(|a| a.0 == 1) {
            let is_cmp = super::attrs(expression)
                .any(|(kind, name)| kind == 1 && name.starts_with(b"cmp\0"));
            if !is_cmp {
                continue;
            }
            for (_, data) in super::attrs(expression).filter(|a| a.0 == 2) {
                for (_, cmp) in super::attrs(data).filter(|a| a.0 == 3) {
                    for (_, value) in super::attrs(cmp).filter(|a| a.0 == 1) {
                        if value.len() == 4 {
                            out.push(u32::from_be_bytes(value.try_into().unwrap()));
                        }
                    }
                }
            }
        }
    }
    out
}
