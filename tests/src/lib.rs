//! End-to-end test lab: a gateway, clients and an internal LAN host, each in its own network
//! namespace, wired through a switch namespace with veth pairs. Real `spad` and `spa`
//! binaries, real nftables/iptables, real TCP/UDP services.
//!
//! Everything is RAII: dropping a [`Lab`] kills its processes and deletes its namespaces.
//! Names carry the process id and a counter so parallel tests and runs never collide. Traffic
//! only ever flows between these namespaces (TEST-NET and ULA addresses that exist nowhere else).
//!
//! Code runs "inside" a namespace by `setns(2)` on a dedicated thread ([`in_ns`]), so tests
//! can use plain std sockets and tell a timeout (filtered) from a reset (closed).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub const GW4: &str = "203.0.113.1";
pub const GW6: &str = "2001:db8:1::1";
pub const LAN4: &str = "192.168.1.12";
pub const LAN6: &str = "fd00:1::12";

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Root of the workspace.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Path of a workspace binary (`spad`, `spa`), built by `cargo build --workspace --bins`
/// (or of the profile named by `SPA_E2E_PROFILE`, e.g. `release` for benchmarks).
pub fn binary(name: &str) -> PathBuf {
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target"));
    let profile = std::env::var("SPA_E2E_PROFILE").unwrap_or_else(|_| "debug".into());
    let path = dir.join(profile).join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` first (scripts/test.sh does)",
        path.display()
    );
    path
}

/// Whether the namespace tests run here. Without root they are skipped, and the first one
/// says so once on stderr (past the harness's output capture), with how to run them. Under
/// `scripts/test.sh` (`SPA_E2E_REQUIRED=1`) a machine that cannot run them fails instead, so a
/// CI run never passes by skipping.
pub fn e2e_or_skip() -> bool {
    if can_run() {
        return true;
    }
    assert!(
        std::env::var_os("SPA_E2E_REQUIRED").is_none(),
        "the end-to-end tests need root and iproute2 (`ip`) to create network namespaces"
    );
    static SAID: std::sync::Once = std::sync::Once::new();
    SAID.call_once(|| {
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "spa-e2e: skipping the end-to-end tests: they need root to create network namespaces; run `sudo scripts/test.sh`"
        );
    });
    false
}

/// Defines each named scenario `fn NAME(backend: Backend)` as two tests, `nftables::NAME` and
/// `iptables::NAME`: every firewall behaviour is proven on both backends.
#[macro_export]
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod nftables { $( #[test] fn $name() { if $crate::e2e_or_skip() { super::$name($crate::Backend::Nftables); } } )* }
        mod iptables { $( #[test] fn $name() { if $crate::e2e_or_skip() { super::$name($crate::Backend::Iptables); } } )* }
    };
}

/// Whether this process may create namespaces (root with CAP_SYS_ADMIN and `ip` present).
pub fn can_run() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() == 0 };
    root && Command::new("ip")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Runs a command; panics with its output if it fails.
pub fn run(program: &str, args: &[&str]) -> Output {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {}: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// [`Lab::make_spad_fall_behind`] for a spad with process id `pid`; `passed` reads the frames
/// spad has read or its prefilter cut (`capture_received` + `capture_kernel_source_limited`).
pub fn make_fall_behind(pid: u32, ns: &str, to: SocketAddr, passed: impl Fn() -> u64) -> bool {
    let before = passed();
    // SAFETY: signalling a process this test started.
    unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
    // The stop is asynchronous: wait until every thread of spad is stopped (state `T`).
    let stopped = || {
        fs::read_dir(format!("/proc/{pid}/task"))
            .map(|tasks| {
                tasks.flatten().all(|t| {
                    fs::read_to_string(t.path().join("stat")).is_ok_and(|stat| {
                        stat.rsplit(')')
                            .next()
                            .and_then(|r| r.split_whitespace().next())
                            == Some("T")
                    })
                })
            })
            .unwrap_or(false)
    };
    if !wait_until(Duration::from_secs(5), stopped) {
        // SAFETY: as above.
        unsafe { libc::kill(pid as i32, libc::SIGCONT) };
        return false;
    }
    in_ns(ns, move || {
        let s = UdpSocket::bind(if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }).unwrap();
        for _ in 0..1500 {
            let _ = s.send_to(b"fall behind", to);
        }
    });
    // SAFETY: as above.
    unsafe { libc::kill(pid as i32, libc::SIGCONT) };
    // Once spad has read the backlog (it looks at the backlog every 64 frames it reads),
    // the budget is engaged, or its hold starts again if it still was.
    wait_until(Duration::from_secs(10), || passed() >= before + 1500)
}

/// Polls `condition` every 50 ms until it holds or `limit` passes. Returns whether it held.
pub fn wait_until(limit: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs `f` on a fresh thread that has joined namespace `ns`.
pub fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        enter(&path);
        f()
    })
    .join()
    .unwrap()
}

fn enter(path: &str) {
    let file = fs::File::open(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    // SAFETY: a valid namespace fd; only this thread changes namespace.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
}

/// How a TCP connection attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Connect {
    /// Connected and the echo service answered.
    Open,
    /// Reset or unreachable: the port is closed, not hidden.
    Refused,
    /// No answer at all: filtered.
    TimedOut,
}

/// Tries a TCP connection from namespace `ns`, sending a line and expecting it echoed.
pub fn tcp_probe(ns: &str, to: SocketAddr, timeout: Duration) -> Connect {
    in_ns(ns, move || match TcpStream::connect_timeout(&to, timeout) {
        Ok(mut s) => {
            s.set_read_timeout(Some(timeout)).unwrap();
            let _ = s.write_all(b"ping\n");
            let mut buf = [0u8; 5];
            match s.read_exact(&mut buf) {
                Ok(()) if &buf == b"ping\n" => Connect::Open,
                _ => Connect::Refused,
            }
        }
        Err(e)
            if e.kind() == std::io::ErrorKind::TimedOut
                || e.kind() == std::io::ErrorKind::WouldBlock =>
        {
            Connect::TimedOut
        }
        Err(_) => Connect::Refused,
    })
}

/// Sends one UDP datagram from `ns` and waits for the echo.
pub fn udp_probe(ns: &str, to: SocketAddr, timeout: Duration) -> bool {
    in_ns(ns, move || {
        let bind: SocketAddr = if to.is_ipv4() {
            "0.0.0.0:0".parse().unwrap()
        } else {
            "[::]:0".parse().unwrap()
        };
        let s = UdpSocket::bind(bind).unwrap();
        s.set_read_timeout(Some(timeout)).unwrap();
        s.send_to(b"ping", to).unwrap();
        let mut buf = [0u8; 16];
        matches!(s.recv_from(&mut buf), Ok((4, _)))
    })
}

/// A connection held open from `ns` (to check that established flows survive expiry).
#[derive(Debug)]
pub struct Held {
    stream: TcpStream,
}

impl Held {
    pub fn open(ns: &str, to: SocketAddr) -> std::io::Result<Held> {
        let stream = in_ns(ns, move || {
            TcpStream::connect_timeout(&to, Duration::from_secs(2))
        })?;
        // Long enough to ride out a retransmission or two on a loaded machine; a flow the
        // firewall drops stays dropped, so this still fails when it should.
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        Ok(Held { stream })
    }
    /// Round-trips a line.
    pub fn echo(&mut self) -> bool {
        let _ = self.stream.write_all(b"ping\n");
        let mut buf = [0u8; 5];
        self.stream.read_exact(&mut buf).is_ok() && &buf == b"ping\n"
    }
}

/// An echo service (TCP or UDP) on a thread inside a namespace; stops when dropped.
#[derive(Debug)]
pub struct Echo {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Echo {
    pub fn tcp(ns: &str, bind: SocketAddr) -> Echo {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let path = format!("/var/run/netns/{ns}");
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            enter(&path);
            let listener = TcpListener::bind(bind).unwrap();
            listener.set_nonblocking(true).unwrap();
            tx.send(()).unwrap();
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        let flag = Arc::clone(&flag);
                        std::thread::spawn(move || {
                            s.set_read_timeout(Some(Duration::from_millis(200)))
                                .unwrap();
                            let mut buf = [0u8; 1024];
                            while !flag.load(Ordering::Relaxed) {
                                match s.read(&mut buf) {
                                    Ok(0) => break,
                                    Ok(n) => {
                                        if s.write_all(&buf[..n]).is_err() {
                                            break;
                                        }
                                    }
                                    Err(e)
                                        if matches!(
                                            e.kind(),
                                            std::io::ErrorKind::WouldBlock
                                                | std::io::ErrorKind::TimedOut
                                        ) => {}
                                    Err(_) => break,
                                }
                            }
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(5)).unwrap();
        Echo {
            stop,
            thread: Some(thread),
        }
    }

    pub fn udp(ns: &str, bind: SocketAddr) -> Echo {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let path = format!("/var/run/netns/{ns}");
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            enter(&path);
            let s = UdpSocket::bind(bind).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            tx.send(()).unwrap();
            let mut buf = [0u8; 1500];
            while !flag.load(Ordering::Relaxed) {
                if let Ok((n, from)) = s.recv_from(&mut buf) {
                    let _ = s.send_to(&buf[..n], from);
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(5)).unwrap();
        Echo {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Which firewall the gateway's `spad` drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Nftables,
    Iptables,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Nftables => "nftables",
            Backend::Iptables => "iptables",
        }
    }
}

/// The namespaces of one test.
#[derive(Debug)]
pub struct Lab {
    pub id: String,
    pub gw: String,
    pub a: String,
    pub b: String,
    pub lan: String,
    sw: String,
    pub dir: PathBuf,
    children: Vec<Child>,
}

/// A client namespace address: `a` is .10 / ::10, `b` is .20 / ::20.
pub fn client_addr(which: &str, v6: bool) -> IpAddr {
    let host = if which == "a" { 10 } else { 20 };
    if v6 {
        format!("2001:db8:1::{host}").parse().unwrap()
    } else {
        format!("203.0.113.{host}").parse().unwrap()
    }
}

impl Lab {
    /// Builds the topology. `config` names a file in `conf/` that is copied (verbatim) into
    /// the lab's directory next to freshly generated keys.
    pub fn new(config: &str) -> Lab {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}x{n}", std::process::id() % 100_000);
        let name = |role: &str| format!("spa{role}{id}");
        let lab = Lab {
            gw: name("gw"),
            a: name("a"),
            b: name("b"),
            lan: name("lan"),
            sw: name("sw"),
            dir: std::env::temp_dir().join(format!("spa-lab-{id}")),
            id,
            children: Vec::new(),
        };
        let _ = fs::remove_dir_all(&lab.dir);
        fs::create_dir_all(lab.dir.join("keys")).unwrap();
        for ns in [&lab.gw, &lab.a, &lab.b, &lab.lan, &lab.sw] {
            run("ip", &["netns", "add", ns]);
            lab.ip(ns, &["link", "set", "lo", "up"]);
        }
        lab.ip(&lab.sw, &["link", "add", "br0", "type", "bridge"]);
        lab.ip(&lab.sw, &["link", "set", "br0", "up"]);
        lab.ip(
            &lab.sw,
            &[
                "link",
                "set",
                "br0",
                "type",
                "bridge",
                "mcast_snooping",
                "0",
            ],
        );
        // WAN side: gateway eth0, clients a and b, all on the switch.
        for (role, ns, v4, v6) in [
            ("gw", &lab.gw, GW4, GW6),
            ("a", &lab.a, "203.0.113.10", "2001:db8:1::10"),
            ("b", &lab.b, "203.0.113.20", "2001:db8:1::20"),
        ] {
            let (inner, outer) = (format!("i{}", lab.id), format!("o{}", lab.id));
            run(
                "ip",
                &[
                    "link", "add", &inner, "type", "veth", "peer", "name", &outer,
                ],
            );
            run("ip", &["link", "set", &inner, "netns", ns]);
            run("ip", &["link", "set", &outer, "netns", &lab.sw]);
            lab.ip(ns, &["link", "set", &inner, "name", "eth0"]);
            let port = format!("p{role}");
            lab.ip(&lab.sw, &["link", "set", &outer, "name", &port]);
            lab.ip(&lab.sw, &["link", "set", &port, "master", "br0"]);
            lab.ip(&lab.sw, &["link", "set", &port, "up"]);
            lab.ip(ns, &["addr", "add", &format!("{v4}/24"), "dev", "eth0"]);
            lab.ip(
                ns,
                &[
                    "-6",
                    "addr",
                    "add",
                    &format!("{v6}/64"),
                    "dev",
                    "eth0",
                    "nodad",
                ],
            );
            lab.ip(ns, &["link", "set", "eth0", "up"]);
        }
        for ns in [&lab.a, &lab.b] {
            lab.ip(ns, &["route", "add", "default", "via", GW4]);
            lab.ip(ns, &["-6", "route", "add", "default", "via", GW6]);
        }
        // LAN side: gateway eth1 to the internal server directly.
        let (inner, outer) = (format!("i{}", lab.id), format!("o{}", lab.id));
        run(
            "ip",
            &[
                "link", "add", &inner, "type", "veth", "peer", "name", &outer,
            ],
        );
        run("ip", &["link", "set", &inner, "netns", &lab.gw]);
        run("ip", &["link", "set", &outer, "netns", &lab.lan]);
        lab.ip(&lab.gw, &["link", "set", &inner, "name", "eth1"]);
        lab.ip(&lab.lan, &["link", "set", &outer, "name", "eth0"]);
        lab.ip(&lab.gw, &["addr", "add", "192.168.1.1/24", "dev", "eth1"]);
        lab.ip(
            &lab.gw,
            &["-6", "addr", "add", "fd00:1::1/64", "dev", "eth1", "nodad"],
        );
        lab.ip(&lab.gw, &["link", "set", "eth1", "up"]);
        lab.ip(&lab.lan, &["addr", "add", "192.168.1.12/24", "dev", "eth0"]);
        lab.ip(
            &lab.lan,
            &["-6", "addr", "add", "fd00:1::12/64", "dev", "eth0", "nodad"],
        );
        lab.ip(&lab.lan, &["link", "set", "eth0", "up"]);
        lab.ip(&lab.lan, &["route", "add", "default", "via", "192.168.1.1"]);
        lab.ip(
            &lab.lan,
            &["-6", "route", "add", "default", "via", "fd00:1::1"],
        );
        lab.exec(&lab.gw, "sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
        lab.exec(
            &lab.gw,
            "sysctl",
            &["-qw", "net.ipv6.conf.all.forwarding=1"],
        );

        // Config copied verbatim; keys generated where it expects them.
        fs::copy(workspace().join("conf").join(config), lab.dir.join(config)).unwrap();
        lab.spad(&[
            "genkey",
            "--out",
            lab.path("keys/server.key").to_str().unwrap(),
        ]);
        for client in ["alice", "bob", "mallory"] {
            let key = lab.path(&format!("keys/{client}.key"));
            lab.spa(&["genkey", "--out", key.to_str().unwrap()]);
            let public = Command::new(binary("spa"))
                .arg("pubkey")
                .stdin(fs::File::open(&key).unwrap())
                .output()
                .unwrap();
            fs::write(lab.path(&format!("keys/{client}.pub")), &public.stdout).unwrap();
        }
        lab.spad(&[
            "totp",
            "new-secret",
            "--out",
            lab.path("keys/carol.totp").to_str().unwrap(),
        ]);
        lab
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    /// `ip -n NS ...`
    pub fn ip(&self, ns: &str, args: &[&str]) -> Output {
        let mut full = vec!["-n", ns];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// Runs a program inside `ns`, panicking on failure.
    pub fn exec(&self, ns: &str, program: &str, args: &[&str]) -> Output {
        let mut full = vec!["netns", "exec", ns, program];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// Runs a program inside `ns`, returning its output whatever the exit status.
    pub fn try_exec(&self, ns: &str, program: &str, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", ns, program])
            .args(args)
            .output()
            .unwrap()
    }

    /// Runs `spad` (root namespace) with arguments.
    pub fn spad(&self, args: &[&str]) -> Output {
        run(binary("spad").to_str().unwrap(), args)
    }

    /// Runs `spa` (root namespace) with arguments.
    pub fn spa(&self, args: &[&str]) -> Output {
        run(binary("spa").to_str().unwrap(), args)
    }

    /// Runs `spa` inside client namespace `ns` (as `nobody` if `unprivileged`).
    pub fn spa_in(&self, ns: &str, args: &[&str]) -> Output {
        let spa = binary("spa");
        self.try_exec(ns, spa.to_str().unwrap(), args)
    }

    /// Arguments that point `spa knock` at the gateway with `client`'s key.
    pub fn knock_args(&self, client: &str, v6: bool) -> Vec<String> {
        let server_key = self.server_public_key();
        vec![
            "--server".into(),
            if v6 { GW6.into() } else { GW4.into() },
            "--server-key".into(),
            server_key,
            "--key".into(),
            self.path(&format!("keys/{client}.key"))
                .display()
                .to_string(),
        ]
    }

    pub fn server_public_key(&self) -> String {
        let out = Command::new(binary("spad"))
            .arg("pubkey")
            .stdin(fs::File::open(self.path("keys/server.key")).unwrap())
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    /// Sends an SPA open request from client namespace `ns` with `client`'s key.
    pub fn knock(
        &self,
        ns: &str,
        client: &str,
        services: &[&str],
        extra: &[&str],
        v6: bool,
    ) -> Output {
        let mut args: Vec<String> = vec!["knock".into()];
        args.extend(self.knock_args(client, v6));
        for s in services {
            args.push("-s".into());
            args.push((*s).into());
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = self.spa_in(ns, &refs);
        assert!(
            out.status.success(),
            "spa knock failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Starts `spad run` in the gateway namespace with the lab config and a backend.
    pub fn start_spad(&mut self, config: &str, backend: Backend) -> usize {
        self.start_spad_with_env(config, backend, &[])
    }

    /// Like [`Lab::start_spad`], with extra environment variables for the daemon.
    pub fn start_spad_with_env(
        &mut self,
        config: &str,
        backend: Backend,
        env: &[(&str, &str)],
    ) -> usize {
        let started = self.log().matches("listening port=").count();
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path("spad.log"))
            .unwrap();
        // The backend is chosen by editing the copied config's [server] section.
        let path = self.path(config);
        let text = fs::read_to_string(&path).unwrap();
        let text = if text.contains("\nbackend = ") {
            text
        } else {
            text.replacen(
                "[server]\n",
                &format!("[server]\nbackend = \"{}\"\n", backend.name()),
                1,
            )
        };
        fs::write(&path, text).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.gw])
            .arg(binary("spad"))
            .args(["run", "-c", path.to_str().unwrap()])
            .envs(env.iter().copied())
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.children.push(child);
        let index = self.children.len() - 1;
        assert!(
            wait_until(Duration::from_secs(10), || self
                .log()
                .matches("listening port=")
                .count()
                > started),
            "spad did not start:\n{}",
            self.log()
        );
        index
    }

    /// Stops a started `spad` with SIGTERM (or SIGKILL if `kill`), waiting for it to exit.
    pub fn stop_spad(&mut self, index: usize, kill: bool) {
        let child = &mut self.children[index];
        let pid = child.id() as i32;
        // `ip netns exec` execs spad, so the child's pid is spad's.
        // SAFETY: sending a signal to our own child.
        unsafe { libc::kill(pid, if kill { libc::SIGKILL } else { libc::SIGTERM }) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if child.try_wait().unwrap().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("spad did not stop");
    }

    /// Makes started `spad` number `index` (running `config`) fall behind, as a flood beyond
    /// its means or a moment without CPU would: it is stopped (SIGSTOP) while 1,500
    /// datagrams from client namespace `ns` queue in its capture ring, then continued. That
    /// engages the kernel's per-source packet budget (a quarter of a ring waiting) for 2 s:
    /// send what it should cut right away. Waits (10 s at most) until spad has read the
    /// backlog; returns whether it did.
    pub fn make_spad_fall_behind(
        &self,
        index: usize,
        config: &str,
        ns: &str,
        to: SocketAddr,
    ) -> bool {
        make_fall_behind(self.spad_pid(index), ns, to, || {
            let out = self.spad_gw(&["status", "--json"], config);
            let status: serde_json::Value =
                serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
            let counter = |name: &str| {
                status["counters"]
                    .as_array()
                    .and_then(|all| {
                        all.iter()
                            .find(|c| c["name"] == name)
                            .and_then(|c| c["value"].as_u64())
                    })
                    .unwrap_or(0)
            };
            counter("capture_received") + counter("capture_kernel_source_limited")
        })
    }

    /// Makes spad number `index` fall behind (from client namespace `behind`), sees that the
    /// budget engaged, takes `before` (counters to compare with), floods the SPA port from
    /// `flood` ([`flood_spa_port`]) and waits until `cut(&before)` holds. The budget stays
    /// engaged for only 2 s after spad caught up; on a slow machine that can pass before the
    /// flood arrives, so a round whose budget was already released is tried again (3 rounds
    /// at most). Returns the `before` of the round that saw the budget engaged and `cut` hold;
    /// a kernel that never cuts fails every round.
    pub fn flood_while_behind<S>(
        &self,
        index: usize,
        config: &str,
        (behind, flood): (&str, &str),
        mut before: impl FnMut() -> S,
        mut cut: impl FnMut(&S) -> bool,
    ) -> Option<S> {
        (0..3).find_map(|_| {
            if !self.make_spad_fall_behind(index, config, behind, Lab::gw4(62201))
                || self.kernel_budget(config) != "engaged"
            {
                return None;
            }
            let seen = before();
            flood_spa_port(self, flood);
            wait_until(Duration::from_secs(5), || cut(&seen)).then_some(seen)
        })
    }

    /// Process id of a started `spad` (`ip netns exec` execs it, so the child's pid is spad's).
    pub fn spad_pid(&self, index: usize) -> u32 {
        self.children[index].id()
    }

    /// Runs `spad ARGS -c CONFIG` inside the gateway namespace, whatever the exit status.
    pub fn spad_gw(&self, args: &[&str], config: &str) -> Output {
        let path = self.path(config);
        let mut full: Vec<&str> = args.to_vec();
        full.extend(["-c", path.to_str().unwrap()]);
        self.try_exec(&self.gw, binary("spad").to_str().unwrap(), &full)
    }

    /// Sends SIGHUP to a started `spad`.
    pub fn reload_spad(&mut self, index: usize) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.children[index].id() as i32, libc::SIGHUP) };
    }

    /// What a failed connectivity assertion needs to be explained after the fact (CI shows
    /// only the panic message): the daemon's log, the gateway's rulesets with their counters,
    /// its conntrack table when the kernel exposes it, and the TCP sockets of `a` and the
    /// gateway.
    pub fn snapshot(&self) -> String {
        let mut out = format!("--- spad.log\n{}", self.log());
        let gw = &self.gw;
        let commands: [(&str, &str, &[&str]); 6] = [
            (gw, "nft", &["list", "ruleset"]),
            (gw, "iptables-save", &["-c"]),
            (gw, "ipset", &["list"]),
            (gw, "cat", &["/proc/net/nf_conntrack"]),
            (gw, "ss", &["-tnoi"]),
            (&self.a, "ss", &["-tnoi"]),
        ];
        for (ns, program, args) in commands {
            let o = self.try_exec(ns, program, args);
            out.push_str(&format!(
                "--- {ns}: {program} {}\n{}{}",
                args.join(" "),
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ));
        }
        out
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.path("spad.log")).unwrap_or_default()
    }

    /// Waits until the log contains `needle` `count` times.
    pub fn wait_log(&self, needle: &str, count: usize) -> bool {
        wait_until(Duration::from_secs(10), || {
            self.log().matches(needle).count() >= count
        })
    }

    /// Enrolls TOTP door `door` of `config`, answering the prompt with `oathtool`'s code.
    pub fn enroll(&self, config: &str, door: &str) -> Output {
        let code = self.oathtool(&[]);
        let mut child = Command::new(binary("spad"))
            .args([
                "totp",
                "enroll",
                "-c",
                self.path(config).to_str().unwrap(),
                "--door",
                door,
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(format!("{code}\n").as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    }

    /// `oathtool --totp -b SECRET [args]` for carol's secret: an independent TOTP implementation.
    pub fn oathtool(&self, args: &[&str]) -> String {
        let secret = fs::read_to_string(self.path("keys/carol.totp")).unwrap();
        let mut full = vec!["--totp", "-b", secret.trim()];
        full.extend_from_slice(args);
        String::from_utf8(run("oathtool", &full).stdout)
            .unwrap()
            .trim()
            .to_string()
    }

    /// The gateway's nftables ruleset, for assertions on elements.
    pub fn nft_list(&self) -> String {
        String::from_utf8_lossy(&self.try_exec(&self.gw, "nft", &["list", "ruleset"]).stdout)
            .into_owned()
    }

    pub fn gw4(port: u16) -> SocketAddr {
        SocketAddr::new(GW4.parse().unwrap(), port)
    }
    pub fn gw6(port: u16) -> SocketAddr {
        SocketAddr::new(GW6.parse().unwrap(), port)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        for ns in [&self.gw, &self.a, &self.b, &self.lan, &self.sw] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
        if std::env::var_os("SPA_KEEP_LAB").is_none() && !std::thread::panicking() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// Helpers for the kernel budget's E2E tests (`budget_reload.rs`).
impl Lab {
    /// `spad status --json` for a started spad running `config`.
    pub fn status_json(&self, config: &str) -> serde_json::Value {
        let out = self.spad_gw(&["status", "--json"], config);
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Replaces `from` with `to` in the lab's copy of `config` (panics when absent).
    pub fn edit_config(&self, config: &str, from: &str, to: &str) {
        let path = self.path(config);
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.contains(from), "conf/{config} changed: no {from:?}");
        fs::write(&path, text.replacen(from, to, 1)).unwrap();
    }

    /// Adds `line` to the `[server]` section of the lab's copy of `config`.
    pub fn server_option(&self, config: &str, line: &str) {
        self.edit_config(config, "[server]\n", &format!("[server]\n{line}\n"));
    }

    /// The running daemon's `kernel_budget` status field (`off`, `released`, `engaged`).
    pub fn kernel_budget(&self, config: &str) -> serde_json::Value {
        self.status_json(config)["kernel_budget"].clone()
    }

    /// Starts spad as root with `user = "nobody"` in `config`'s `[server]`, after handing
    /// the secrets to that user (0600, so a reload can read them; the config and the public
    /// keys stay root's and read-only to it), and waits until it has dropped its privileges
    /// (CAP_BPF with the rest): as the unit runs it, for what matters to a reload.
    pub fn start_spad_as_nobody(&mut self, config: &str, backend: Backend) -> usize {
        self.server_option(config, "user = \"nobody\"");
        for secret in ["keys/server.key", "keys/carol.totp"] {
            std::os::unix::fs::chown(self.path(secret), Some(NOBODY), None).unwrap();
        }
        let daemon = self.start_spad(config, backend);
        assert!(
            self.wait_log("running as nobody (uid 65534)", 1),
            "{}",
            self.log()
        );
        daemon
    }
}

/// The uid of `nobody`.
pub const NOBODY: u32 = 65534;

/// Datagrams in a flood from one source: more than the default `packet-burst` (1,000), sent
/// faster than the default `packet-rate` (20,000/s) refills it.
pub const FLOOD: u64 = 3000;

/// `FLOOD` datagrams of garbage (refused in userspace at the size or mac1 check) from client
/// namespace `ns` to the SPA port, as fast as one socket sends them. The gateway's link-layer
/// address is resolved first (one datagram to an unwatched port), so no datagram of the flood
/// waits, or is lost, in the neighbour queue.
pub fn flood_spa_port(lab: &Lab, ns: &str) {
    in_ns(ns, || {
        let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
        socket.send_to(b"", Lab::gw4(9)).unwrap();
    });
    assert!(
        wait_until(Duration::from_secs(5), || {
            String::from_utf8_lossy(&lab.ip(ns, &["neigh", "show", GW4]).stdout).contains("lladdr")
        }),
        "{GW4} not resolved in {ns}"
    );
    in_ns(ns, || {
        let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
        let garbage = [0x5a_u8; 136];
        for _ in 0..FLOOD {
            socket.send_to(&garbage, Lab::gw4(62201)).unwrap();
        }
    });
}

/// `GET path` over HTTP/1.0 to 127.0.0.1:`port` inside `ns`: the status line and the body.
pub fn http_get(ns: &str, port: u16, path: &str) -> (String, String) {
    let request = format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n");
    in_ns(ns, move || {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        (head.lines().next().unwrap().to_string(), body.to_string())
    })
}

/// A counter of a `spad status --json` answer (panics when it has none of that name).
pub fn status_counter(status: &serde_json::Value, name: &str) -> u64 {
    status["counters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no counter {name} in {status}"))["value"]
        .as_u64()
        .unwrap()
}
