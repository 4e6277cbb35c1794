//! The daemon: the capture → decode → policy → firewall pipeline and the loop that drives it.
//!
//! [`Pipeline`] is the testable heart: it takes received packets and a clock reading and does
//! everything except reading the network. [`run`] wires it to a real capture socket, a real
//! firewall and signals (SIGTERM/SIGINT stop, SIGHUP reloads).

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use spa_shared::packet::Server;
use spa_shared::replay::Window;
use spa_shared::Micros;

use crate::capture::{self, frame, Received, Source};
use crate::clock::Clock;
use crate::config::{CaptureMode, Config};
use crate::firewall::{Access, Firewall};
use crate::knock::engine::Event;
use crate::knock::Knocks;
use crate::log::Logger;
use crate::net::{PortProto, Proto};
use crate::policy::{self, Decision};
use crate::state::ReplayStore;
use spa_shared::duration;

/// Counters, logged on exit and useful in tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Stats {
    pub packets: u64,
    pub precheck_dropped: u64,
    pub refused: u64,
    pub granted: u64,
    pub closed: u64,
    pub knocks: u64,
}

/// Everything that decides; no sockets of its own.
pub struct Pipeline<C: Clock> {
    pub config: Config,
    server: Server,
    replay: ReplayStore,
    pub firewall: Box<dyn Firewall>,
    pub knocks: Knocks,
    clock: C,
    pub log: Logger,
    pub stats: Stats,
}

impl<C: Clock> std::fmt::Debug for Pipeline<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

fn window(config: &Config) -> Window {
    Window {
        max_age: config.server.max_age.as_micros() as Micros,
        max_future: config.server.max_future.as_micros() as Micros,
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
        let keys: Vec<_> = config.clients.values().map(|c| c.public_key).collect();
        replay.retain_clients(|k| keys.contains(k));
        let kept = firewall
            .install(&config)
            .context("installing the firewall ruleset")?;
        let mut knocks = Knocks::new(&config, &state_dir, now);
        for (address, remaining) in firewall.blacklisted().unwrap_or_default() {
            knocks.restore_blacklist(address, now + remaining.as_micros() as Micros);
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
        Ok(Self {
            config,
            server,
            replay,
            firewall,
            knocks,
            clock,
            log,
            stats: Stats::default(),
        })
    }

    /// Replaces the configuration atomically (the old one stays if anything fails).
    pub fn reload(&mut self, config: Config, server: Server) -> anyhow::Result<()> {
        let kept = self.firewall.install(&config)?;
        let now = self.clock.now();
        let keys: Vec<_> = config.clients.values().map(|c| c.public_key).collect();
        self.replay.retain_clients(|k| keys.contains(k));
        self.knocks.reconfigure(&config, now);
        if let Some(w) = self.knocks.take_warning() {
            self.log.line(now, &format!("warning: {w}"));
        }
        self.server = server;
        self.config = config;
        self.log
            .line(now, &format!("reloaded; kept {kept} live grants"));
        Ok(())
    }

    /// Handles one received packet.
    pub fn handle(&mut self, received: &Received<'_>) {
        self.stats.packets += 1;
        match received {
            Received::Udp {
                source, payload, ..
            } => self.handle_spa(*source, payload),
            Received::Ip(bytes) => {
                let Some(f) = frame::parse(bytes) else { return };
                if f.proto == Proto::Udp && f.port == self.config.server.port {
                    self.handle_spa(f.source, f.payload);
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

    fn refuse(&mut self, source: IpAddr, reason: &str) {
        self.stats.refused += 1;
        let now = self.clock.now();
        self.log
            .refusal(now, &format!("refused from={source} reason=\"{reason}\""));
    }

    fn handle_spa(&mut self, source: IpAddr, payload: &[u8]) {
        let now = self.clock.now();
        // Cheap pre-check first: garbage never reaches public-key crypto.
        if let Err(e) = self.server.precheck(payload) {
            self.stats.precheck_dropped += 1;
            return self.refuse(source, &e.to_string());
        }
        let authenticated = match self.server.open(payload) {
            Ok(a) => a,
            Err(e) => return self.refuse(source, &e.to_string()),
        };
        let Some(client) = self
            .config
            .clients
            .values()
            .find(|c| c.public_key == authenticated.client)
            .cloned()
        else {
            return self.refuse(
                source,
                &format!("unknown client key {}", authenticated.client),
            );
        };
        let request = &authenticated.request;
        if let Err(e) = self
            .replay
            .check(&client.public_key, request.timestamp, now)
        {
            return self.refuse(source, &format!("client={} {e}", client.name));
        }
        let decision = match policy::decide(&self.config, &client, request, source) {
            Ok(d) => d,
            Err(e) => return self.refuse(source, &e.to_string()),
        };
        // Durable before the door opens: not even kill -9 right after lets it through twice.
        if let Err(e) = self
            .replay
            .accept(&client.public_key, request.timestamp, now)
        {
            return self.refuse(source, &format!("client={} {e}", client.name));
        }
        self.apply(decision, &client.name);
    }

    fn apply(&mut self, decision: Decision, owner: &str) {
        let now = self.clock.now();
        match decision {
            Decision::Open { address, grants } => match self.firewall.grant(&grants) {
                Ok(()) => {
                    self.stats.granted += 1;
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
                    let until = crate::log::timestamp(now + longest.as_micros() as Micros);
                    self.log.line(
                        now,
                        &format!(
                            "granted owner={owner} address={address} services={} until={until}",
                            detail.join(",")
                        ),
                    );
                }
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

    fn handle_knock(&mut self, source: IpAddr, port: PortProto, flags: u8) {
        let now = self.clock.now();
        self.stats.knocks += 1;
        let events = self.knocks.knock(source, port, flags, now);
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
                Event::Command { argv, env } => self.spawn(&argv, &env),
                // Made durable by the knock driver before the open they allow.
                Event::TotpUsed { .. } | Event::OneTimeUsed { .. } => {}
                Event::Blacklist { address, duration } => {
                    if let Err(e) = self.firewall.blacklist(address, duration) {
                        self.log
                            .line(now, &format!("error: blacklisting {address}: {e:#}"));
                    }
                }
            }
        }
    }

    /// Runs a knockd-style command without a shell; its exit is reaped on a helper thread.
    fn spawn(&mut self, argv: &[String], env: &[(String, String)]) {
        let now = self.clock.now();
        let Some((program, args)) = argv.split_first() else {
            return;
        };
        match std::process::Command::new(program)
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(std::process::Stdio::null())
            .spawn()
        {
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
    let mut config = Config::load(config_path)?;
    if let Some(dir) = &overrides.state_dir {
        config.server.state_dir = dir.clone();
    }
    let key = crate::keyfile::read_private_key(&config.server.private_key)?;
    Ok((config, Server::new(key)))
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

/// Runs until SIGTERM/SIGINT. SIGHUP reloads the config file.
pub fn run(config_path: PathBuf, overrides: Overrides) -> anyhow::Result<()> {
    let (config, server) = load(&config_path, &overrides)?;
    create_state_dir(&config.server.state_dir)?;
    let mut source: Box<dyn Source> = match config.server.capture {
        CaptureMode::AfPacket => Box::new(capture::AfPacket::open(
            &config.server.interfaces,
            &watches(&config),
            crate::knock::syn_only(&config),
        )?),
        CaptureMode::Udp => Box::new(
            capture::UdpListener::open(config.server.port).context("binding the UDP listener")?,
        ),
    };
    let firewall = crate::firewall::open(&config)?;
    let clock = crate::clock::SystemClock;
    let capture_desc = match config.server.capture {
        CaptureMode::AfPacket => format!(
            "af-packet on {}",
            if config.server.interfaces.is_empty() {
                "all interfaces".to_string()
            } else {
                config.server.interfaces.join(",")
            }
        ),
        CaptureMode::Udp => "udp listener".to_string(),
    };
    let mut pipeline = Pipeline::new(config, server, firewall, clock)?;
    let public = pipeline.server.public_key();
    pipeline.log.line(
        clock.now(),
        &format!(
            "listening port={}/udp capture={capture_desc} server-key={public}",
            pipeline.config.server.port
        ),
    );

    let stop = Arc::new(AtomicBool::new(false));
    let reload = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGTERM, Arc::clone(&stop))?;
    signal_hook::flag::register(signal_hook::consts::SIGINT, Arc::clone(&stop))?;
    signal_hook::flag::register(signal_hook::consts::SIGHUP, Arc::clone(&reload))?;

    while !stop.load(Ordering::Relaxed) {
        if reload.swap(false, Ordering::Relaxed) {
            match load(&config_path, &overrides) {
                Ok((config, server)) => {
                    let recapture = config.server.capture != pipeline.config.server.capture
                        || config.server.port != pipeline.config.server.port
                        || config.server.interfaces != pipeline.config.server.interfaces
                        || watches(&config) != watches(&pipeline.config);
                    let new_source: anyhow::Result<Option<Box<dyn Source>>> = if !recapture {
                        Ok(None)
                    } else {
                        match config.server.capture {
                            CaptureMode::AfPacket => capture::AfPacket::open(
                                &config.server.interfaces,
                                &watches(&config),
                                crate::knock::syn_only(&config),
                            )
                            .map(|s| Some(Box::new(s) as Box<dyn Source>)),
                            CaptureMode::Udp => capture::UdpListener::open(config.server.port)
                                .map(|s| Some(Box::new(s) as Box<dyn Source>))
                                .map_err(Into::into),
                        }
                    };
                    match new_source.and_then(|s| pipeline.reload(config, server).map(|()| s)) {
                        Ok(Some(s)) => source = s,
                        Ok(None) => {}
                        Err(e) => pipeline.log.line(
                            clock.now(),
                            &format!("error: reload failed, keeping the running config: {e:#}"),
                        ),
                    }
                }
                Err(e) => pipeline.log.line(
                    clock.now(),
                    &format!("error: reload failed, keeping the running config: {e:#}"),
                ),
            }
        }
        match source.recv(Duration::from_millis(200)) {
            Ok(Some(received)) => pipeline.handle(&received),
            Ok(None) => {}
            Err(e) => {
                pipeline
                    .log
                    .line(clock.now(), &format!("error: capture: {e}"));
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        pipeline.tick();
    }
    let s = pipeline.stats.clone();
    pipeline.log.line(
        clock.now(),
        &format!(
            "stopping: packets={} precheck-dropped={} refused={} granted={} closed={} knocks={}",
            s.packets, s.precheck_dropped, s.refused, s.granted, s.closed, s.knocks
        ),
    );
    if pipeline.config.server.flush_on_exit {
        pipeline.firewall.remove()?;
        pipeline.log.line(
            clock.now(),
            "flush-on-exit: table removed, all grants closed",
        );
    } else {
        pipeline.log.line(
            clock.now(),
            "grants stay in the kernel until they expire (flush-on-exit = false)",
        );
    }
    Ok(())
}

fn create_state_dir(dir: &std::path::Path) -> anyhow::Result<()> {
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
            Duration::from_secs(3600),
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
}
